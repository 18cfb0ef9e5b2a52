"""The VAE as two parts: the encoder (encoder + quant_conv), frozen in every task, and the decoder
(post_quant_conv + decoder), which decoder finetuning trains (METHODS §11). Fingerprints say
which exact encoder weights latents or a finetuned decoder belong to.
"""
from __future__ import annotations

import hashlib
import json

import jax
import numpy as np

ENCODER_KEYS = ("encoder", "quant_conv")  # frozen
DECODER_KEYS = ("post_quant_conv", "decoder")  # trained by the decoder finetune


def split_vae_params(vae_params) -> tuple[dict, dict]:
    """(encoder part, decoder part) of a full VAE parameter tree (no copies)."""
    missing = [k for k in ENCODER_KEYS + DECODER_KEYS if k not in vae_params]
    if missing or len(vae_params) != 4:
        raise ValueError(f"not a VAE parameter tree: top-level keys {sorted(vae_params)}, expected "
                         f"{sorted(ENCODER_KEYS + DECODER_KEYS)}")
    return ({k: vae_params[k] for k in ENCODER_KEYS}, {k: vae_params[k] for k in DECODER_KEYS})


def merge_vae_params(encoder_part: dict, decoder_part: dict) -> dict:
    """The full VAE tree (what export, sampling and the cache builder take)."""
    return {**encoder_part, **decoder_part}


def params_fingerprint(params, extra: dict | None = None) -> str:
    """sha256 over every leaf's path, shape, dtype and bytes (plus `extra` settings)."""
    h = hashlib.sha256(json.dumps(extra or {}, sort_keys=True).encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        arr = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}:{arr.shape}:{arr.dtype}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:32]


def encoder_fingerprint(encoder_part) -> str | None:
    """Fingerprint of the frozen encoder (None when its arrays are not all on this host)."""
    if not all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(encoder_part)):
        return None
    return params_fingerprint(encoder_part)
