"""MinSNR loss weights in v-space and the per-sample weighted v loss (METHODS §6, §9)."""
from __future__ import annotations

import jax.numpy as jnp

WEIGHTINGS = ("min_snr_plus_one", "min_snr", "none")


def snr_loss_weight(snr, weighting: str = "min_snr_plus_one", gamma: float = 5.0):
    """Per-sample weight for the v loss.

    `min_snr`: min(SNR, γ)/(SNR+1), Hang et al. in v-space; it is 0 at SNR = 0 and so silences
    the terminal step that ZTSNR adds. `min_snr_plus_one` (default): min(SNR+1, γ)/(SNR+1),
    1 wherever SNR ≤ γ−1, terminal step included. Finite for SNR = 0 and SNR = ∞.
    """
    snr = jnp.asarray(snr, jnp.float32)
    if weighting == "none":
        return jnp.ones_like(snr)
    if weighting == "min_snr":
        num = jnp.minimum(snr, gamma)
    elif weighting == "min_snr_plus_one":
        num = jnp.minimum(snr + 1.0, gamma)
    else:
        raise ValueError(f"loss.weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    # γ/∞ = 0 without a NaN: the denominator is ≥ 1 and the numerator ≤ γ.
    return num / (snr + 1.0)


def per_sample_mse(pred, target):
    """mean((pred − target)²) over every axis but the batch, reduced in float32."""
    d = pred.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(jnp.square(d), axis=tuple(range(1, d.ndim)))


def weighted_v_loss(v_pred, v_tgt, snr_weight, tag_weight=None):
    """Per-sample `w_tag · w_snr · mean((v̂ − v)²)` in float32, shape (B,)."""
    loss = per_sample_mse(v_pred, v_tgt) * jnp.asarray(snr_weight, jnp.float32)
    if tag_weight is not None:
        loss = loss * jnp.asarray(tag_weight, jnp.float32)
    return loss
