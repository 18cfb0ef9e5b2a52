"""Pretrained weights in: diffusers SDXL folders, single-file SDXL checkpoints, Hub ids.

No torch at run time: tensors are read as numpy (safetensors_io) and renamed / transposed by
convert.py (PyTorch <-> Flax) and sgm.py (single-file <-> PyTorch). Every component is
validated against the Flax tree of the model we build (`abstract_params`) from file headers
alone, before a single tensor is read, so a wrong architecture, a missing / extra / misshapen
tensor or a truncated file stops the run with one message naming the first offending key.
Conversion then goes leaf by leaf; with `shardings` each leaf is placed on the mesh as soon
as it is converted and its numpy copy dropped, so the model is never held twice on a host.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
from typing import Callable, Mapping

import jax
import numpy as np

from sdxl_jax.models import build, sgm
from sdxl_jax.models.convert import (flat_leaves, torch_key_variants, torch_leaves, torch_shape,
                                     torch_to_flax, unflatten)
from sdxl_jax.models.safetensors_io import SafetensorsFile, WeightsError

log = logging.getLogger(__name__)

MODEL_NAMES = build.MODEL_NAMES
SUBFOLDER = {"unet": "unet", "vae": "vae", "text_l": "text_encoder", "text_g": "text_encoder_2"}
_TORCH_BASENAME = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                   "text_l": "model", "text_g": "model"}
_FLAX_FILE = {"unet": "diffusion_flax_model.msgpack", "vae": "diffusion_flax_model.msgpack",
              "text_l": "flax_model.msgpack", "text_g": "flax_model.msgpack"}
# Buffers older transformers versions saved with CLIP; not parameters, tolerated when present.
_OPTIONAL_TORCH = {"text_l": ("text_model.embeddings.position_ids", "embeddings.position_ids"),
                   "text_g": ("text_model.embeddings.position_ids",)}
_PICKLE_EXTS = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

Getter = Callable[[], np.ndarray]


# ---- format detection ------------------------------------------------------------------------

def detect_format(path: str) -> str:
    """"diffusers" (a folder), "single_file" (an SGM-layout .safetensors) or "hub" (org/name).

    Raises WeightsError for anything else, naming what was found and what to pass instead.
    """
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "model_index.json")) or any(
                os.path.isdir(os.path.join(path, sub)) for sub in SUBFOLDER.values()):
            return "diffusers"
        raise WeightsError(f"{path} is a folder but not a diffusers SDXL folder (no "
                           f"model_index.json nor any of {sorted(SUBFOLDER.values())})")
    if os.path.isfile(path):
        if path.lower().endswith(_PICKLE_EXTS):
            raise WeightsError(f"{path}: pickle-based checkpoints are not loaded (arbitrary code "
                               "execution); convert it to .safetensors first")
        if not path.lower().endswith(".safetensors"):
            raise WeightsError(f"{path}: unknown weights file type; expected a .safetensors "
                               "single-file SDXL checkpoint or a diffusers folder")
        check_single_file_architecture(SafetensorsFile(path))
        return "single_file"
    if _HUB_ID.match(path):
        return "hub"
    raise WeightsError(f"{path!r}: no such file or folder, and not a Hub id of the form org/name")


def check_single_file_architecture(st: SafetensorsFile, components=()) -> None:
    """Reject checkpoints of other architectures with a message saying what they are, and
    files lacking one of the requested `components`."""
    keys = list(st.tensors)

    def first(prefix):
        return next((k for k in keys if k.startswith(prefix)), None)

    if first("cond_stage_model."):
        raise WeightsError(f"{st.path}: this is a Stable Diffusion 1.x/2.x checkpoint (found "
                           f"{first('cond_stage_model.')!r}), not SDXL")
    if first("conditioner.embedders.0.model."):
        raise WeightsError(f"{st.path}: this is the SDXL refiner (found "
                           f"{first('conditioner.embedders.0.model.')!r}), not an SDXL base model")
    if not any(first(prefix) for prefix in sgm.PREFIX.values()):
        if first("down_blocks.") or first("text_model.") or first("encoder.down_blocks."):
            raise WeightsError(f"{st.path}: holds a single diffusers/transformers component "
                               f"(first key {keys[0]!r}); pass the diffusers folder instead")
        raise WeightsError(f"{st.path}: not an SDXL single-file checkpoint: no tensor under any "
                           f"of {sorted(sgm.PREFIX.values())} (first key "
                           f"{keys[0] if keys else None!r})")
    for name in components:
        if not first(sgm.PREFIX[name]):
            raise WeightsError(f"{st.path}: holds no {name} (no tensor under "
                               f"{sgm.PREFIX[name]!r}); use a complete SDXL checkpoint")
    unet_marker = sgm.PREFIX["unet"] + "label_emb.0.0.weight"
    if "unet" in components and unet_marker not in st.tensors:
        raise WeightsError(f"{st.path}: not an SDXL UNet: {unet_marker!r} (SDXL's pooled-text/"
                           f"size embedding) is missing; first UNet key is "
                           f"{first(sgm.PREFIX['unet'])!r}")


def _warn_unused(st: SafetensorsFile) -> None:
    """Tensors outside every component (EMA copies, schedule buffers) are reported, not lost
    silently."""
    known = tuple(sgm.PREFIX.values())
    unused = [k for k in st.tensors if not k.startswith(known)
              and k not in (sgm.V_PRED_KEY, sgm.ZTSNR_KEY)]
    if unused:
        log.warning("%s: ignoring %d tensors outside the SDXL components, e.g. %s", st.path,
                    len(unused), unused[:3])


# ---- validation ------------------------------------------------------------------------------

def _shape_str(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _check_keys(where: str, expected: Mapping[str, tuple], found: Mapping[str, tuple],
                optional=()) -> None:
    """expected: key -> tuple of accepted shapes; found: key -> shape. First problem raises."""
    missing = [k for k in expected if k not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"{where}: missing tensor {missing[0]!r}{more}; the file does not hold "
                           "this model (different architecture or preset?)")
    extra = [k for k in found if k not in expected and k not in optional]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise WeightsError(f"{where}: unexpected tensor {extra[0]!r}{more}; the file holds "
                           "parameters this model does not have (different architecture or "
                           "preset?)")
    for k, accepted in expected.items():
        if tuple(found[k]) not in accepted:
            raise WeightsError(f"{where}: tensor {k!r} has shape {_shape_str(found[k])}, the "
                               f"model needs {_shape_str(accepted[0])} (different preset?)")


def _as_float32(where: str, key: str, x: np.ndarray) -> np.ndarray:
    if x.dtype.kind in "iub":  # float16/32/64 and ml_dtypes' bfloat16 / fp8 are accepted
        raise WeightsError(f"{where}: tensor {key!r} has non-float dtype {x.dtype}")
    return np.asarray(x, dtype=np.float32)


# ---- sources: per component, {flax path: getter of the Flax-layout array} ---------------------

class _TorchFiles:
    """A diffusers/transformers component stored as PyTorch-layout safetensors (maybe sharded)."""

    @staticmethod
    def find(folder: str, name: str) -> str | None:
        """The weights file (or shard index) of a component folder, preferring full precision."""
        base = _TORCH_BASENAME[name]
        for candidate in (f"{base}.safetensors", f"{base}.safetensors.index.json",
                          f"{base}.fp16.safetensors", f"{base}.fp16.safetensors.index.json"):
            if os.path.isfile(os.path.join(folder, candidate)):
                return os.path.join(folder, candidate)
        return None

    def __init__(self, path: str):
        self.where = path
        if path.endswith(".index.json"):
            folder = os.path.dirname(path)
            with open(path) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise WeightsError(f"{path}: no weight_map in the shard index")
            files = {}
            for fn in sorted(set(weight_map.values())):
                if not os.path.isfile(os.path.join(folder, fn)):
                    raise WeightsError(f"{path}: lists shard {fn}, which is missing")
                files[fn] = SafetensorsFile(os.path.join(folder, fn))
            self.files = {}
            for fn, st in files.items():
                for key in st.tensors:
                    if key in self.files:
                        raise WeightsError(f"{path}: tensor {key!r} appears in two shards")
                    self.files[key] = st
            for key, fn in weight_map.items():
                if key not in files[fn].tensors:
                    raise WeightsError(f"{self.where}: index maps {key!r} to {fn}, which lacks it")
        else:
            st = SafetensorsFile(path)
            self.files = {key: st for key in st.tensors}

    def shapes(self) -> dict:
        return {k: st.shape(k) for k, st in self.files.items()}

    def get(self, key: str) -> np.ndarray:
        return self.files[key].get(key)


def _torch_getters(name: str, abstract, src: _TorchFiles) -> dict[tuple, Getter]:
    leaves = torch_leaves(name, abstract)
    found = src.shapes()
    rename = {}  # our key -> the variant the file stores (legacy VAE / transformers 5 CLIP-L)
    for lf in leaves:
        if lf.key not in found:
            stored = [v for v in torch_key_variants(name, lf.key)[1:] if v in found]
            if stored:
                rename[lf.key] = stored[0]
    found_current = {k: v for k, v in found.items() if k not in rename.values()}
    found_current.update({k: found[old] for k, old in rename.items()})
    expected = {lf.key: (torch_shape(lf.kind, lf.shape),) for lf in leaves}
    if name == "vae":  # old VAEs stored the attention projections as 1x1 convs
        expected.update({lf.key: (torch_shape(lf.kind, lf.shape), torch_shape(lf.kind, lf.shape)
                                  + (1, 1)) for lf in leaves if lf.kind == "linear"})
    _check_keys(src.where, expected, found_current, _OPTIONAL_TORCH.get(name, ()))

    def getter(lf):
        key = rename.get(lf.key, lf.key)
        return lambda: torch_to_flax(lf.kind, _as_float32(src.where, key, src.get(key)).reshape(
            torch_shape(lf.kind, lf.shape)))
    return {lf.path: getter(lf) for lf in leaves}


def _flax_getters(name: str, abstract, path: str) -> dict[tuple, Getter]:
    from flax.serialization import msgpack_restore

    with open(path, "rb") as f:
        try:
            tree = msgpack_restore(f.read())
        except Exception as e:  # noqa: BLE001 — any msgpack decoding failure
            raise WeightsError(f"{path}: not a readable Flax msgpack file ({e})") from e
    if isinstance(tree, dict) and set(tree) == {"params"}:
        tree = tree["params"]
    found = {"/".join(p): np.shape(x) for p, x in flat_leaves(tree)}
    values = dict(("/".join(p), x) for p, x in flat_leaves(tree))
    expected = {"/".join(p): (tuple(a.shape),) for p, a in flat_leaves(abstract)}
    _check_keys(path, expected, found)
    return {p: (lambda k="/".join(p): _as_float32(path, k, np.asarray(values[k])))
            for p, _ in flat_leaves(abstract)}


def _single_file_getters(name: str, preset: str, abstract, st: SafetensorsFile
                         ) -> dict[tuple, Getter]:
    leaves = torch_leaves(name, abstract)
    tshapes = {lf.key: torch_shape(lf.kind, lf.shape) for lf in leaves}
    tensors = sgm.sgm_tensors(name, preset, [lf.key for lf in leaves])
    expected = {t.key: sgm.accepted_shapes(t, tshapes) for t in tensors}
    found = {k: st.shape(k) for k in st.tensors if k.startswith(sgm.PREFIX[name])}
    _check_keys(f"{st.path} [{name}]", expected, found, sgm.OPTIONAL_KEYS.get(name, ()))
    where = {}
    for t in tensors:
        for i, key in enumerate(t.sources):
            where[key] = (t, i)

    def getter(lf):
        t, i = where[lf.key]
        return lambda: torch_to_flax(lf.kind, sgm.from_sgm(
            t, _as_float32(st.path, t.key, st.get(t.key)).reshape(
                sgm.sgm_shape(t, tshapes)), i))
    return {lf.path: getter(lf) for lf in leaves}


def _diffusers_getters(folder: str, name: str, abstract) -> dict[tuple, Getter]:
    sub = os.path.join(folder, SUBFOLDER[name])
    if not os.path.isdir(sub):
        raise WeightsError(f"{folder}: diffusers folder has no {SUBFOLDER[name]}/ for {name}")
    torch_file = _TorchFiles.find(sub, name)
    if torch_file:
        return _torch_getters(name, abstract, _TorchFiles(torch_file))
    flax_file = os.path.join(sub, _FLAX_FILE[name])
    if os.path.isfile(flax_file):
        return _flax_getters(name, abstract, flax_file)
    present = sorted(os.listdir(sub))
    if any(f.endswith(".bin") for f in present):
        raise WeightsError(f"{sub}: only pickle .bin weights ({present}); they are not loaded (no "
                           "pickle). Re-save the model with safetensors")
    raise WeightsError(f"{sub}: no {_TORCH_BASENAME[name]}.safetensors (or sharded index, or "
                       f"{_FLAX_FILE[name]}); found {present}")


# ---- Hub ---------------------------------------------------------------------------------------

def _download(repo_id: str) -> str:
    """Local snapshot of a Hub repo (safetensors weights, configs, tokenizers only)."""
    from huggingface_hub import constants, snapshot_download

    patterns = ["model_index.json", "*/config.json", "scheduler/*", "tokenizer*/*",
                "*/diffusion_pytorch_model.safetensors", "*/model.safetensors",
                "*/*.safetensors.index.json", "*/diffusion_pytorch_model-*.safetensors",
                "*/model-*.safetensors"]
    try:
        return snapshot_download(repo_id, allow_patterns=patterns,
                                 local_files_only=bool(constants.HF_HUB_OFFLINE))
    except Exception as e:  # noqa: BLE001 — offline, unknown repo, network, auth: one message
        raise WeightsError(
            f"{repo_id!r} is not a local file or folder, and downloading it from the Hugging Face "
            f"Hub failed ({type(e).__name__}: {str(e)[:200]}). Offline, download the model "
            "elsewhere and pass its local diffusers folder or single .safetensors file") from e


# ---- public API --------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def cached_abstract_params(name: str, preset: str):
    """abstract_params is an eval_shape trace (seconds for the SDXL UNet): once per process."""
    return build.abstract_params(name, preset)


def _component_getters(fmt: str, path: str, preset: str, components) -> dict:
    out = {}
    st = SafetensorsFile(path) if fmt == "single_file" else None
    if st is not None:
        check_single_file_architecture(st, components)
        _warn_unused(st)
        marks = [k for k in (sgm.V_PRED_KEY, sgm.ZTSNR_KEY) if k in st.tensors]
        log.info("%s: single-file SDXL checkpoint, markers %s", path, marks or "none (eps-pred)")
    for name in components:
        abstract = cached_abstract_params(name, preset)
        if st is not None:
            getters = _single_file_getters(name, preset, abstract, st)
        else:
            getters = _diffusers_getters(path, name, abstract)
        out[name] = (abstract, getters)
    return out


def load_pretrained(path_or_id: str, preset: str, components=MODEL_NAMES, shardings=None) -> dict:
    """{name: Flax params (float32)} for `components` of a diffusers folder, an SGM single-file
    .safetensors or a Hub id.

    All requested components are validated (keys and shapes from file headers, against
    `abstract_params(name, preset)`) before any tensor is read. Without `shardings` the
    leaves are host numpy arrays; with `shardings` ({name: pytree of NamedSharding matching
    abstract_params}) every leaf is `jax.device_put` onto the mesh as soon as it is converted.
    """
    components = tuple(components)
    unknown = [c for c in components if c not in MODEL_NAMES]
    if unknown:
        raise ValueError(f"unknown components {unknown}; choose from {MODEL_NAMES}")
    path = os.path.expanduser(str(path_or_id))
    fmt = detect_format(path)
    if fmt == "hub":
        path, fmt = _download(path), "diffusers"
    plans = _component_getters(fmt, path, preset, components)
    shardings = shardings or {}
    out = {}
    for name, (abstract, getters) in plans.items():
        placed = dict(flat_leaves(shardings[name])) if name in shardings else None
        values = []
        for p, a in flat_leaves(abstract):
            x = getters[p]()
            if x.shape != tuple(a.shape):  # defensive: the header check already covered this
                raise WeightsError(f"{path} [{name}]: {'/'.join(p)} converted to {x.shape}, "
                                   f"expected {tuple(a.shape)}")
            x = x.astype(a.dtype, copy=False)
            values.append((p, jax.device_put(x, placed[p]) if placed is not None else x))
            del x
        out[name] = unflatten(values)
        log.info("loaded %s from %s (%s, %d tensors)", name, path, fmt, len(values))
    return out


FROZEN = ("vae", "text_l", "text_g")
# fold_in index of each model's random init: fixed per name, so asking for a subset (the cache
# builder needs only the VAE) gives the same numbers as asking for all. "unet" (0) is the fresh
# UNet of a full fine-tune and the frozen base of a LoRA run; it is not in the FROZEN default.
_SEED_INDEX = {"unet": 0, "vae": 1, "text_l": 2, "text_g": 3}


def frozen_params(config, shardings=None, components=FROZEN) -> dict:
    """{name: params} of the frozen models (a subset of "vae", "text_l", "text_g", and "unet"
    for a LoRA run's base) of a run: the one source of frozen weights for the trainers, the
    cache builder, sample and export.

    `model.pretrained` set: loaded from it. Otherwise the seeded random init, the contract every
    user shares: init_params(name, preset, fold_in(PRNGKey(train.seed), i)) with i = 0 (unet),
    1 (vae), 2 (text_l), 3 (text_g). `config` is a ConfigDict or the plain dict saved in a
    checkpoint; `shardings` ({name: pytree of shardings}) places each leaf as it is made or
    loaded (second, so the trainers' positional `frozen_params(cfg, shardings)` calls keep
    working).
    """
    components = tuple(components)
    unknown = [c for c in components if c not in _SEED_INDEX]
    if unknown:
        raise ValueError(f"frozen_params: unknown components {unknown}; choose from "
                         f"{tuple(_SEED_INDEX)}")
    preset = config["model"]["preset"]
    shardings = shardings or {}
    pretrained = config["model"]["pretrained"]
    if pretrained:
        return load_pretrained(pretrained, preset, components, shardings)
    base = jax.random.PRNGKey(int(config["train"]["seed"]))
    return {name: build.init_params(name, preset, jax.random.fold_in(base, _SEED_INDEX[name]),
                                    out_shardings=shardings.get(name))
            for name in components}
