"""Weights out: a trained checkpoint as a diffusers folder, one SDXL .safetensors, or a LoRA.

    python -m sdxl_jax.export --workdir runs/nai3 --format single-file --out nai3.safetensors
    python -m sdxl_jax.export --workdir runs/nai3 --step 2000 --weights raw \
        --format diffusers --dtype bf16 --out nai3_diffusers/
    python -m sdxl_jax.export --workdir runs/lora --format lora --out style.safetensors
    python -m sdxl_jax.export --workdir runs/lora --format single-file --merge-lora --out m.safetensors

Every model comes as the run trained it (`runs.Run.params`, EMA weights by default): the UNet
from the checkpoint, the text encoders from it too when they trained (train.trainable
"unet+text"), the rest from the run's `model.pretrained` or, without it, the seeded random init
the trainer used (`weights.frozen_params`). A LoRA run (train.trainable "lora"):
- `--format lora`: its adapters in the kohya / A1111 / ComfyUI / Forge layout (lora_unet_*,
  lora_te1_*, lora_te2_*, lora_down / lora_up / alpha); `--format lora-diffusers`: the
  diffusers / PEFT layout (`pipe.load_lora_weights`). Both carry modelspec metadata (v-prediction,
  ZTSNR, rank, alpha, base model = model.pretrained or "random init"). LoKr: kohya layout only.
- `--format single-file` / `diffusers` need `--merge-lora`: the full model with the adapters
  merged in float32 (METHODS §14), several GB where the LoRA is MB, so it is never written by
  accident; `--merge-lora` on a run without adapters is an error.
The full-model outputs say what the model is, so other tools sample it right:
- diffusers: PyTorch-layout safetensors + configs, an EulerDiscreteScheduler configured for
  v-prediction, zero terminal SNR (when trained with it) and trailing timesteps.
- single file: the original SGM layout (ComfyUI / A1111 / Forge), with the empty marker tensors
  `v_pred` and `ztsnr` those tools look for, and modelspec metadata in the header.
Per-channel latent statistics (METHODS §10) go into the VAE config (diffusers' latents_mean /
latents_std with scaling_factor 1) and into the single file's metadata.
Everything is written to a temporary name and renamed when complete; an existing export at
--out is replaced only with --overwrite. A per_channel run's single file decodes wrongly in
other tools (they know only the 0.13025 scale; METHODS §16): it needs --allow-per-channel.
No pickle.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import logging
import os
import re
import shutil
import sys
import tempfile

import numpy as np

from sdxl_jax import cli, paths
from sdxl_jax.modelspec import modelspec_metadata as _modelspec

log = logging.getLogger("sdxl_jax.export")

DTYPES = {"fp16": np.float16, "bf16": None, "fp32": np.float32}  # bf16 filled lazily below
FORMATS = ("diffusers", "single-file", "lora", "lora-diffusers")
LORA_FORMATS = {"lora": "kohya", "lora-diffusers": "peft"}  # --format -> adapters.export_lora
_PIPELINE_CLASSES = {
    "unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "tokenizer_2": ("transformers", "CLIPTokenizer"),
    "scheduler": ("diffusers", "EulerDiscreteScheduler"),
}
_FLAX_ONLY_KWARGS = ("dtype", "use_memory_efficient_attention", "split_head_dim")


def _np_dtype(dtype: str):
    if dtype not in DTYPES:
        raise ValueError(f"unknown export dtype {dtype!r}; choose one of {tuple(DTYPES)}")
    if dtype == "bf16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(DTYPES[dtype])


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---- what the model is (from the run config) ---------------------------------------------------

def export_meta(config: dict, step: int, ckpt_meta: dict | None = None) -> dict:
    """The facts an export records, from a run config (dict) and the checkpoint's meta item.

    Keys: title, step, preset, pretrained, prediction_type ("v"), ztsnr (bool),
    num_train_timesteps, beta_start, beta_end, latent_normalization, scaling_factor,
    latents_mean / latents_std (per_channel only: the statistics the run trained with, from
    the checkpoint meta's latents.mean / latents.std, else the config's), resolution "WxH".
    """
    ckpt_meta = ckpt_meta or {}
    lat = config["latents"]
    meta = {
        "title": ckpt_meta.get("title") or f"sdxl_jax {config['model']['preset']} step {step}",
        "step": int(step), "preset": config["model"]["preset"],
        "pretrained": config["model"].get("pretrained", ""),
        "prediction_type": "v", "ztsnr": config["schedule"]["ztsnr"] != "off",
        "num_train_timesteps": config["schedule"]["num_train_timesteps"],
        "beta_start": config["schedule"]["beta_start"], "beta_end": config["schedule"]["beta_end"],
        "latent_normalization": lat["normalization"], "scaling_factor": lat["scale_factor"],
        "resolution": "x".join(str(v) for v in config["data"]["buckets"]["base"]),
    }
    if lat["normalization"] == "per_channel":
        saved = ckpt_meta.get("latents") or {}
        mean = saved.get("mean") or lat.get("mean")
        std = saved.get("std") or lat.get("std")
        if not mean or not std:
            raise ValueError("latents.normalization is per_channel but neither the checkpoint "
                             "meta (latents.mean / latents.std) nor the config holds the "
                             "statistics; the export would decode wrongly")
        meta["latents_mean"] = [float(v) for v in mean]
        meta["latents_std"] = [float(v) for v in std]
    return meta


def _check_params(params: dict, preset: str) -> None:
    from sdxl_jax.models import build
    from sdxl_jax.models.convert import check_tree
    from sdxl_jax.models.weights import cached_abstract_params

    missing = [n for n in build.MODEL_NAMES if n not in params]
    if missing:
        raise ValueError(f"export needs parameters for {build.MODEL_NAMES}; missing {missing}")
    for name in build.MODEL_NAMES:
        check_tree(f"{name} params", params[name], cached_abstract_params(name, preset))


def _host(x, dtype) -> np.ndarray:
    import jax
    return np.asarray(jax.device_get(x)).astype(dtype)


# ---- diffusers folder ------------------------------------------------------------------------

def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def _torch_weights(name: str, tree, path: str, dtype) -> None:
    from sdxl_jax.models.convert import flat_leaves, flax_to_torch, torch_leaves, torch_shape
    from sdxl_jax.models.safetensors_io import TensorSpec, write_safetensors

    leaves = torch_leaves(name, tree)
    by_key = {lf.key: lf for lf in leaves}
    values = {lf.key: x for lf, (_, x) in zip(leaves, flat_leaves(tree))}
    specs = [TensorSpec(lf.key, dtype, torch_shape(lf.kind, lf.shape)) for lf in leaves]
    write_safetensors(path, specs,
                      lambda k: flax_to_torch(by_key[k].kind, _host(values[k], dtype)),
                      {"format": "pt"})


def _component_configs(preset: str, meta: dict) -> dict:
    from sdxl_jax.models import presets
    from sdxl_jax.models.hf import CLIPTextConfig

    ver = _version("diffusers")
    unet = {"_class_name": "UNet2DConditionModel", "_diffusers_version": ver,
            **{k: v for k, v in presets.unet_config(preset).items()
               if k not in _FLAX_ONLY_KWARGS}}
    vae = {"_class_name": "AutoencoderKL", "_diffusers_version": ver,
           **presets.vae_config(preset), "force_upcast": True,
           "scaling_factor": meta.get("scaling_factor",
                                      presets.vae_config(preset)["scaling_factor"])}
    if meta.get("latent_normalization") == "per_channel":
        # diffusers decodes latents * std / scaling_factor + mean: with 1.0 that is METHODS §10
        vae.update(scaling_factor=1.0, latents_mean=meta["latents_mean"],
                   latents_std=meta["latents_std"])
    text = {}
    for sub, cfg, arch in (("text_encoder", presets.text_l_config(preset), "CLIPTextModel"),
                           ("text_encoder_2", presets.text_g_config(preset),
                            "CLIPTextModelWithProjection")):
        text[sub] = CLIPTextConfig(**cfg, architectures=[arch]).to_diff_dict()
    scheduler = {
        "_class_name": "EulerDiscreteScheduler", "_diffusers_version": ver,
        "num_train_timesteps": meta.get("num_train_timesteps", 1000),
        "beta_start": meta.get("beta_start", 0.00085), "beta_end": meta.get("beta_end", 0.012),
        "beta_schedule": "scaled_linear", "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": bool(meta.get("ztsnr", True)),
        "timestep_spacing": "trailing", "steps_offset": 0, "interpolation_type": "linear",
        "use_karras_sigmas": False, "final_sigmas_type": "zero",
    }
    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": ver,
             # the trainer drops captions to "" (encoded), so CFG's negative is encoded "" too
             "force_zeros_for_empty_prompt": False,
             **{k: list(v) for k, v in _PIPELINE_CLASSES.items()}}
    return {"unet": unet, "vae": vae, **text, "scheduler": scheduler, "model_index": index}


def check_out(out: str, fmt: str, overwrite: bool = False) -> None:
    """Refuse to replace an existing model unless `overwrite` (--overwrite), and never replace
    something that is not an export of the same format: fails before any work is done.
    First the temporaries of killed exports beside `out` are cleaned (remove_stale_temporaries)."""
    out = os.path.abspath(out)
    remove_stale_temporaries(os.path.dirname(out))
    if not os.path.lexists(out):
        return
    if fmt == "diffusers":
        if not os.path.isdir(out) or not os.path.isfile(os.path.join(out, "model_index.json")):
            raise FileExistsError(f"{out} exists and is not a diffusers export; not overwriting "
                                  "it: choose another --out")
    elif os.path.isdir(out):
        raise IsADirectoryError(f"{out} is a directory; a single-file export needs a "
                                ".safetensors file path")
    if not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite (overwrite=True) to "
                              "replace it, or choose another --out")


# what an export writes beside its --out before renaming it into place, tagged with its PID:
# `X.safetensors.tmp-PID` (a file being written), `.X.tmp-PID/` and `.X.old-PID/` (a diffusers
# folder being staged, and the one it replaces for the instant of the swap)
_TMP_FILE = re.compile(r"^(.+\.safetensors)\.tmp-(\d+)$")
_TMP_DIR = re.compile(r"^\.(.+)\.(tmp|old)-(\d+)$")


def remove_stale_temporaries(folder: str) -> None:
    """Remove what killed exports left in `folder`: temporaries of PIDs that no process on this
    host has any more. A replaced diffusers folder whose swap was cut short, with nothing at its
    own name, is put back instead."""
    if not os.path.isdir(folder):
        return
    stale = []  # (order, path, name it stands for, kind, pid): restores before removals
    for n in sorted(os.listdir(folder)):
        path = os.path.join(folder, n)
        f, d = _TMP_FILE.match(n), _TMP_DIR.match(n)
        if f and os.path.isfile(path) and not _alive(int(f.group(2))):
            stale.append((1, path, f.group(1), "tmp", f.group(2)))
        elif d and os.path.isdir(path) and not _alive(int(d.group(3))):
            stale.append((0 if d.group(2) == "old" else 1, path, d.group(1), d.group(2), d.group(3)))
    for _, path, name, kind, pid in sorted(stale):
        home = os.path.join(folder, name)
        if kind == "old" and not os.path.lexists(home):
            os.replace(path, home)
            log.warning("restored %s from %s: an export (pid %s) was killed while replacing it",
                        home, path, pid)
        else:
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            log.info("removed %s, left by an export (pid %s) that is no longer running", path, pid)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _atomic_dir(out: str):
    """(staging dir, commit()) — commit swaps the finished folder into place."""
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)

    def commit():
        old = None
        if os.path.exists(out):
            old = os.path.join(parent, f".{os.path.basename(out)}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(staging, out)
        if old:
            shutil.rmtree(old)
    return staging, commit


def export_diffusers(params: dict, preset: str, out: str, dtype: str = "fp16",
                     meta: dict | None = None, tokenizers=None, overwrite: bool = False) -> str:
    """Write a diffusers StableDiffusionXLPipeline folder; returns its path.

    params: {"unet", "vae", "text_l", "text_g": Flax param trees}. tokenizers: (CLIP-L, bigG)
    CLIPTokenizers; default `get_tokenizers(preset, meta["pretrained"])`. An existing export at
    `out` is replaced only with `overwrite` (swapped in once the new one is complete).
    """
    from sdxl_jax.models.tokenizer import get_tokenizers

    check_out(out, "diffusers", overwrite)
    meta = dict(meta or {})
    np_dtype = _np_dtype(dtype)
    _check_params(params, preset)
    if tokenizers is None:
        try:
            tokenizers = get_tokenizers(preset, meta.get("pretrained", ""))
        except OSError as e:
            raise OSError(f"the export needs the run's tokenizers: {e}. Pass a diffusers folder "
                          "holding tokenizer/ and tokenizer_2/ (--tokenizers)") from e
    configs = _component_configs(preset, meta)
    staging, commit = _atomic_dir(out)
    try:
        files = {"unet": ("unet", "diffusion_pytorch_model.safetensors"),
                 "vae": ("vae", "diffusion_pytorch_model.safetensors"),
                 "text_l": ("text_encoder", "model.safetensors"),
                 "text_g": ("text_encoder_2", "model.safetensors")}
        for name, (sub, fname) in files.items():
            os.makedirs(os.path.join(staging, sub))
            _write_json(os.path.join(staging, sub, "config.json"), configs[sub])
            _torch_weights(name, params[name], os.path.join(staging, sub, fname), np_dtype)
        os.makedirs(os.path.join(staging, "scheduler"))
        _write_json(os.path.join(staging, "scheduler", "scheduler_config.json"),
                    configs["scheduler"])
        for sub, tok in zip(("tokenizer", "tokenizer_2"), tokenizers):
            tok.save_pretrained(os.path.join(staging, sub))
        _write_json(os.path.join(staging, "model_index.json"), configs["model_index"])
        _write_json(os.path.join(staging, "sdxl_jax_export.json"), meta)
        commit()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("wrote diffusers folder %s", out)
    return out


# ---- single file -----------------------------------------------------------------------------

def single_file_layout(params: dict, preset: str, dtype, ztsnr: bool = True) -> list:
    """[(TensorSpec, producer)] of the SGM single file, from trees of arrays or of
    ShapeDtypeStructs (producers are only called for real arrays): the key/shape layout can be
    checked on the abstract full-size SDXL without allocating it."""
    from sdxl_jax.models import sgm
    from sdxl_jax.models.convert import flat_leaves, flax_to_torch, torch_leaves, torch_shape
    from sdxl_jax.models.safetensors_io import TensorSpec

    dtype = np.dtype(dtype)
    layout = []
    for name in ("unet", "vae", "text_l", "text_g"):
        tree = params[name]
        leaves = torch_leaves(name, tree)
        by_key = {lf.key: (lf, x) for lf, (_, x) in zip(leaves, flat_leaves(tree))}
        tshapes = {lf.key: torch_shape(lf.kind, lf.shape) for lf in leaves}
        for t in sgm.sgm_tensors(name, preset, [lf.key for lf in leaves]):
            def produce(t=t, by_key=by_key):
                arrays = [flax_to_torch(by_key[k][0].kind, _host(by_key[k][1], dtype))
                          for k in t.sources]
                return sgm.to_sgm(t, arrays)
            layout.append((TensorSpec(t.key, dtype, sgm.sgm_shape(t, tshapes)), produce))
        for key, value in sgm.optional_tensors(name, tshapes, dtype).items():
            layout.append((TensorSpec(key, value.dtype, value.shape), lambda v=value: v))
    markers = [sgm.V_PRED_KEY] + ([sgm.ZTSNR_KEY] if ztsnr else [])
    for key in markers:  # empty tensors: their presence is the message
        layout.append((TensorSpec(key, dtype, (0,)), lambda: np.zeros((0,), dtype)))
    return layout


def per_channel_problem(meta: dict) -> str | None:
    """Why a single file of this run would decode wrongly in other tools, or None (METHODS §16)."""
    if meta.get("latent_normalization") != "per_channel":
        return None
    return ("this run trained with latents.normalization=per_channel (mean "
            f"{meta.get('latents_mean')}, std {meta.get('latents_std')}); ComfyUI, A1111/Forge "
            "and diffusers' from_single_file decode a single file's latents with the 0.13025 "
            "scale only, so its images come out wrong there (the statistics can only travel as "
            "metadata: sdxl_jax.latents_mean / sdxl_jax.latents_std)")


def check_per_channel(meta: dict, allow: bool) -> str | None:
    """ValueError for a per_channel run's single file unless `allow`; else the problem or None."""
    problem = per_channel_problem(meta)
    if problem and not allow:
        raise ValueError(f"{problem}. Export --format diffusers (its VAE config carries the "
                         "statistics), or pass --allow-per-channel (allow_per_channel=True) to "
                         "write the single file anyway")
    return problem


def export_single_file(params: dict, preset: str, out: str, dtype: str = "fp16",
                       meta: dict | None = None, overwrite: bool = False,
                       allow_per_channel: bool = False) -> str:
    """Write one SGM-layout SDXL .safetensors (UNet, VAE, both text encoders); returns its path.

    An existing file at `out` is replaced only with `overwrite`. A per_channel run is refused
    unless `allow_per_channel` (then written with a warning, its statistics in the metadata).
    """
    from sdxl_jax.models.safetensors_io import write_safetensors

    check_out(out, "single-file", overwrite)
    meta = dict(meta or {})
    problem = check_per_channel(meta, allow_per_channel)
    if problem:
        log.warning("WARNING: %s. Writing %s anyway (--allow-per-channel): decode it with "
                    "sdxl_jax or the diffusers export, not with ComfyUI/A1111", problem, out)
    _check_params(params, preset)
    layout = single_file_layout(params, preset, _np_dtype(dtype), bool(meta.get("ztsnr", True)))
    producers = {spec.key: fn for spec, fn in layout}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_safetensors(out, [spec for spec, _ in layout], lambda k: producers[k](),
                      _modelspec(preset, meta))
    log.info("wrote single file %s (%d tensors)", out, len(layout))
    return out


# ---- checkpoint restore + CLI ------------------------------------------------------------------

def restore_unet(workdir: str, step: int | None, weights: str | None):
    """(unet params as numpy, config dict, meta dict, step, weights used) of a run
    (`runs.open_run`: the newest readable step unless `step`), read on the host without target
    shardings (any device count)."""
    from sdxl_jax.runs import open_run

    run = open_run(workdir, step)
    weights = weights or run.default_weights()
    unet = run.params("unet", weights, on_host=True)
    return unet, run.config, run.meta, run.step, weights


def restore_vae(workdir: str, step: int | None, weights: str | None = None) -> dict:
    """The full VAE of a decoder finetune run (--vae-workdir), as numpy: its source encoder and
    trained decoder (`runs.Run.params("vae")`, encoder fingerprint checked)."""
    from sdxl_jax.runs import VAE_TASK, open_run
    run = open_run(workdir, step)
    if run.task != VAE_TASK:  # its "vae" would be the frozen one: no substitute for a finetune
        raise ValueError(f"--vae-workdir {workdir} is not a VAE decoder run (its config has task="
                         f"{run.task!r}); give the workdir of configs/vae_decoder.py")
    return run.params("vae", weights, on_host=True)


def export_run_lora(run, out: str, fmt: str = "lora", dtype: str = "fp16",
                    weights: str | None = None, overwrite: bool = False) -> str:
    """Write the adapters of a LoRA run (`runs.Run`) as one .safetensors: `fmt` "lora" (kohya)
    or "lora-diffusers" (PEFT), with the run's modelspec metadata; returns the path."""
    from sdxl_jax.adapters import export_lora

    if fmt not in LORA_FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; choose one of {tuple(LORA_FORMATS)}")
    check_out(out, "single-file", overwrite)
    weights = weights or run.default_weights()
    adapters, plan = run.adapters(weights)
    meta = lora_export_meta(run, weights)
    export_lora(out, adapters, plan, meta["preset"], LORA_FORMATS[fmt], _np_dtype(dtype), meta)
    log.info("wrote %s LoRA %s (%d layers)", LORA_FORMATS[fmt], out,
             sum(len(t) for t in plan.values()))
    return out


def lora_export_meta(run, weights: str) -> dict:
    """export_meta of a LoRA run, its base model named ("random init" without model.pretrained:
    the adapters then only fit the seeded init of the run's train.seed)."""
    meta = export_meta(run.config, run.step, run.meta)
    if not run.meta.get("title"):
        meta["title"] = f"sdxl_jax LoRA {meta['preset']} step {run.step}"
    meta["pretrained"] = meta["pretrained"] or "random init"
    meta["weights"] = weights
    return meta


def run_params(run, weights: str | None = None, merge_lora: bool = False) -> dict:
    """{"unet", "vae", "text_l", "text_g"} of a run as host numpy, as it trained them; a LoRA
    run's merged weights only with `merge_lora` (the CLI's --merge-lora)."""
    from sdxl_jax.models import build

    mode = run.trainable
    if mode == "lora" and not merge_lora:
        raise ValueError(f"{run.directory} is a LoRA run: export its adapters with --format lora "
                         "(kohya, ComfyUI/A1111/Forge) or lora-diffusers, or pass --merge-lora to "
                         "write the full model with the adapters merged into its base")
    if mode != "lora" and merge_lora:
        raise ValueError(f"--merge-lora: {run.directory} trained {mode!r} (train.trainable), it "
                         "has no adapters to merge; leave --merge-lora out")
    params = run.all_params(weights, on_host=True)
    return {n: params[n] for n in build.MODEL_NAMES}


def _parse(argv):
    p = cli.ArgumentParser(prog="python -m sdxl_jax.export", description=__doc__.split(
        "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="training run directory (holds checkpoints/)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--weights", choices=("ema", "raw"), default=None,
                   help="EMA (default when the run kept one) or raw trained params")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="diffusers folder, SGM single file (ComfyUI/A1111/Forge), or a LoRA run's "
                        "adapters: lora (kohya layout) / lora-diffusers (PEFT layout)")
    p.add_argument("--merge-lora", action="store_true",
                   help="a LoRA run as a full diffusers / single-file model: its base with the "
                        "adapters merged in float32 (required to be explicit for LoRA runs)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp16")
    p.add_argument("--out", required=True,
                   help="output folder (diffusers) or .safetensors file (single-file, LoRA)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing export at --out (default: refuse)")
    p.add_argument("--allow-per-channel", action="store_true",
                   help="write a single file of a latents.normalization=per_channel run anyway "
                        "(other tools decode it wrongly; the statistics go into its metadata)")
    p.add_argument("--tokenizers", default="",
                   help="diffusers folder with tokenizer/ and tokenizer_2/ (diffusers format; "
                        "default: the run's model.pretrained, or the generated tiny vocabulary)")
    p.add_argument("--vae-workdir", default="",
                   help="a VAE decoder finetune run (configs/vae_decoder.py) whose decoder replaces "
                        "the frozen VAE's in the export")
    p.add_argument("--vae-step", type=int, default=None, help="its checkpoint step (default: latest)")
    p.add_argument("--vae-weights", choices=("ema", "raw"), default="ema")
    return p.parse_args(argv)


@cli.entry_point  # user errors: one line `error: …`; --debug shows the traceback
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    if paths.is_remote(args.out):
        return _export_remote(argv, args.out, args.overwrite)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from sdxl_jax.models.hf import block_torch
    block_torch()
    from sdxl_jax.runs import open_run

    lora_fmt = args.format in LORA_FORMATS
    if args.format != "diffusers" and not args.out.endswith(".safetensors"):
        raise ValueError(f"--out {args.out!r}: a {args.format} export must end in .safetensors")
    if lora_fmt and (args.merge_lora or args.vae_workdir):
        raise ValueError(f"--format {args.format} writes the adapters alone; --merge-lora and "
                         "--vae-workdir apply to --format single-file / diffusers")
    check_out(args.out, "diffusers" if args.format == "diffusers" else "single-file",
              args.overwrite)  # before reading the checkpoint
    run = open_run(args.workdir, args.step)
    which = args.weights or run.default_weights()
    if lora_fmt:
        export_run_lora(run, args.out, args.format, args.dtype, which, args.overwrite)
        print(f"exported the LoRA of step {run.step} ({which} weights) of {args.workdir} to "
              f"{args.out} ({args.format})")
        return 0
    config, step = run.config, run.step
    preset = config["model"]["preset"]
    meta = export_meta(config, step, run.meta)
    meta.update(weights=which, trainable=run.trainable)
    if run.trainable == "lora" and args.merge_lora:
        meta["merged_lora"] = dataclasses.asdict(run.lora_config())
    if args.format == "single-file":
        check_per_channel(meta, args.allow_per_channel)  # before loading the frozen models
    params = run_params(run, which, args.merge_lora)
    if args.vae_workdir:
        params["vae"] = restore_vae(args.vae_workdir, args.vae_step, args.vae_weights)
    if args.format == "diffusers":
        tokenizers = None
        if args.tokenizers:
            from sdxl_jax.models.tokenizer import get_tokenizers
            tokenizers = get_tokenizers("sdxl", args.tokenizers)
        export_diffusers(params, preset, args.out, args.dtype, meta, tokenizers,
                         overwrite=args.overwrite)
    else:
        export_single_file(params, preset, args.out, args.dtype, meta,
                           overwrite=args.overwrite, allow_per_channel=args.allow_per_channel)
    print(f"exported step {step} ({which} weights) of {args.workdir} to {args.out}")
    return 0


def _export_remote(argv: list, out: str, overwrite: bool) -> int:
    """--out gs://…: the export is written to a local folder as usual (safetensors are written
    with seeks), then uploaded file by file; the same refusal to replace without --overwrite."""
    if paths.exists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it, or choose "
                              "another --out")
    with tempfile.TemporaryDirectory(prefix="sdxl_jax_export_") as tmp:
        local = os.path.join(tmp, os.path.basename(out.rstrip("/")))
        main.__wrapped__([*argv, "--out", local])  # the last --out wins
        paths.upload_tree(local, out)
    print(f"uploaded {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
