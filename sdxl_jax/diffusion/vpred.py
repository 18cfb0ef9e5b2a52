"""Noising in variance-preserving form and the v-prediction target (METHODS §2).

Everything is written in (a, s) = (√ᾱ, √(1−ᾱ)), never in σ: at the ZTSNR terminal step a = 0
and s = 1, so the model input is exactly ε and the target exactly −x0, with no σ = ∞ anywhere.
Shapes: `x0`, `eps` are (B, ...); `a`, `s` are (B,) and broadcast over the trailing axes.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def expand_to(c, x):
    """`c` of shape (B,) (or a scalar) with trailing 1-axes, to broadcast over x's (B, …)."""
    c = jnp.asarray(c)
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


def vp_coefficients(alphas_cumprod, t):
    """(a_t, s_t) for integer timesteps t, in float32.

    With a host (numpy) table both square roots are taken in float64 first: 1 − ᾱ_0 ≈ 8.5e-4
    would lose ~3e-5 relative precision in float32, which shows up in SNR at t = 0."""
    if isinstance(alphas_cumprod, np.ndarray):
        ac = alphas_cumprod.astype(np.float64)
        a_tab = jnp.asarray(np.sqrt(ac), jnp.float32)
        s_tab = jnp.asarray(np.sqrt(1.0 - ac), jnp.float32)
        return a_tab[t], s_tab[t]
    ac = jnp.asarray(alphas_cumprod, jnp.float32)[t]
    return jnp.sqrt(ac), jnp.sqrt(1.0 - ac)


def add_noise(x0, eps, a, s):
    """z = a·x0 + s·ε."""
    return expand_to(a, x0) * x0 + expand_to(s, x0) * eps


def v_target(x0, eps, a, s):
    """v = a·ε − s·x0."""
    return expand_to(a, x0) * eps - expand_to(s, x0) * x0


def predict_x0(z, v, a, s):
    """x̂0 = a·z − s·v̂."""
    return expand_to(a, z) * z - expand_to(s, z) * v


def predict_eps(z, v, a, s):
    """ε̂ = s·z + a·v̂."""
    return expand_to(s, z) * z + expand_to(a, z) * v


def snr(a, s):
    """SNR = a²/s² (0 at the terminal ZTSNR step; s > 0 on every SDXL step)."""
    a = jnp.asarray(a, jnp.float32)
    s = jnp.asarray(s, jnp.float32)
    return jnp.square(a) / jnp.square(s)
