"""SDXL UNet call in channels-last (diffusers' Flax UNet takes and returns NCHW)."""
from __future__ import annotations

import jax.numpy as jnp


def unet_apply(unet, params, z_NHWC, t, context, pooled, time_ids, *, train: bool = False):
    """Model output (B, H, W, 4) float32 for latents z, timesteps t (B,) and conditioning.

    context (B, L, cross_attention_dim), pooled (B, proj_dim_g), time_ids (B, 6) =
    (orig_h, orig_w, crop_top, crop_left, target_h, target_w). The NCHW transposes around the
    call cancel against diffusers' internal ones under jit.
    """
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (z_NHWC.shape[0],))
    out = unet.apply(
        {"params": params}, jnp.transpose(z_NHWC, (0, 3, 1, 2)).astype(unet.dtype), t,
        context.astype(unet.dtype),
        {"text_embeds": pooled.astype(unet.dtype), "time_ids": time_ids.astype(jnp.float32)},
        train=train,
    ).sample
    return jnp.transpose(out, (0, 2, 3, 1)).astype(jnp.float32)
