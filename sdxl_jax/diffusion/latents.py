"""Latent normalisation between the VAE and the UNet (METHODS §10).

`scale`: z·0.13025, what every SDXL tool assumes. `per_channel`: (z − μ_c)/σ_c with dataset
statistics stored in the cache manifest, the checkpoint and the export.
"""
from __future__ import annotations

import jax.numpy as jnp

SDXL_SCALE_FACTOR = 0.13025
NORMALIZATIONS = ("scale", "per_channel")


def _channel_stats(mean, std, ndim, channel_axis):
    shape = [1] * ndim
    shape[channel_axis] = -1
    return (jnp.asarray(mean, jnp.float32).reshape(shape),
            jnp.asarray(std, jnp.float32).reshape(shape))


def normalize_latents(z, mode: str = "scale", scale: float = SDXL_SCALE_FACTOR,
                      mean=None, std=None, channel_axis: int = -1):
    """VAE latent → UNet space."""
    if mode == "scale":
        return z * scale
    if mode == "per_channel":
        m, s = _channel_stats(mean, std, z.ndim, channel_axis)
        return (z - m) / s
    raise ValueError(f"latents.normalization must be one of {NORMALIZATIONS}, got {mode!r}")


def denormalize_latents(z, mode: str = "scale", scale: float = SDXL_SCALE_FACTOR,
                        mean=None, std=None, channel_axis: int = -1):
    """UNet space → VAE latent (before decoding)."""
    if mode == "scale":
        return z / scale
    if mode == "per_channel":
        m, s = _channel_stats(mean, std, z.ndim, channel_axis)
        return z * s + m
    raise ValueError(f"latents.normalization must be one of {NORMALIZATIONS}, got {mode!r}")
