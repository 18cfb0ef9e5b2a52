"""The UNet task (NAI-v3 recipe): the trained UNet, the frozen text encoders, the latent-cache
stages, previews and validation, as a `loop.Task`."""
from __future__ import annotations

import contextlib
import logging
import os

import jax
import jax.numpy as jnp

from sdxl_jax import parallel, paths
from sdxl_jax.config_sections import offline_preset
from sdxl_jax.train import optim
from sdxl_jax.train.common import config_json, demo_images, package_versions
from sdxl_jax.train.loop import Stage, Task
from sdxl_jax.train.program import ProgramSpec, cached_program
from sdxl_jax.train.state import init_state
from sdxl_jax.train.step import NUM_T_BINS, StepConfig, unet_grad_fn
from sdxl_jax.train.trainable import frozen_values, initial_params

log = logging.getLogger("sdxl_jax.train")

FROZEN = ("text_l", "text_g")  # what the step reads besides the UNet (the VAE is for previews)


# ---------------------------------------------------------------------------------------------
# The program (config only: the trainer, memory_report, bench and the tests build it here)
# ---------------------------------------------------------------------------------------------
def batch_spec(cfg):
    """The loader's batch contract for a (rows, height, width) pixel bucket."""
    from sdxl_jax.models import SEQ_LEN
    chunks, masked = int(cfg.text.max_chunks), bool(cfg.loss.masked)
    from sdxl_jax.data.sources import source_names
    sources = len(source_names(cfg))

    def spec(rows: int, height: int, width: int) -> dict:
        ids = jax.ShapeDtypeStruct((rows, chunks * SEQ_LEN), jnp.int32)
        out = {"latents": jax.ShapeDtypeStruct((rows, height // 8, width // 8, 4), jnp.float32),
               "time_ids": jax.ShapeDtypeStruct((rows, 6), jnp.float32),
               "loss_weight": jax.ShapeDtypeStruct((rows,), jnp.float32),
               "input_ids_l": ids, "input_ids_g": ids}
        if masked:  # loss.masked: the loader's per-latent-position mask (METHODS §15)
            out["loss_mask"] = jax.ShapeDtypeStruct((rows, height // 8, width // 8, 1), jnp.float32)
        if sources > 1:  # data.sources: each row's source, for the per-source loss
            out["source_onehot"] = jax.ShapeDtypeStruct((rows, sources), jnp.float32)
        return out
    return spec


def program_spec(cfg, latent_mean=None, latent_std=None, total_steps: int | None = None,
                 unet=None, abstract_unet=None) -> ProgramSpec:
    """The UNet task's step. `unet` / `abstract_unet` replace the preset's UNet (bench sizes)."""
    return _spec(cfg, describe_trainable(cfg, abstract_unet, total_steps), latent_mean, latent_std, unet)


def describe_trainable(cfg, abstract_unet=None, total_steps: int | None = None):
    from sdxl_jax.models.weights import cached_abstract_params
    from sdxl_jax.train.trainable import describe
    abstract_unet = abstract_unet if abstract_unet is not None else cached_abstract_params("unet", cfg.model.preset)
    return describe(cfg, abstract_unet, total_steps)


def _spec(cfg, tr, latent_mean=None, latent_std=None, unet=None) -> ProgramSpec:
    from sdxl_jax import models
    from sdxl_jax.models.remat import build_unet_from_config
    preset, dtype = cfg.model.preset, cfg.model.dtype
    unet = unet if unet is not None else build_unet_from_config(cfg)
    text_l, text_g = models.build_text_encoders(preset, dtype)
    if cfg.latents.normalization == "per_channel" and latent_mean is None:
        latent_mean, latent_std = (0.0,) * 4, (1.0,) * 4  # shapes only: values do not change the program
    sc = StepConfig.from_config(cfg, latent_mean, latent_std)
    gather = jnp.dtype(dtype) if cfg.model.gather_in_compute_dtype else jnp.float32
    return ProgramSpec(
        name="unet", abstract_params=tr.abstract_params, abstract_frozen=tr.abstract_frozen, tx=tr.tx,
        make_grad_fn=lambda param_sh: unet_grad_fn(unet, text_l, text_g, sc, gather,
                                                   tr.unet_of(param_sh), tr.view),
        ema=cfg.ema, per_device_batch=int(cfg.train.per_device_batch_size),
        batch_spec=batch_spec(cfg))


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def resolve_stages(cfg, workdir: str) -> list[dict]:
    """[{index, end_step, cache_dir, sources, global_batch_size}] (config.validate checked the
    keys). `sources`: the run's data sources (sdxl_jax.data.sources) for a stage without its own
    cache_dir; [] = the single cache `cache_dir`."""
    from sdxl_jax.data.sources import resolve_sources
    sources = resolve_sources(cfg, workdir)
    default_cache = cfg.data.cache_dir or os.path.join(workdir, "cache")
    raw = list(cfg.train.stages) or [{"steps": cfg.train.steps}]
    out, end = [], 0
    for i, st in enumerate(raw):
        st = dict(st)
        end += int(st["steps"])
        out.append({"index": i, "end_step": end, "cache_dir": st.get("cache_dir") or default_cache,
                    "sources": [] if st.get("cache_dir") else sources,
                    "global_batch_size": int(st.get("global_batch_size") or cfg.train.global_batch_size)})
    return out


def ensure_cache(cfg, cache_dir: str, workdir: str) -> None:
    """Build a missing cache from data.images_dir / data.manifest; with neither given (and no
    data.cache_dir) the tiny preset falls back to the generated demo dataset so the demo runs
    on a fresh machine with no network. A configured cache_dir that does not exist is an error
    (config.validate), never silently replaced."""
    if paths.exists(paths.join(cache_dir, "manifest.json")):
        return
    from sdxl_jax.data import build_cache
    from sdxl_jax.data.tfds_source import tfds_from_config
    from sdxl_jax.runs import source_params
    images, manifest, tfds = cfg.data.images_dir, cfg.data.manifest, tfds_from_config(cfg.data)
    if not images and not manifest and not tfds:
        if not offline_preset(cfg.model.preset):
            raise FileNotFoundError(
                f"no latent cache at {cache_dir}: set data.cache_dir to a built cache, or "
                f"data.images_dir / data.manifest to build one (python -m data_tools.build_cache)")
        images = demo_images(cfg, workdir)
    log.info("building the latent cache in %s", cache_dir)
    build_cache(cfg, images_dir=images or None, manifest=manifest or None, out=cache_dir, tfds=tfds,
                vae_params=source_params(cfg, components=("vae",))["vae"])


def stage_data(st: dict):
    """What the loaders read for a stage: its sources, or its one cache folder."""
    return st["sources"] or st["cache_dir"]


def ensure_source_caches(cfg, sources) -> None:
    """Build each data source's missing cache from its images_dir / manifest, all with this
    config's settings (so they hold the same latents)."""
    missing = [s for s in sources if not paths.exists(paths.join(s.cache_dir, "manifest.json"))]
    if not missing:
        return
    from sdxl_jax.data import build_cache
    from sdxl_jax.runs import source_params
    vae = source_params(cfg, components=("vae",))["vae"]
    for s in missing:
        if not (s.images_dir or s.manifest):
            raise FileNotFoundError(f"data source {s.name!r}: no latent cache at {s.cache_dir} and no "
                                    "images_dir / manifest to build one from")
        log.info("building the latent cache of data source %r in %s", s.name, s.cache_dir)
        build_cache(cfg, images_dir=s.images_dir or None, manifest=s.manifest or None, out=s.cache_dir,
                    vae_params=vae)


def use_demo_vae(cfg, workdir: str) -> None:
    """The tiny demo (no data configured) trains or reuses its own VAE first (train/demo_vae.py)
    and records it as model.vae_workdir, which the cache, previews, sample and export then use."""
    no_data = not (cfg.data.cache_dir or cfg.data.images_dir or cfg.data.manifest or cfg.data.tfds
                   or cfg.data.get("sources"))
    if offline_preset(cfg.model.preset) and no_data and cfg.data.demo_vae_steps and not cfg.model.vae_workdir:
        from sdxl_jax.train.demo_vae import find_or_train
        cfg.model.vae_workdir = os.path.abspath(find_or_train(cfg, workdir, demo_images(cfg, workdir)))


def latent_stats(cfg, cache_dir):
    """Per-channel mean/std for `per_channel` normalisation: config first, else the manifest
    (of several sources: their statistics pooled by latents × repeats × weight, i.e. those of
    the mix the step is fed; sources.pooled_latent_stats)."""
    if cfg.latents.normalization != "per_channel":
        return None, None
    if cfg.latents.mean is not None and cfg.latents.std is not None:
        return tuple(cfg.latents.mean), tuple(cfg.latents.std)
    from sdxl_jax.data import load_manifest
    if not isinstance(cache_dir, str):  # a list of data sources
        if len(cache_dir) > 1:
            from sdxl_jax.data.sources import pooled_latent_stats
            return pooled_latent_stats(cache_dir, [load_manifest(s.cache_dir) for s in cache_dir])
        cache_dir = cache_dir[0].cache_dir
    stats = load_manifest(cache_dir)["latent_stats"]
    return tuple(stats["mean"]), tuple(stats["std"])


def run_metadata(cfg, mean, std) -> dict:
    return {"task": "unet", "versions": package_versions(),
            "schedule": {k: cfg.schedule[k] for k in cfg.schedule},
            "prediction_type": "v_prediction",
            "latents": {"normalization": cfg.latents.normalization,
                        "scale_factor": cfg.latents.scale_factor,
                        "mean": None if mean is None else list(mean),
                        "std": None if std is None else list(std)},
            "model_preset": cfg.model.preset}


def _log_line(s: int, out: dict) -> str:
    return (f"step {s} | loss {out['loss']:.4f} | grad_norm {out['grad_norm']:.3f} | "
            f"lr {out['lr']:.2e} | {out['steps_per_s']:.2f} steps/s | skipped {out['nonfinite']}")


def _with_losses(names: list[str]):
    """The log line followed by the per-source losses of the window (those with samples)."""
    def line(s: int, out: dict) -> str:
        return _log_line(s, out) + "".join(f" | {k} {out[k]:.4f}" for k in names if k in out)
    return line


def bin_labels(num_steps: int = 1000) -> list[str]:
    width = num_steps // NUM_T_BINS
    return [f"loss_t{i * width:03d}-{(i + 1) * width - 1:03d}" for i in range(NUM_T_BINS)]


# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------
def build(cfg, workdir: str, cleanup: contextlib.ExitStack) -> Task:
    from sdxl_jax import models
    from sdxl_jax.data import make_train_iterator
    from sdxl_jax.models.weights import cached_abstract_params, load_pretrained
    from sdxl_jax.runs import source_params

    plan = parallel.ShardingPlan.from_config(cfg.mesh)
    use_demo_vae(cfg, workdir)
    stages = resolve_stages(cfg, workdir)
    for st in stages:
        if st["sources"]:
            ensure_source_caches(cfg, st["sources"])
        else:
            ensure_cache(cfg, st["cache_dir"], workdir)
    mean, std = latent_stats(cfg, stage_data(stages[0]))
    total_steps = stages[-1]["end_step"]
    tr = describe_trainable(cfg, total_steps=total_steps)
    program = cached_program(["unet", config_json(cfg), total_steps, mean, std],
                             lambda: _spec(cfg, tr, mean, std), plan)

    preset = cfg.model.preset
    # the run's sources (float32, placed straight onto the mesh): what a fresh run starts from,
    # and the frozen weights the step reads (cast to the compute dtype on the device)
    names = ("vae",) + FROZEN + (("unet",) if tr.mode == "lora" else ())
    sources = source_params(cfg, {k: plan.shardings(cached_abstract_params(k, preset)) for k in names},
                            components=names)
    frozen = frozen_values(tr, sources, program.frozen_shardings)
    for k in set(sources) - {"vae"} - set(tr.trained_text):  # float32 copies no longer needed
        del sources[k]
    tok_l, tok_g = models.get_tokenizers(preset, cfg.model.pretrained)

    def tokenize_fn(captions):
        return (models.tokenize(tok_l, captions, cfg.text.max_chunks),
                models.tokenize(tok_g, captions, cfg.text.max_chunks))

    rng = jax.random.PRNGKey(cfg.train.seed)

    def fresh_state():  # pretrained or seeded random weights, each leaf placed straight onto the mesh
        p_sh = program.shardings.params
        if tr.mode != "lora":
            unet_sh = tr.unet_of(p_sh)
            if cfg.model.pretrained:
                sources["unet"] = load_pretrained(cfg.model.pretrained, preset, ("unet",), {"unet": unet_sh})["unet"]
            else:
                sources["unet"] = models.init_params("unet", preset, jax.random.fold_in(rng, 0),
                                                     out_shardings=unet_sh)
        params = initial_params(tr, cfg, sources, p_sh, rng)
        for k in ("unet",) + tr.trained_text:  # now owned by the state
            sources.pop(k, None)
        return init_state(params, program.spec.tx, jax.random.fold_in(rng, 99), program.shardings)

    multiple = program.micro_rows or plan.data_parallel

    def batches(st):
        return lambda: make_train_iterator(cfg, stage_data(st), tokenize_fn, jax.process_index(),
                                           jax.process_count(), st["global_batch_size"], multiple)

    evaluate = None
    if cfg.sample.every_steps:
        from sdxl_jax.train.evaluate import Evaluator
        from sdxl_jax.models.remat import build_unet_from_config
        unet = build_unet_from_config(cfg)
        text_l, text_g = models.build_text_encoders(preset, cfg.model.dtype)
        shown = dict(frozen, vae=sources["vae"]) if "vae" not in frozen else frozen
        evaluate = Evaluator(cfg, workdir, plan.mesh, unet, text_l, text_g,
                             StepConfig.from_config(cfg, mean, std), shown, tokenize_fn,
                             stage_data(stages[0]), mean, std, None,
                             view=lambda tree: tr.eval_view(tree, frozen))

    labels = {"loss_bin": bin_labels()}
    mixed = next((st["sources"] for st in stages if len(st["sources"]) > 1), [])
    if mixed:  # data.sources: the loss of each source, logged as train/loss_<name>
        labels["loss_source"] = [f"loss_{s.name}" for s in mixed]
    return Task(
        name="unet", program=program,
        stages=tuple(Stage(st["index"], st["end_step"], batches(st)) for st in stages),
        frozen=frozen, fresh_state=fresh_state,
        lr_schedule=optim.learning_rate_schedule(cfg.train, total_steps),
        log_line=_log_line if not mixed else _with_losses(labels["loss_source"]),
        metadata=dict(run_metadata(cfg, mean, std), **tr.metadata), evaluate=evaluate,
        eval_every=int(cfg.sample.every_steps), bin_labels=labels)

