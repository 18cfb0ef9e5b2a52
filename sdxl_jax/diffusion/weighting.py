"""Loss weights in v-space and the per-sample weighted v loss (METHODS §6, §9, §15).

Weights (`loss.weighting`): MinSNR in two forms and debiased estimation. Element losses
(`loss.type`): squared error, or pseudo-Huber with a constant or SNR-scheduled threshold c.
`loss.masked`: the mean over the latent is weighted by a per-position mask.
"""
from __future__ import annotations

import jax.numpy as jnp

from sdxl_jax.diffusion.vpred import expand_to

WEIGHTINGS = ("min_snr_plus_one", "min_snr", "debiased", "none")
LOSS_TYPES = ("mse", "huber")
HUBER_SCHEDULES = ("constant", "snr")


def snr_loss_weight(snr, weighting: str = "min_snr_plus_one", gamma: float = 5.0):
    """Per-sample weight for the v loss.

    `min_snr`: min(SNR, γ)/(SNR+1), Hang et al. in v-space; it is 0 at SNR = 0 and so silences
    the terminal step that ZTSNR adds. `min_snr_plus_one` (default): min(SNR+1, γ)/(SNR+1),
    1 wherever SNR ≤ γ−1, terminal step included. `debiased` (Yu et al. 2024): the ε-space
    weight 1/√SNR times SNR/(SNR+1) = ‖ε̂−ε‖²/‖v̂−v‖², i.e. √SNR/(SNR+1); also 0 at SNR = 0
    (γ unused). Finite for SNR = 0 and SNR = ∞.
    """
    snr = jnp.asarray(snr, jnp.float32)
    if weighting == "none":
        return jnp.ones_like(snr)
    if weighting == "debiased":
        # √∞/∞ would be NaN; the limit is 0. At SNR = 0: 0/1 = 0.
        return jnp.where(jnp.isinf(snr), 0.0, jnp.sqrt(snr) / (snr + 1.0))
    if weighting == "min_snr":
        num = jnp.minimum(snr, gamma)
    elif weighting == "min_snr_plus_one":
        num = jnp.minimum(snr + 1.0, gamma)
    else:
        raise ValueError(f"loss.weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    # γ/∞ = 0 without a NaN: the denominator is ≥ 1 and the numerator ≤ γ.
    return num / (snr + 1.0)


def huber_threshold(a, s, c: float, schedule: str = "snr"):
    """Per-sample pseudo-Huber threshold c_t, shape of `a`, float32 (METHODS §15).

    `constant`: c everywhere. `snr` (Khrapov et al. 2024, the schedule of kohya sd-scripts'
    `--huber_schedule snr`): c_t = c + (1 − c)/(1 + σ_t)², σ_t = s/a, i.e. 1 at no noise (the loss
    is ≈ MSE for |d| ≪ 1) falling to c at pure noise. Written as c + (1 − c)·(a/(a + s))², which
    is exactly c at the ZTSNR terminal step (a = 0) instead of 1/(1+∞)².
    """
    if not c > 0:
        raise ValueError(f"loss.huber_c must be > 0, got {c!r}")
    a = jnp.asarray(a, jnp.float32)
    if schedule == "constant":
        return jnp.full_like(a, c)
    if schedule != "snr":
        raise ValueError(f"loss.huber_schedule must be one of {HUBER_SCHEDULES}, got {schedule!r}")
    s = jnp.asarray(s, jnp.float32)
    return c + (1.0 - c) * jnp.square(a / (a + s))


def pseudo_huber(d, c):
    """2c·(√(d² + c²) − c) per element, in float32; `c` is a scalar or per-sample (B,).

    ≈ d² for |d| ≪ c and ≈ 2c·|d| for |d| ≫ c. Computed as 2c·d²/(√(d² + c²) + c), the same
    value without the cancellation of √(d² + c²) − c in float32 when |d| ≪ c.
    """
    d = jnp.asarray(d, jnp.float32)
    c = expand_to(jnp.asarray(c, jnp.float32), d)
    d2 = jnp.square(d)
    return 2.0 * c * d2 / (jnp.sqrt(d2 + jnp.square(c)) + c)


def elementwise_loss(pred, target, loss_type: str = "mse", huber_c=None):
    """Per-element loss of pred − target in float32: (pred − target)² or pseudo-Huber(c)."""
    d = pred.astype(jnp.float32) - target.astype(jnp.float32)
    if loss_type == "mse":
        return jnp.square(d)
    if loss_type == "huber":
        if huber_c is None:
            raise ValueError("loss.type='huber' needs huber_c (see huber_threshold)")
        return pseudo_huber(d, huber_c)
    raise ValueError(f"loss.type must be one of {LOSS_TYPES}, got {loss_type!r}")


def per_sample_mse(pred, target):
    """mean((pred − target)²) over every axis but the batch, reduced in float32."""
    d = pred.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(jnp.square(d), axis=tuple(range(1, d.ndim)))


def masked_mean(el, mask):
    """Per-sample `Σ m·ℓ / (C·Σ m)` of element losses `el` (B, H, W, C) under `mask` (B, H, W, 1):
    the mean over the positions that count, weighted by the mask; 0 (and a zero gradient, not
    NaN) for a sample whose mask is all zero."""
    mask = jnp.asarray(mask, jnp.float32)
    axes = tuple(range(1, el.ndim))
    num = jnp.sum(el * mask, axis=axes)
    den = jnp.sum(mask, axis=axes) * el.shape[-1]
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def weighted_v_loss(v_pred, v_tgt, snr_weight, tag_weight=None, *, loss_type: str = "mse",
                    huber_c=None, mask=None):
    """Per-sample `w_tag · w_snr · mean(ℓ(v̂ − v))` in float32, shape (B,).

    ℓ is the squared error (default) or pseudo-Huber with per-sample threshold `huber_c`; with a
    `mask` (B, H, W, 1) in [0, 1] the mean is the mask-weighted one (masked_mean)."""
    if mask is not None:
        per_sample = masked_mean(elementwise_loss(v_pred, v_tgt, loss_type, huber_c), mask)
    elif loss_type == "mse":
        per_sample = per_sample_mse(v_pred, v_tgt)
    else:
        el = elementwise_loss(v_pred, v_tgt, loss_type, huber_c)
        per_sample = jnp.mean(el, axis=tuple(range(1, el.ndim)))
    loss = per_sample * jnp.asarray(snr_weight, jnp.float32)
    if tag_weight is not None:
        loss = loss * jnp.asarray(tag_weight, jnp.float32)
    return loss
