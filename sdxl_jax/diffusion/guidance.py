"""Classifier-free guidance with CFG rescale (Lin et al. 2023; METHODS §4)."""
from __future__ import annotations

import jax.numpy as jnp


def cfg_rescale(uncond, cond, scale: float, rescale_phi: float = 0.0):
    """x = u + w(c − u); x_r = x·std(c)/std(x) per sample over all non-batch axes;
    returns φ·x_r + (1 − φ)·x. φ = 0 is plain CFG."""
    x = uncond + scale * (cond - uncond)
    axes = tuple(range(1, x.ndim))
    std_c = jnp.std(cond, axis=axes, keepdims=True)
    std_x = jnp.std(x, axis=axes, keepdims=True)
    x_r = x * (std_c / jnp.maximum(std_x, 1e-12))
    return rescale_phi * x_r + (1.0 - rescale_phi) * x
