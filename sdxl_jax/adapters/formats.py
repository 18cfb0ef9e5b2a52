"""Adapter files: the kohya / A1111 / ComfyUI / Forge layout and the diffusers / PEFT layout.

kohya (METHODS §14): `<prefix><module, dots → _>.lora_down.weight` (A), `.lora_up.weight`
(B), `.alpha` (scalar), LoKr `.lokr_w1`, `.lokr_w2_a`, `.lokr_w2_b`, `.alpha`. Prefixes
`lora_unet_` + the SGM (LDM) UNet module name (sd-scripts trains SDXL on the SGM UNet, and
ComfyUI maps exactly those names), `lora_te1_` / `lora_te2_` + the transformers CLIP module name
(CLIP-L / bigG; both in transformers naming, also for bigG). Tensors in PyTorch layouts, which
is how the adapter tree already holds them (lora.py), so writing is a rename.

diffusers / PEFT: `unet.<diffusers module>.lora_A.weight` (A) / `.lora_B.weight` (B),
`text_encoder.` / `text_encoder_2.` + the transformers module. PEFT files carry no per-layer
alpha (diffusers then uses lora_alpha = r, i.e. scale 1), so α/r is folded into lora_B on
export and a PEFT file imports with α = r; ΔW is the same either way. LoKr has no PEFT layout
here (diffusers' loader does not read LyCORIS LoKr): use the kohya layout for it.

Names come from the existing converters (models/convert.py: Flax path → PyTorch key,
models/sgm.py: diffusers → SGM), driven by the plan alone, so the key list of a full-size
SDXL adapter is enumerated from abstract shapes without allocating anything.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from sdxl_jax.adapters.lora import MODELS, Plan, Target, adapter_shapes, _get
from sdxl_jax.models import sgm
from sdxl_jax.models.convert import flat_leaves, torch_leaves, unflatten
from sdxl_jax.models.safetensors_io import (SafetensorsFile, TensorSpec, WeightsError,
                                            write_safetensors)

KOHYA_PREFIX = {"unet": "lora_unet_", "text_l": "lora_te1_", "text_g": "lora_te2_"}
PEFT_PREFIX = {"unet": "unet.", "text_l": "text_encoder.", "text_g": "text_encoder_2."}
_KOHYA_LEAVES = {"lora": ("lora_down", "lora_up"), "lokr": ("lokr_w1", "lokr_w2_a", "lokr_w2_b")}
_PEFT_LEAVES = {"lora_down": "lora_A", "lora_up": "lora_B"}


# ---- names -------------------------------------------------------------------------------------

def _kernel_tree(shapes: dict) -> dict:
    """{module path: Flax kernel shape} -> a tree of ShapeDtypeStruct kernels (for the converters)."""
    return unflatten([(path + ("kernel",), jax.ShapeDtypeStruct(tuple(s), np.float32))
                      for path, s in shapes.items()])


def torch_module_names(name: str, shapes: dict) -> dict:
    """{module path: PyTorch diffusers / transformers module name} for kernels of model `name`."""
    leaves = torch_leaves(name, _kernel_tree(shapes))
    return {lf.path[:-1]: lf.key[:-len(".weight")] for lf in leaves}


def kohya_module_names(name: str, preset: str, shapes: dict) -> dict:
    """{module path: kohya lora name without the leaf suffix}, e.g. lora_unet_input_blocks_4_1_…"""
    torch_names = torch_module_names(name, shapes)
    if name == "unet":
        paths = list(torch_names)
        tensors = sgm.sgm_tensors("unet", preset, [torch_names[p] + ".weight" for p in paths])
        head, tail = len(sgm.PREFIX["unet"]), len(".weight")
        modules = {p: t.key[head:-tail] for p, t in zip(paths, tensors)}
    else:
        modules = torch_names
    return {p: KOHYA_PREFIX[name] + m.replace(".", "_") for p, m in modules.items()}


# ---- writing -----------------------------------------------------------------------------------

def _host(x, dtype) -> np.ndarray:
    return np.asarray(jax.device_get(x)).astype(dtype)


def kohya_layout(adapters, plan: Plan, preset: str, dtype=np.float16) -> list:
    """[(TensorSpec, producer)] of the kohya file. `adapters` may hold ShapeDtypeStructs (or be
    None): the key list is complete from the plan; producers are only called for arrays."""
    dtype = np.dtype(dtype)
    layout = []
    for name, targets in plan.items():
        names = kohya_module_names(name, preset, {p: t.shape for p, t in targets.items()})
        for path, t in targets.items():
            for leaf, shape in adapter_shapes(t).items():
                def produce(name=name, path=path, leaf=leaf):
                    return _host(_get(adapters[name], path)[leaf], dtype)
                layout.append((TensorSpec(f"{names[path]}.{leaf}" + (
                    ".weight" if t.algo == "lora" else ""), dtype, shape), produce))
            alpha = np.asarray(t.alpha, np.float32)
            layout.append((TensorSpec(f"{names[path]}.alpha", alpha.dtype, ()),
                           lambda a=alpha: a))
    return layout


def peft_layout(adapters, plan: Plan, dtype=np.float16) -> list:
    """[(TensorSpec, producer)] of the diffusers / PEFT file (α/r folded into lora_B)."""
    dtype = np.dtype(dtype)
    layout = []
    for name, targets in plan.items():
        names = torch_module_names(name, {p: t.shape for p, t in targets.items()})
        for path, t in targets.items():
            if t.algo != "lora":
                raise ValueError(f"{name} {names[path]}: {t.algo} has no diffusers/PEFT layout; "
                                 "export it with --format lora (kohya layout)")
            for leaf, shape in adapter_shapes(t).items():
                def produce(name=name, path=path, leaf=leaf, t=t):
                    x = np.asarray(jax.device_get(_get(adapters[name], path)[leaf]), np.float32)
                    return (x * np.float32(t.scale) if leaf == "lora_up" else x).astype(dtype)
                key = f"{PEFT_PREFIX[name]}{names[path]}.{_PEFT_LEAVES[leaf]}.weight"
                layout.append((TensorSpec(key, dtype, shape), produce))
    return layout


PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


def peft_config_metadata(plan: Plan) -> dict:
    """diffusers' `lora_adapter_metadata` header entry: the LoraConfig of each component
    ("unet.r", "unet.lora_alpha", … as diffusers' save_lora_weights packs it). Without it
    diffusers guesses lora_alpha = the first layer's rank for every layer, which is wrong for
    mixed ranks (LoCon's conv_rank); with α/r folded into lora_B, alpha = r for each layer."""
    packed = {}
    for name, targets in plan.items():
        names = torch_module_names(name, {p: t.shape for p, t in targets.items()})
        ranks = {names[p]: t.rank for p, t in targets.items()}
        common = max(set(ranks.values()), key=list(ranks.values()).count)
        odd = {m: r for m, r in ranks.items() if r != common}
        cfg = {"r": common, "lora_alpha": common, "rank_pattern": odd, "alpha_pattern": odd,
               "target_modules": sorted(ranks), "use_dora": False, "lora_bias": False}
        prefix = PEFT_PREFIX[name].rstrip(".")
        packed.update({f"{prefix}.{k}": v for k, v in cfg.items()})
    return {PEFT_METADATA_KEY: json.dumps(packed, sort_keys=True)}


def lora_metadata(plan: Plan, preset: str, meta: dict | None = None) -> dict:
    """Header metadata: the run's modelspec (v-prediction, ZTSNR, base model) as for the single
    file, marked as an adapter, plus the sd-scripts `ss_*` keys tools show (rank, alpha)."""
    from sdxl_jax.modelspec import modelspec_metadata as _modelspec

    meta = dict(meta or {})
    md = _modelspec(preset, meta)
    every = [t for targets in plan.values() for t in targets.values()]
    conv = [t for t in every if t.kind == "conv" and t.shape[0] * t.shape[1] > 1]
    # ss_network_dim / alpha are the Linear (and 1×1) rank; the k×k convs' go in conv_dim
    first = next((t for t in every if t not in conv), every[0])
    md.update({
        "modelspec.architecture": md["modelspec.architecture"] + "/lora",
        "modelspec.title": meta.get("title", "sdxl_jax LoRA"),
        "ss_network_module": "networks.lora" if first.algo == "lora" else "lycoris.kohya",
        "ss_network_dim": str(first.rank), "ss_network_alpha": str(first.alpha),
        "ss_network_args": json.dumps({"algo": first.algo, **(
            {"conv_dim": str(conv[0].rank), "conv_alpha": str(conv[0].alpha)} if conv else {})}),
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_v_parameterization": "True",
        "ss_zero_terminal_snr": str(bool(meta.get("ztsnr", True))),
        "ss_sd_model_name": str(meta.get("pretrained", "")),
        "sdxl_jax.adapter_models": json.dumps(list(plan)),
    })
    return md


def export_lora(path: str, adapters, plan: Plan, preset: str, fmt: str = "kohya",
                dtype=np.float16, meta: dict | None = None) -> str:
    """Write `adapters` as one .safetensors, fmt "kohya" or "peft"; returns the path."""
    metadata = lora_metadata(plan, preset, meta)
    if fmt == "kohya":
        layout = kohya_layout(adapters, plan, preset, dtype)
    elif fmt == "peft":
        layout = peft_layout(adapters, plan, dtype)
        metadata.update(peft_config_metadata(plan))
    else:
        raise ValueError(f"unknown LoRA layout {fmt!r}; choose kohya or peft")
    producers = {spec.key: fn for spec, fn in layout}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_safetensors(path, [s for s, _ in layout], lambda k: producers[k](), metadata)
    return path


# ---- reading -----------------------------------------------------------------------------------

def _all_kernels(name: str, preset: str) -> dict:
    from sdxl_jax.models.weights import cached_abstract_params
    return {p[:-1]: tuple(x.shape) for p, x in flat_leaves(cached_abstract_params(name, preset))
            if p[-1] == "kernel"}


def _module_index(preset: str, models, fmt: str) -> dict:
    """file module name -> (model, module path, Flax kernel shape), for every kernel."""
    index = {}
    for name in models:
        shapes = _all_kernels(name, preset)
        if fmt == "kohya":
            maps = [kohya_module_names(name, preset, shapes)]
            if name == "unet":  # kohya files may also name the UNet in diffusers terms
                maps.append({p: KOHYA_PREFIX[name] + m.replace(".", "_")
                             for p, m in torch_module_names(name, shapes).items()})
        else:
            maps = [{p: PEFT_PREFIX[name] + m
                     for p, m in torch_module_names(name, shapes).items()}]
        for names in maps:
            for p, module in names.items():
                index.setdefault(module, (name, p, shapes[p]))
    return index


def _split(key: str, fmt: str) -> tuple[str, str]:
    """file key -> (module name, leaf name in our tree or "alpha")."""
    if fmt == "kohya":
        module, _, rest = key.partition(".")
        leaf = rest[:-len(".weight")] if rest.endswith(".weight") else rest
        return module, leaf
    for ours, theirs in _PEFT_LEAVES.items():
        suffix = f".{theirs}.weight"
        if key.endswith(suffix):
            return key[:-len(suffix)], ours
    return key, ""


def _peft_alpha(cfg: dict, name: str, module: str, rank: int) -> float:
    """lora_alpha of one PEFT layer: its alpha_pattern entry, else the component's lora_alpha,
    else r (scale 1, what diffusers assumes for a file without metadata)."""
    prefix = PEFT_PREFIX[name].rstrip(".")
    inner = module[len(PEFT_PREFIX[name]):]
    pattern = cfg.get(f"{prefix}.alpha_pattern") or {}
    if inner in pattern:
        return float(pattern[inner])
    return float(cfg.get(f"{prefix}.lora_alpha", rank))


def detect_layout(keys) -> str:
    keys = list(keys)
    if keys and all(k.startswith(tuple(KOHYA_PREFIX.values())) for k in keys):
        return "kohya"
    if keys and all(k.startswith(tuple(PEFT_PREFIX.values())) and (".lora_A." in k or ".lora_B."
                                                                   in k) for k in keys):
        return "peft"
    raise WeightsError("not an SDXL LoRA file: keys must all start with lora_unet_ / lora_te1_ / "
                       f"lora_te2_ (kohya) or unet. / text_encoder(_2). with lora_A/lora_B "
                       f"(diffusers/PEFT); first keys {keys[:3]}")


def read_lora(path: str, preset: str) -> tuple[dict, Plan]:
    """(adapter tree of float32 numpy arrays, plan) of a kohya or PEFT .safetensors, checked
    against the SDXL `preset`'s layer shapes before anything is used (resume / sampling)."""
    st = SafetensorsFile(path)
    fmt = detect_layout(st.tensors)
    index = _module_index(preset, MODELS, fmt)
    peft_cfg = {}
    if fmt == "peft" and PEFT_METADATA_KEY in st.metadata:
        try:
            peft_cfg = json.loads(st.metadata[PEFT_METADATA_KEY])
        except json.JSONDecodeError as e:
            raise WeightsError(f"{path}: header {PEFT_METADATA_KEY} is not JSON ({e})") from e
    groups: dict = {}
    for key in st.tensors:
        module, leaf = _split(key, fmt)
        if module not in index:
            raise WeightsError(f"{path}: {key!r} names no layer of the SDXL {preset} UNet or text "
                               "encoders (an SD 1.x / other-architecture LoRA?)")
        groups.setdefault(module, {})[leaf] = key
    plan: Plan = {}
    values = {}
    for module, leaves in groups.items():
        name, p, kshape = index[module]
        algo = "lokr" if "lokr_w1" in leaves else "lora"
        missing = [leaf for leaf in _KOHYA_LEAVES[algo] if leaf not in leaves]
        unknown = [leaf for leaf in leaves if leaf not in _KOHYA_LEAVES[algo] + ("alpha",)]
        if missing or unknown:
            raise WeightsError(f"{path}: {module}: missing {missing}, unsupported {unknown} "
                               "(only LoRA/LoCon lora_down/lora_up and LoKr lokr_w1/w2_a/w2_b)")
        arrays = {leaf: st.get(k).astype(np.float32) for leaf, k in leaves.items()
                  if leaf != "alpha"}
        if algo == "lokr":
            (a, b), (c, rank), (_, d) = (arrays[k].shape for k in _KOHYA_LEAVES["lokr"])
            factors = (a, b, c, d)
        else:
            rank, factors = arrays["lora_down"].shape[0], ()
        if "alpha" in leaves:
            alpha = float(st.get(leaves["alpha"]).reshape(()))
        else:
            alpha = _peft_alpha(peft_cfg, name, module, int(rank))
        kind = "linear" if len(kshape) == 2 else "conv"
        t = Target(algo, kind, kshape, int(rank), alpha, factors)
        want = adapter_shapes(t)
        for leaf, x in arrays.items():
            if x.shape != want[leaf]:
                raise WeightsError(f"{path}: {leaves[leaf]} has shape {list(x.shape)}, the "
                                   f"{preset} layer needs {list(want[leaf])}")
        if p in plan.get(name, {}):
            raise WeightsError(f"{path}: {module} is stored twice (SGM and diffusers names)")
        plan.setdefault(name, {})[p] = t
        values.setdefault(name, []).extend((p + (leaf,), x) for leaf, x in arrays.items())
    plan = {name: dict(sorted(plan[name].items())) for name in MODELS if name in plan}
    return {name: unflatten(values[name]) for name in plan}, plan


# the factor whose product with the others is ΔW/scale: rescaling it alone rescales ΔW
_SCALED_LEAF = {"lora": "lora_up", "lokr": "lokr_w1"}


def read_lora_init(path: str, preset: str, plan: Plan, key: str = "model.lora_init") -> dict:
    """The adapter tree of a LoRA file to start a run of `plan` from, with the ΔW it means.

    A layer whose file alpha differs from the run's (a PEFT file records lora_alpha = r with
    α/r folded into lora_B, so our own lora-diffusers export of an α ≠ r run is one) is read
    with its scaled factor multiplied by file scale / run scale: the same ΔW under the run's
    alpha. Any other difference (layers, algo, rank, factors) is one error naming a layer with
    the file's and the run's settings."""
    tree, theirs = read_lora(path, preset)
    mine = {(m, p): t for m, targets in plan.items() for p, t in targets.items()}
    found = {(m, p): t for m, targets in theirs.items() for p, t in targets.items()}
    differ = []
    for k in sorted(set(mine) | set(found)):
        run, file = mine.get(k), found.get(k)
        if run == file:
            continue
        if run is None or file is None or file._replace(alpha=run.alpha) != run:
            differ.append((k, file, run))
            continue
        node = _get(tree[k[0]], k[1])
        leaf = _SCALED_LEAF[run.algo]
        node[leaf] = (node[leaf] * np.float32(file.scale / run.scale)).astype(np.float32)
    if differ:
        (m, p), file, run = differ[0]
        show = lambda t: "not adapted" if t is None else f"{t.algo} rank {t.rank} alpha {t.alpha:g}"  # noqa: E731
        raise ValueError(f"{key}={path!r}: {len(differ)} adapted layers differ from this run's "
                         f"lora.* settings, e.g. {m}/{'/'.join(p)}: file {show(file)}, run "
                         f"{show(run)}; set lora.algo / rank / models / conv / targets to match "
                         "the file")
    return tree
