"""The UNet task (NAI-v3 recipe): the trained UNet, the frozen text encoders, the latent-cache
stages, previews and validation, as a `loop.Task` built from the run's resolved inputs."""
from __future__ import annotations

import contextlib
import logging

import jax
import jax.numpy as jnp

from sdxl_jax import parallel
from sdxl_jax.run_inputs import RunInputs
from sdxl_jax.train import optim
from sdxl_jax.train.common import config_json, package_versions
from sdxl_jax.train.program import ProgramSpec, cached_program
from sdxl_jax.train.state import init_state
from sdxl_jax.train.step import NUM_T_BINS, StepConfig, unet_grad_fn
from sdxl_jax.train.task import Stage, Task
from sdxl_jax.train.trainable import frozen_values, initial_params, refuse_untrainable_base

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
    from sdxl_jax.models.build import build_unet_from_config
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


def run_metadata(cfg, mean, std) -> dict:
    return {"task": "unet", "versions": package_versions(),
            "schedule": {k: cfg.schedule[k] for k in cfg.schedule},
            "prediction_type": "v_prediction",
            "latents": {"normalization": cfg.latents.normalization,
                        "scale_factor": cfg.latents.scale_factor,
                        "mean": None if mean is None else list(mean),
                        "std": None if std is None else list(std)},
            "model_preset": cfg.model.preset}


def check_resumed(meta: dict, workdir: str):
    """check_restored of the task: a resumed run reads latents of the same VAE, normalised the
    same way, as its checkpoints were trained on (a cache rebuilt since with another VAE or
    other data changes both); one error naming both sides otherwise."""
    def check(restored) -> None:
        where = f"the checkpoints in {workdir}/checkpoints (step {restored.step})"
        old_vae = restored.meta.get("vae_fingerprint")
        if old_vae and old_vae != meta["vae_fingerprint"]:
            raise ValueError(f"{where} trained on latents of VAE {old_vae}; this run's VAE is "
                             f"{meta['vae']}: use a new --workdir, or the caches and VAE it trained with")
        old = restored.meta.get("latents")
        if old is not None and old != meta["latents"]:
            raise ValueError(f"{where} normalised latents with {old}; this run would use "
                             f"{meta['latents']} (its caches changed since): use a new --workdir, or "
                             "set latents.mean / latents.std to the values it trained with")
    return check


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
def program_of(cfg, inputs: RunInputs, plan: parallel.ShardingPlan):
    """The task's train program: a function of the config, the step count and the latent
    statistics only, so the prepare phase can compile it before the caches exist."""
    mean, std, total_steps = inputs.latent_mean, inputs.latent_std, inputs.total_steps
    return cached_program(["unet", config_json(cfg), total_steps, mean, std],
                          lambda: _spec(cfg, describe_trainable(cfg, total_steps=total_steps), mean, std),
                          plan)


def build(cfg, inputs: RunInputs, plan: parallel.ShardingPlan, cleanup: contextlib.ExitStack) -> Task:
    """The task from the config and the run's resolved inputs (run_inputs.py: its stages and
    caches, latent statistics, VAE and frozen weights), on `plan`'s mesh. Reads the caches and
    weights; makes nothing and leaves `cfg` as it is."""
    del cleanup  # nothing of this task outlives the loop's own clean-up
    from sdxl_jax import models
    from sdxl_jax.data import make_train_iterator
    from sdxl_jax.models.weights import cached_abstract_params, load_pretrained

    stages, mean, std = inputs.stages, inputs.latent_mean, inputs.latent_std
    total_steps = inputs.total_steps
    tr = describe_trainable(cfg, total_steps=total_steps)
    program = program_of(cfg, inputs, plan)

    preset = cfg.model.preset
    # the run's sources (float32, placed straight onto the mesh): what a fresh run starts from,
    # and the frozen weights the step reads (cast to the compute dtype on the device)
    names = ("vae",) + FROZEN + (("unet",) if tr.mode == "lora" else ())
    sources = inputs.weights.load(names, {k: plan.shardings(cached_abstract_params(k, preset)) for k in names})
    frozen = frozen_values(tr, sources, program.frozen_shardings)
    refuse_untrainable_base(tr, frozen)
    for k in set(sources) - {"vae"} - set(tr.trained_text):  # float32 copies no longer needed
        del sources[k]
    tok_l, tok_g = inputs.weights.tokenizers()

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
        return lambda: make_train_iterator(cfg, st.data, tokenize_fn, jax.process_index(),
                                           jax.process_count(), st.global_batch_size, multiple)

    evaluate = None
    if cfg.sample.every_steps:
        from sdxl_jax.train.evaluate import Evaluator
        from sdxl_jax.models.build import build_unet_from_config
        unet = build_unet_from_config(cfg)
        text_l, text_g = models.build_text_encoders(preset, cfg.model.dtype)
        shown = dict(frozen, vae=sources["vae"]) if "vae" not in frozen else frozen
        evaluate = Evaluator(cfg, inputs.workdir, plan.mesh, unet, text_l, text_g,
                             StepConfig.from_config(cfg, mean, std), shown, tokenize_fn,
                             stages[0].data, mean, std, None,
                             view=lambda tree: tr.eval_view(tree, frozen))

    meta = dict(run_metadata(cfg, mean, std), vae=inputs.vae.describe(),
                vae_fingerprint=inputs.vae.fingerprint, **tr.metadata)
    labels = {"loss_bin": bin_labels()}
    mixed = next((st.sources for st in stages if len(st.sources) > 1), ())
    if mixed:  # data.sources: the loss of each source, logged as train/loss_<name>
        labels["loss_source"] = [f"loss_{s.name}" for s in mixed]
    return Task(
        name="unet", program=program,
        stages=tuple(Stage(st.index, st.end_step, batches(st)) for st in stages),
        frozen=frozen, fresh_state=fresh_state,
        lr_schedule=optim.learning_rate_schedule(cfg.train, total_steps),
        log_line=_log_line if not mixed else _with_losses(labels["loss_source"]),
        metadata=meta, check_restored=check_resumed(meta, inputs.workdir), evaluate=evaluate,
        eval_every=int(cfg.sample.every_steps), bin_labels=labels)

