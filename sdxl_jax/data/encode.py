"""The cache builder's default encoder: the config's VAE, jitted over this host's devices.

Each process encodes its own images on its local devices only (no cross-host traffic), the
batch split over a one-axis mesh of `jax.local_devices()`.
"""
from __future__ import annotations

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def params_fingerprint(params, extra: dict | None = None) -> str:
    """sha256 over every leaf's path, shape, dtype and bytes (plus `extra` settings)."""
    h = hashlib.sha256(json.dumps(extra or {}, sort_keys=True).encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        arr = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}:{arr.shape}:{arr.dtype}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:32]


def _vae_params(config):
    """The VAE the trainer uses: `model.pretrained`, else the seeded random init.

    Same contract as sdxl_jax.models.weights.frozen_params (which builds all three frozen models;
    only the VAE is needed here): init_params("vae", preset, fold_in(PRNGKey(train.seed), 1)).
    """
    from sdxl_jax.models import init_params
    from sdxl_jax.models.weights import load_pretrained
    preset = config.model.preset
    if config.model.pretrained:
        return load_pretrained(config.model.pretrained, preset, ("vae",))["vae"]
    return init_params("vae", preset, jax.random.fold_in(jax.random.PRNGKey(int(config.train.seed)), 1))


def make_vae_encoder(config, params=None):
    """(encode_fn, fingerprint) for build_cache: images (B, H, W, 3) in [−1, 1] → (mean, std).

    B is padded to a multiple of the local device count (the padding is cut off again).
    """
    from sdxl_jax import models
    vae = models.build_vae(config.model.preset, config.model.dtype)
    params = _vae_params(config) if params is None else params
    fingerprint = params_fingerprint(params, {"preset": config.model.preset,
                                              "dtype": config.model.dtype, "fn": "vae_encode/mean"})
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
