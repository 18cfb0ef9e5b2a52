"""The cache builder's default encoder: the run's VAE (sdxl_jax.run_inputs resolves it), jitted
over this host's devices.

Each process encodes its own images on its local devices only (no cross-host traffic), the
batch split over a one-axis mesh of `jax.local_devices()`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sdxl_jax.models.vae_parts import params_fingerprint


def vae_fingerprint(params, preset: str, dtype: str) -> str:
    """What a cache's latents depend on of its VAE (the manifest's `vae_fingerprint`): every
    weight, the preset and the compute dtype. The trainer compares it with its own VAE's."""
    return params_fingerprint(params, {"preset": preset, "dtype": dtype, "fn": "vae_encode/mean"})


def make_vae_encoder(config, params):
    """(encode_fn, fingerprint) for build_cache: images (B, H, W, 3) in [−1, 1] → (mean, std),
    with the VAE `params` the run resolved (sdxl_jax.run_inputs: model.vae_workdir, the demo's
    VAE, model.pretrained or the seeded init).

    B is padded to a multiple of the local device count (the padding is cut off again).
    """
    from sdxl_jax import models
    vae = models.build_vae(config.model.preset, config.model.dtype)
    fingerprint = vae_fingerprint(params, config.model.preset, config.model.dtype)
    devices = jax.local_devices()
    mesh = Mesh(np.array(devices), ("batch",))
    rows, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
    params = jax.device_put(params, replicated)
    encode = jax.jit(lambda p, x: models.vae_encode(vae, p, x),
                     in_shardings=(replicated, rows), out_shardings=(rows, rows))

    def encode_fn(images: np.ndarray):
        n = len(images)
        pad = -n % len(devices)
        if pad:
            images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
        mean, std = encode(params, jnp.asarray(images, jnp.float32))
        return np.asarray(mean)[:n], np.asarray(std)[:n]

    return encode_fn, fingerprint
