"""The UNet training loop: set-up, resume, stages, the step loop, logging, checkpoints.

Phases (banner comments below): mesh → models → data → state (fresh or restored) → loop.
The host never waits on the device inside the loop except to read the *previous* step's
metrics (so the device is already busy with the next step) and at checkpoint boundaries.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import jax
import numpy as np

from sdxl_jax import checkpoint as ckpt_lib
from sdxl_jax import parallel
from sdxl_jax.train import optim
from sdxl_jax.train.common import MetricReader, config_json, demo_images, package_versions
from sdxl_jax.train.common import Preemption as _Preemption, progress as _progress, use_compilation_cache
from sdxl_jax.train.state import create_state, init_state, state_shardings
from sdxl_jax.train.step import NUM_T_BINS, CompiledStep, StepConfig, make_train_step

log = logging.getLogger("sdxl_jax.train")


@dataclass(frozen=True)
class Stage:
    index: int
    end_step: int  # cumulative: the stage runs while state.step < end_step
    cache_dir: str
    global_batch_size: int


# ---------------------------------------------------------------------------------------------
# Set-up helpers
# ---------------------------------------------------------------------------------------------
def resolve_stages(cfg, workdir: str) -> list[Stage]:
    default_cache = cfg.data.cache_dir or os.path.join(workdir, "cache")
    raw = list(cfg.train.stages) or [{"steps": cfg.train.steps, "cache_dir": default_cache,
                                      "global_batch_size": cfg.train.global_batch_size}]
    stages, end = [], 0
    for i, st in enumerate(raw):
        st = dict(st)
        unknown = set(st) - {"steps", "cache_dir", "global_batch_size"}
        if unknown or "steps" not in st:
            raise ValueError(f"train.stages[{i}]: needs 'steps' (and optionally 'cache_dir', "
                             f"'global_batch_size'); unknown keys {sorted(unknown)}")
        end += int(st["steps"])
        stages.append(Stage(i, end, st.get("cache_dir") or default_cache,
                            int(st.get("global_batch_size") or cfg.train.global_batch_size)))
    return stages


def ensure_cache(cfg, cache_dir: str, workdir: str) -> None:
    """Build a missing cache from data.images_dir / data.manifest; the tiny preset falls back to
    the generated demo dataset so the demo runs on a fresh machine with no network."""
    if os.path.exists(os.path.join(cache_dir, "manifest.json")):
        return
    from sdxl_jax.data import build_cache
    images, manifest = cfg.data.images_dir, cfg.data.manifest
    if not images and not manifest:
        if cfg.model.preset != "tiny":
            raise FileNotFoundError(
                f"no latent cache at {cache_dir}: set data.cache_dir to a built cache, or "
                f"data.images_dir / data.manifest to build one (python -m data_tools.build_cache)")
        images = demo_images(cfg, workdir)
    log.info("building the latent cache in %s", cache_dir)
    build_cache(cfg, images_dir=images or None, manifest=manifest or None, out=cache_dir)


def latent_stats(cfg, cache_dir: str):
    """Per-channel mean/std for `per_channel` normalisation: config first, else the manifest."""
    if cfg.latents.normalization != "per_channel":
        return None, None
    if cfg.latents.mean is not None and cfg.latents.std is not None:
        return tuple(cfg.latents.mean), tuple(cfg.latents.std)
    from sdxl_jax.data import load_manifest
    stats = load_manifest(cache_dir)["latent_stats"]
    return tuple(stats["mean"]), tuple(stats["std"])


def run_metadata(cfg, mean, std) -> dict:
    return {"versions": package_versions(),
            "schedule": {k: cfg.schedule[k] for k in cfg.schedule},
            "prediction_type": "v_prediction",
            "latents": {"normalization": cfg.latents.normalization,
                        "scale_factor": cfg.latents.scale_factor,
                        "mean": None if mean is None else list(mean),
                        "std": None if std is None else list(std)},
            "model_preset": cfg.model.preset}


# ---------------------------------------------------------------------------------------------
# Train
# ---------------------------------------------------------------------------------------------
def train(cfg, workdir: str, max_steps: int | None = None, batch_log: list | None = None) -> dict:
    """Train (or resume) in `workdir`; returns a summary (with the final state).

    `max_steps` stops early after a checkpoint (as a preemption would); `batch_log`, when given,
    collects (step, digest) of every local batch fed (tests compare data order across resumes)."""
    from sdxl_jax import models
    from sdxl_jax.data import make_train_iterator
    from sdxl_jax.models.remat import build_unet_from_config
    from sdxl_jax.models.weights import frozen_params, load_pretrained

    os.makedirs(workdir, exist_ok=True)
    use_compilation_cache(workdir)  # persistent: a resumed run skips compiling
    is_main = jax.process_index() == 0

    # ---- mesh -----------------------------------------------------------------------------------
    mesh = parallel.make_mesh(cfg.mesh)
    stages = resolve_stages(cfg, workdir)
    for st in stages:
        if st.global_batch_size % parallel.data_parallel_size(mesh):
            raise ValueError(f"global batch {st.global_batch_size} is not divisible by the "
                             f"{parallel.data_parallel_size(mesh)} data-parallel devices "
                             f"(train.global_batch_size / mesh.*)")
        ensure_cache(cfg, st.cache_dir, workdir)
    mean, std = latent_stats(cfg, stages[0].cache_dir)

    # ---- models ---------------------------------------------------------------------------------
    preset, dtype = cfg.model.preset, cfg.model.dtype
    unet = build_unet_from_config(cfg)  # model.remat / attention / split_head_dim
    text_l, text_g = models.build_text_encoders(preset, dtype)
    tok_l, tok_g = models.get_tokenizers(preset, cfg.model.pretrained)
    frozen_sh = {k: parallel.param_shardings(models.abstract_params(k, preset), mesh,
                                             cfg.mesh.min_fsdp_size) for k in ("vae", "text_l", "text_g")}
    frozen_all = frozen_params(cfg, frozen_sh)  # placed straight onto the mesh
    frozen = {k: frozen_all[k] for k in ("text_l", "text_g")}
    frozen_sh = {k: frozen_sh[k] for k in ("text_l", "text_g")}

    def tokenize_fn(captions):
        return (models.tokenize(tok_l, captions, cfg.text.max_chunks),
                models.tokenize(tok_g, captions, cfg.text.max_chunks))

    # ---- state ----------------------------------------------------------------------------------
    total_steps = stages[-1].end_step
    tx = optim.make_optimizer(cfg.train, total_steps)
    rng = jax.random.PRNGKey(cfg.train.seed)
    abstract_params = models.abstract_params("unet", preset)
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint.keep,
                                 cfg.checkpoint.async_save)
    abstract_state = jax.eval_shape(lambda p, r: create_state(p, tx, r), abstract_params, rng)
    shardings = state_shardings(abstract_state, mesh, cfg.mesh.min_fsdp_size)
    restored = ckpt.restore_latest_good(ckpt_lib.abstract_with_shardings(abstract_state, shardings)) \
        if ckpt.steps else None
    data_state = None
    if restored is not None:
        state, data_state = restored.state, restored.data_state
        log.info("resumed from step %d in %s", restored.step, ckpt.directory)
    else:  # fresh: pretrained or seeded random UNet, each leaf placed straight onto the mesh
        p_sh = parallel.param_shardings(abstract_params, mesh, cfg.mesh.min_fsdp_size)
        if cfg.model.pretrained:
            params = load_pretrained(cfg.model.pretrained, preset, ("unet",), {"unet": p_sh})["unet"]
        else:
            params = models.init_params("unet", preset, jax.random.fold_in(rng, 0), out_shardings=p_sh)
        state = init_state(params, tx, jax.random.fold_in(rng, 99), shardings)
        del params

    sc = StepConfig.from_config(cfg, mean, std)
    step_fn = CompiledStep(make_train_step(unet, text_l, text_g, tx, sc, shardings.params), shardings,
                           frozen_sh, mesh)
    meta = run_metadata(cfg, mean, std)
    cfg_json = config_json(cfg)

    # ---- logging --------------------------------------------------------------------------------
    writer = None
    if is_main:
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(os.path.join(workdir, "tb"))
    schedule_fn = optim.learning_rate_schedule(cfg.train, total_steps)
    evaluator = None
    if cfg.sample.every_steps:
        from sdxl_jax.train.evaluate import Evaluator
        evaluator = Evaluator(cfg, workdir, mesh, unet, text_l, text_g, sc, frozen_all, tokenize_fn,
                              stages[0].cache_dir, mean, std, writer)
    profile = _parse_profile(cfg.profile_steps)
    preempt = _Preemption()

    step = int(jax.device_get(state.step))
    stop_at = total_steps if max_steps is None else min(total_steps, max_steps)
    summary = {"start_step": step, "losses": [], "compiles": 0, "stopped": "done"}
    pending = None  # (step, metrics) of the last dispatched step, read one step late
    acc = _MetricAcc()
    pbar = _progress(is_main, step, stop_at)
    read_metrics = MetricReader(
        cfg, acc, ckpt, schedule_fn, writer, pbar, is_main, stop_at, summary["losses"],
        lambda s, out: (f"step {s} | loss {out['loss']:.4f} | grad_norm {out['grad_norm']:.3f} | "
                        f"lr {out['lr']:.2e} | {out['steps_per_s']:.2f} steps/s | "
                        f"skipped {out['nonfinite']}"),
        lr_hint="train.learning_rate")

    def save(s, it, stage):
        ckpt.save(s, state, {"stage": stage.index, "iterator": it.get_state()}, cfg_json, meta)

    def run_stages():
        nonlocal state, step, pending, data_state
        for stage in stages:
            if step >= stage.end_step or step >= stop_at:
                continue
            it = make_train_iterator(cfg, stage.cache_dir, tokenize_fn, jax.process_index(),
                                     jax.process_count(), stage.global_batch_size,
                                     parallel.data_parallel_size(mesh))
            if data_state is not None and data_state.get("stage") == stage.index:
                it.set_state(data_state["iterator"])
            data_state = None
            while step < min(stage.end_step, stop_at):
                if profile and step == profile[0]:
                    jax.profiler.start_trace(os.path.join(workdir, "profile"))
                local = next(it)
                if batch_log is not None:
                    batch_log.append((step + 1, batch_digest(local)))
                batch = parallel.global_batch(local, mesh)
                state, metrics = step_fn(state, frozen, batch)
                step += 1
                if pending is not None:
                    read_metrics(*pending)
                pending = (step, metrics)
                if profile and step == profile[1]:
                    jax.block_until_ready(state)
                    jax.profiler.stop_trace()
                saved = step % cfg.checkpoint.every_steps == 0 or step == stop_at
                if saved:
                    save(step, it, stage)
                if cfg.sample.every_steps and step % cfg.sample.every_steps == 0:
                    evaluator(step, state)
                if preempt.should_stop(step):
                    if not saved:
                        save(step, it, stage)
                    summary["stopped"] = "preempted"
                    return

    try:
        run_stages()
        if pending is not None:
            read_metrics(*pending)
    finally:
        summary["compiles"] = step_fn.compile_count
        ckpt.close()
        preempt.restore()
        if pbar is not None:
            pbar.close()
        if writer is not None:
            writer.close()
    summary["end_step"] = step
    summary["state"] = state
    return summary


def batch_digest(batch: dict) -> str:
    import hashlib
    h = hashlib.sha1()
    for k in sorted(batch):
        h.update(k.encode())
        h.update(np.ascontiguousarray(batch[k]).tobytes())
    return h.hexdigest()[:16]


def _parse_profile(spec: str):
    if not spec:
        return None
    a, b = (int(x) for x in spec.split(","))
    if not 0 <= a < b:
        raise ValueError(f"profile_steps must be 'a,b' with 0 ≤ a < b, got {spec!r}")
    return a, b


class _MetricAcc:
    """Averages scalar metrics between log lines and pools the per-timestep-range losses."""

    def __init__(self):
        self.consecutive_nonfinite = 0
        self._reset()

    def _reset(self):
        self.n, self.loss, self.gn, self.skipped = 0, 0.0, 0.0, 0
        self.bin_sum = np.zeros(NUM_T_BINS)
        self.bin_cnt = np.zeros(NUM_T_BINS)

    def add(self, m):
        self.n += 1
        if m["finite"]:
            self.loss += float(m["loss"])
            self.gn += float(m["grad_norm"])
            self.bin_sum += np.asarray(m["loss_bin_sum"])
            self.bin_cnt += np.asarray(m["loss_bin_count"])
        else:
            self.skipped += 1

    def pop(self) -> dict:
        good = max(self.n - self.skipped, 1)
        out = {"loss": self.loss / good, "grad_norm": self.gn / good, "nonfinite": self.skipped,
               "_n": self.n}
        width = 1000 // NUM_T_BINS
        for i in range(NUM_T_BINS):
            if self.bin_cnt[i]:
                out[f"loss_t{i * width:03d}-{(i + 1) * width - 1:03d}"] = self.bin_sum[i] / self.bin_cnt[i]
        self._reset()
        return out
