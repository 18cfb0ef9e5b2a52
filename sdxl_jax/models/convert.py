"""Names and layouts between our Flax parameter trees and PyTorch diffusers / transformers.

Written from the module definitions (autoencoder.py, clip.py, unet.py and the PyTorch modules
they mirror). Everything is driven by the Flax tree of the model
(`abstract_params`), so the expected PyTorch state dict (keys and shapes) is derived from the
very modules we build, and works on `jax.ShapeDtypeStruct` leaves as well as on arrays.

Rules (our UNet / VAE / CLIP modules vs diffusers' and transformers' PyTorch ones):
- path: Flax names list members `down_blocks_0`, `resnets_1`, `to_out_0`, `net_2`; PyTorch
  `down_blocks.0`, `resnets.1`, `to_out.0`, `net.2`. CLIP layers are `layers/0` vs `layers.0`.
- VAE mid-block attention: Flax `query/key/value/proj_attn`, PyTorch `to_q/to_k/to_v/to_out.0`.
- leaves: `kernel` -> `weight` (Dense (in, out) -> Linear (out, in); Conv (kh, kw, in, out) ->
  (out, in, kh, kw)); `scale` (GroupNorm / LayerNorm) -> `weight`; `embedding` -> `weight`
  (same (vocab, dim) layout); `bias` -> `bias`.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import jax
import numpy as np

from sdxl_jax.models.safetensors_io import WeightsError

# Flax module names `<list>_<i>` that PyTorch holds in a ModuleList / Sequential `<list>.<i>`.
_LIST_NAMES = frozenset({"down_blocks", "up_blocks", "resnets", "attentions", "upsamplers",
                         "downsamplers", "transformer_blocks", "to_out", "net"})
_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# diffusers < 0.14 saved the VAE attention under the Flax-like names; accepted when loading.
LEGACY_TORCH_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
_LIST_ITEM = re.compile(r"^(.*)_(\d+)$")
# transformers 5's CLIPTextModel is the text transformer itself: its state dict (and the files it
# saves) lack the `text_model.` prefix that transformers 4 and every SDXL checkpoint carry
# (CLIPTextModelWithProjection keeps it). Both are read; we write the prefixed form, which both
# transformers versions load.
_TEXT_PREFIX = "text_model."


def torch_key_variants(name: str, key: str) -> tuple[str, ...]:
    """The state-dict keys under which a PyTorch parameter may be stored, preferred first."""
    variants = [key]
    if name == "vae":
        variants += [key.replace(f".{new}.", f".{old}.") for new, old in LEGACY_TORCH_NAMES.items()
                     if f".{new}." in key]
    if name == "text_l" and key.startswith(_TEXT_PREFIX):
        variants.append(key[len(_TEXT_PREFIX):])
    return tuple(variants)


class Leaf(NamedTuple):
    """One Flax parameter and its PyTorch counterpart."""
    path: tuple  # Flax path, e.g. ("down_blocks_0", "resnets_0", "conv1", "kernel")
    key: str  # PyTorch state-dict key, e.g. "down_blocks.0.resnets.0.conv1.weight"
    kind: str  # "conv" | "linear" | "plain": how the layout differs
    shape: tuple  # Flax shape


def path_names(path) -> tuple:
    """jax key path -> tuple of str."""
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def flat_leaves(tree) -> list:
    """[(path tuple of str, leaf)] in the tree's own (sorted-dict) order."""
    return [(path_names(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _torch_module_path(name: str, modules: tuple) -> list:
    parts: list = []
    for i, m in enumerate(modules):
        item = _LIST_ITEM.match(m)
        if item and item.group(1) in _LIST_NAMES:
            parts += [item.group(1), item.group(2)]
        elif name == "vae" and m in _VAE_ATTENTION and i > 0 and modules[i - 1].startswith(
                "attentions_"):
            parts.append(_VAE_ATTENTION[m])
        else:
            parts.append(m)  # CLIP's numeric layer names ("layers", "0") pass through
    return parts


def leaf_kind(path: tuple, ndim: int) -> str:
    if path[-1] != "kernel":
        return "plain"
    if ndim == 4:
        return "conv"
    if ndim == 2:
        return "linear"
    raise WeightsError(f"kernel {'/'.join(path)} has {ndim} dims; expected 2 (Dense) or 4 (Conv)")


def torch_leaves(name: str, flax_tree) -> list[Leaf]:
    """The PyTorch key and layout of every leaf of a Flax tree (arrays or ShapeDtypeStructs)."""
    out = []
    for path, x in flat_leaves(flax_tree):
        leaf = path[-1]
        if leaf not in ("kernel", "bias", "scale", "embedding"):
            raise WeightsError(f"{name}: no PyTorch name for Flax parameter {'/'.join(path)}")
        parts = _torch_module_path(name, path[:-1]) + ["bias" if leaf == "bias" else "weight"]
        out.append(Leaf(path, ".".join(parts), leaf_kind(path, len(x.shape)), tuple(x.shape)))
    keys = [lf.key for lf in out]
    if len(set(keys)) != len(keys):  # would silently merge two parameters
        raise WeightsError(f"{name}: two Flax parameters map to one PyTorch key")
    return out


def torch_shape(kind: str, flax_shape: tuple) -> tuple:
    if kind == "conv":
        kh, kw, cin, cout = flax_shape
        return (cout, cin, kh, kw)
    if kind == "linear":
        return tuple(flax_shape[::-1])
    return tuple(flax_shape)


def flax_to_torch(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1)))
    if kind == "linear":
        return np.ascontiguousarray(x.T)
    return x


def torch_to_flax(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return np.ascontiguousarray(np.transpose(x, (2, 3, 1, 0)))
    if kind == "linear":
        return np.ascontiguousarray(x.T)
    return x


def torch_shapes(name: str, flax_tree) -> dict[str, tuple]:
    """Expected PyTorch state dict {key: shape} of a Flax tree (works on abstract trees)."""
    return {lf.key: torch_shape(lf.kind, lf.shape) for lf in torch_leaves(name, flax_tree)}


def unflatten(paths_values) -> dict:
    """[(path tuple, value)] -> nested dict (the layout of Flax params)."""
    root: dict = {}
    for path, value in paths_values:
        node = root
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return root


def check_tree(what: str, tree, abstract) -> None:
    """`tree` has exactly the paths and shapes of `abstract`; else one error naming the first
    missing, unexpected or misshapen parameter."""
    got = {p: tuple(np.shape(x)) for p, x in flat_leaves(tree)}
    want = {p: tuple(a.shape) for p, a in flat_leaves(abstract)}
    for p in want:
        if p not in got:
            raise WeightsError(f"{what}: missing parameter {'/'.join(p)}")
    for p in got:
        if p not in want:
            raise WeightsError(f"{what}: unexpected parameter {'/'.join(p)}")
        if got[p] != want[p]:
            raise WeightsError(f"{what}: parameter {'/'.join(p)} has shape {got[p]}, the model "
                               f"needs {want[p]}")
