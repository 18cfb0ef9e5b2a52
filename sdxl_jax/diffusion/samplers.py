"""ZTSNR-aware samplers: v-pred denoiser in σ form, σ schedules, Euler / Euler a / DPM++ 2M, CFG.

Conventions (METHODS §4, §5):
- Sampler state is the variance-exploding x = x0 + σ·ε in float32, except at σ = +inf, where
  x does not exist as a number; there the state is its only finite representation, the scaled
  model input c_in·x = n (unit noise). A denoiser `denoise(x, σ) -> x̂0` therefore receives
  x in VE form for finite σ and n for σ = +inf. This keeps every sampler a single branch-free
  `lax.scan` over a traced σ array: the infinite first step needs no static special case, and
  20000·n (which overflows fp16 and loses n in bf16) is never formed.
- The first step from σ = +inf is, for every sampler, x_1 = x̂0(n, t=T−1) + σ_1·n: the limit of
  Euler and DPM++ 2M as σ_0 → ∞. (The Euler-ancestral limit would add fresh noise σ_1·ξ
  instead of σ_1·n; METHODS §4 fixes the deterministic step for all samplers.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sdxl_jax.diffusion.guidance import cfg_rescale
from sdxl_jax.diffusion.sigmas import (SDXL_SIGMA_MAX, karras_sigmas, sigma_max_for_resolution,
                                       sigma_to_t, trailing_sigmas)
from sdxl_jax.diffusion.vpred import predict_x0

SAMPLERS = ("euler", "euler_a", "dpmpp_2m")
SCHEDULE_KINDS = ("trailing", "karras")


def _per_sample(c, x):
    """Broadcast a scalar or (B,) coefficient over x's trailing axes."""
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


# ---- denoisers -------------------------------------------------------------------------------

def make_v_denoiser(model_fn, sigmas_table):
    """σ-form denoiser around a v-prediction model `model_fn(x_in, t) -> v̂` (σ_data = 1).

    D(x; σ) = c_skip·x + c_out·v̂(c_in·x, t(σ)) with c_in = 1/√(σ²+1), c_skip = 1/(σ²+1),
    c_out = −σ/√(σ²+1). Written as x̂0 = a·z − s·v̂ with z = c_in·x, a = c_in, s = −c_out (the
    same identity as training, `predict_x0`), and s computed as 1/√(1+σ⁻²) so σ = +inf gives
    a = 0, s = 1 exactly: x̂0 = −v̂(n, T−1). `t` is passed as a (B,) float32 array; the model
    output may be bfloat16 and is promoted to float32 before it touches the state.
    """
    table = np.asarray(sigmas_table, np.float64)
    sigma_to_t(1.0, table)  # validate the table now rather than at first trace

    def denoise(x, sigma):
        x = jnp.asarray(x, jnp.float32)
        sigma = jnp.asarray(sigma, jnp.float32)
        a = jax.lax.rsqrt(1.0 + jnp.square(sigma))
        s = jax.lax.rsqrt(1.0 + 1.0 / jnp.square(sigma))
        z = jnp.where(_per_sample(jnp.isinf(sigma), x), x, _per_sample(a, x) * x)
        t = jnp.broadcast_to(sigma_to_t(sigma, table), (x.shape[0],))
        v = jnp.asarray(model_fn(z, t)).astype(jnp.float32)
        return predict_x0(z, v, a, s)

    return denoise


def make_cfg_model(model_fn, cond, uncond, scale, rescale_phi=0.0):
    """Classifier-free guidance as a `model_fn(x_in, t) -> v̂` wrapper.

    `model_fn(x_in, t, context)` is the conditional model; `cond`/`uncond` are pytrees of (B, …)
    arrays (text states, pooled embedding, time ids). Both branches run as ONE batch of 2B, so a
    batch-sharded call stays a single UNet launch. Guidance and CFG rescale act on v̂, the raw
    model output, as Lin et al. 2023 do (diffusers applies it to the UNet output too); plain CFG
    is the same on v̂ or x̂0 (x̂0 is affine in v̂), the rescale is not.
    """
    context = jax.tree_util.tree_map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)

    def guided(x_in, t):
        v = model_fn(jnp.concatenate([x_in, x_in], axis=0), jnp.concatenate([t, t], axis=0),
                     context)
        v_c, v_u = jnp.split(jnp.asarray(v).astype(jnp.float32), 2, axis=0)
        return cfg_rescale(v_u, v_c, scale, rescale_phi)

    return guided


# ---- σ schedules -----------------------------------------------------------------------------

def sampling_sigmas(sigmas_table, steps: int, kind: str = "trailing", height=None, width=None,
                    sigma_max_scaling: bool = True, ztsnr: bool = True) -> np.ndarray:
    """σ_0 > … > σ_{steps−1} followed by 0 (float64, steps + 1 entries).

    ZTSNR (the table ends in +inf): σ_0 = +inf and σ_1 is resolution-aware. With
    f = σ_max(H, W)/σ_max(1024²) = √(H·W)/1024 (H, W in pixels; f = 1 when
    `sigma_max_scaling` is off or no size is given):
    - "karras": ρ = 7 spacing over steps−1 values from σ_1 = f·14.6 = σ_max(H, W) down to the
      table's σ_min.
    - "trailing": the table's own σ at trailing timesteps t_1 … t_{steps−1} (t_0 = T−1 is the
      ∞ step). For f ≠ 1 they are stretched linearly in log σ about the table's σ_min so that
      σ_1 becomes f·σ_1 while σ_min stays put and the order is kept; a simple cap at σ_max(H,W)
      would break monotonicity (σ_1 = 57.9 and σ_2 = 27.2 already exceed 14.6 at 28 steps).
      At 1024² (or unscaled) this is exactly the model's discrete trailing schedule.
    Without ZTSNR the table's finite entries are the whole schedule and sampling starts at
    their largest σ like any ordinary sampler; σ_max scaling does not apply because it moves
    σ_1, the first step after ∞, and the model was never trained above its finite σ_max.
    """
    table = np.asarray(sigmas_table, np.float64)
    finite = table[np.isfinite(table)]
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"sample.schedule must be one of {SCHEDULE_KINDS}, got {kind!r}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"sample.steps must be a positive integer, got {steps!r}")
    if (height is None) != (width is None):
        raise ValueError("sampling_sigmas: give both height and width (pixels) or neither")
    if kind == "trailing" and steps > table.shape[0]:
        raise ValueError(f"trailing schedule: steps={steps} exceeds the {table.shape[0]} "
                         "training timesteps")
    if not ztsnr:
        body = (trailing_sigmas(steps, finite) if kind == "trailing"
                else karras_sigmas(steps, finite[0], finite[-1]))
        return _checked(np.concatenate([body, [0.0]]))
    if finite.shape[0] == table.shape[0]:
        raise ValueError("sampling_sigmas(ztsnr=True) needs a σ table ending in +inf "
                         "(schedule.ztsnr='rescale'); use ztsnr=False for this schedule")

    f = 1.0
    if sigma_max_scaling and height is not None:
        f = sigma_max_for_resolution(height, width) / SDXL_SIGMA_MAX
    sigma_min = finite[0]
    if kind == "karras":
        sigma_1 = f * SDXL_SIGMA_MAX
        if sigma_1 <= sigma_min:
            raise ValueError(f"σ_1 = {sigma_1:.4g} for {height}x{width} is below the table's "
                             f"σ_min = {sigma_min:.4g}; the canvas is too small")
        body = karras_sigmas(steps - 1, sigma_min, sigma_1)
    else:
        body = trailing_sigmas(steps, table)[1:]
        if f != 1.0 and body.size:
            log_span = np.log(body[0] / sigma_min)
            stretch = np.log(f * body[0] / sigma_min) / log_span
            if stretch <= 0:
                raise ValueError(f"σ_1 = {f * body[0]:.4g} for {height}x{width} is below the "
                                 f"table's σ_min = {sigma_min:.4g}; the canvas is too small")
            body = sigma_min * np.exp(np.log(body / sigma_min) * stretch)
    return _checked(np.concatenate([[np.inf], body, [0.0]]))


def _checked(sigmas: np.ndarray) -> np.ndarray:
    if not np.all(np.diff(sigmas) < 0):
        raise ValueError(f"sampling σ are not strictly decreasing: {sigmas}")
    return sigmas


# ---- samplers --------------------------------------------------------------------------------

def sample(denoise, noise, sigmas, sampler: str = "euler", rng=None,
           return_trajectory: bool = False):
    """Integrate from σ_0 to σ_{-1} = 0 with one `lax.scan` step per σ pair (k-diffusion formulas).

    `noise` is unit Gaussian (B, …); `sigmas` a decreasing (N+1,) array (may be traced; σ_0 may
    be +inf); `rng` is required for "euler_a" (step i uses fold_in(rng, i)). Jit with `sampler`
    and `return_trajectory` static. Returns x (float32), and with `return_trajectory` also the
    (N, B, …) states after each step.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sample.sampler must be one of {SAMPLERS}, got {sampler!r}")
    if sampler == "euler_a" and rng is None:
        raise ValueError("sampler 'euler_a' needs an rng key")
    noise = jnp.asarray(noise, jnp.float32)
    sigmas = jnp.asarray(sigmas, jnp.float32)
    s0 = sigmas[0]
    x = jnp.where(jnp.isinf(s0), noise, jnp.where(jnp.isinf(s0), 0.0, s0) * noise)

    def step(carry, inp):
        x, old_den, sigma_prev = carry
        sigma, sigma_next, i = inp
        den = denoise(x, sigma).astype(jnp.float32)
        at_inf = jnp.isinf(sigma)
        ratio = jnp.where(at_inf, 0.0, sigma_next / sigma)  # σ_next/σ; 0 at the ∞ step
        if sampler == "euler":
            x_next = den + ratio * (x - den)
        elif sampler == "euler_a":  # η = 1: σ_down = σ_next²/σ, σ_up = σ_next·√(1 − (σ_next/σ)²)
            sigma_up = sigma_next * jnp.sqrt(jnp.maximum(1.0 - ratio**2, 0.0))
            xi = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
            x_next = den + ratio**2 * (x - den) + sigma_up * xi
        else:  # dpmpp_2m; after the ∞ step, on the first step and into σ = 0 it is first order
            second = jnp.isfinite(sigma_prev) & (sigma_next > 0) & ~at_inf
            sp, sc, sn = (jnp.where(second, v, 1.0) for v in (sigma_prev, sigma, sigma_next))
            h, h_last = jnp.log(sc / sn), jnp.log(sp / sc)  # finite even where unused
            c = jnp.where(second, h / (2.0 * h_last), 0.0)  # 1/(2r), r = h_last/h
            den_d = (1.0 + c) * den - c * old_den
            x_next = ratio * x + (1.0 - ratio) * den_d
        x_next = jnp.where(at_inf, den + sigma_next * x, x_next)  # x = n here (METHODS §4)
        return (x_next, den, sigma), (x_next if return_trajectory else None)

    idx = jnp.arange(sigmas.shape[0] - 1)
    carry = (x, jnp.zeros_like(x), jnp.array(jnp.inf, jnp.float32))
    (x, _, _), traj = jax.lax.scan(step, carry, (sigmas[:-1], sigmas[1:], idx))
    return (x, traj) if return_trajectory else x
