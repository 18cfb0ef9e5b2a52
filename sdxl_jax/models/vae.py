"""SDXL VAE in channels-last, float32 at the boundary.

The posterior is formed from float32 moments, so a bf16 compute dtype never rounds the latent
mean/std that the cache stores. A VAE module built in float16 (outside `build.build_vae`, which
never does) is run in bfloat16 here: the SDXL VAE overflows float16.
"""
from __future__ import annotations

import jax.numpy as jnp

from sdxl_jax.models.autoencoder import DiagonalGaussian
from sdxl_jax.models.build import vae_dtype


def _never_fp16(vae):
    """`vae` itself, or a copy computing in bfloat16 when it was built in float16."""
    dt = vae_dtype(vae.dtype)
    return vae if dt == vae.dtype else vae.clone(dtype=dt)


def vae_encode(vae, params, images_NHWC):
    """Images in [-1, 1] → (mean_NHWC, std_NHWC) of the raw (unscaled) latents, float32."""
    vae = _never_fp16(vae)
    moments = vae.apply({"params": params}, images_NHWC.astype(vae.dtype), method="encode")
    posterior = DiagonalGaussian(moments.astype(jnp.float32))
    return posterior.mean, posterior.std


def vae_decode(vae, params, latents_NHWC):
    """Raw (unscaled) latents → images_NHWC, about [-1, 1], float32."""
    vae = _never_fp16(vae)
    images = vae.apply({"params": params}, latents_NHWC.astype(vae.dtype), method="decode")
    return images.astype(jnp.float32)
