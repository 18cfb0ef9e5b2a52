"""The one training loop: every task (the UNet, the VAE decoder, …) runs through `train`.

A task is plain data and functions (`Task`, train/task.py), built by a short module per task
(`unet_task.py`, `vae_task.py`) from the config and the run's resolved inputs (run_inputs.py):
its compiled program, its frozen weights, how to make a fresh state, its data stages, its
evaluation, its log line and its metadata. The loop owns what every run shares: the check of
the caches against the run, resume from the latest good checkpoint, the step loop with its
one-step-late metric read and non-finite stop, checkpoint / evaluation / profile / preemption
cadence, every batch shape compiled ahead in a pool of threads (compile_ahead.py), and clean-up
on any exit.

The host never waits on the device inside the loop except to read the *previous* step's
metrics (so the device is already busy with the next step) and at checkpoint boundaries.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging

import jax
import numpy as np

from sdxl_jax import checkpoint as ckpt_lib
from sdxl_jax import config
from sdxl_jax import parallel, paths
from sdxl_jax.data.cache import CacheError
from sdxl_jax.run_inputs import Command, RunInputs, check_caches, repaired, resolve_run
from sdxl_jax.train import unet_task, vae_task
from sdxl_jax.train.common import MetricMeans, MetricReader, Preemption, config_json, progress
from sdxl_jax.train.common import use_compilation_cache
from sdxl_jax.train.compile_ahead import Ahead
from sdxl_jax.train.profiling import ProfileWindow
from sdxl_jax.train.task import Stage, Task  # noqa: F401  (the loop's contract with its tasks)
from sdxl_jax.train.writer import open_writer
from sdxl_jax.workdir_lock import workdir_lock

log = logging.getLogger("sdxl_jax.train")

# cfg.task → the module whose `build(cfg, inputs, plan, cleanup) -> Task` makes the task
TASKS = {"unet": unet_task, "vae_decoder": vae_task}


def build_task(cfg, inputs: RunInputs, plan: parallel.ShardingPlan, cleanup: contextlib.ExitStack) -> Task:
    if cfg.task not in TASKS:
        raise ValueError(f"task={cfg.task!r}: must be one of {config.TASKS}")
    return TASKS[cfg.task].build(cfg, inputs, plan, cleanup)


def resolve_inputs(cfg, workdir: str) -> RunInputs:
    """The run's inputs when the caller resolved none; what is missing is prepare_run's to make."""
    inputs = resolve_run(cfg, workdir)
    if inputs.missing:
        raise FileNotFoundError(f"{inputs.missing[0]} is missing: train.py makes it before training "
                                "(sdxl_jax.train.prepare.prepare_run)")
    return inputs


def train(cfg, workdir: str, inputs: RunInputs | None = None, command: Command | None = None,
          max_steps: int | None = None, batch_log: list | None = None,
          metrics_log: list | None = None) -> dict:
    """Train (or resume) the task `cfg.task` in `workdir`; returns a summary (with the state).

    `inputs`: the run's resolved inputs (sdxl_jax.run_inputs; train.py prepares them first);
    `command`: how the trainer was started, for the exact repair command of a cache error.
    `max_steps` stops early after a checkpoint (as a preemption would); `batch_log`, when given,
    collects (step, digest) of every local batch fed (tests compare data order across resumes);
    `metrics_log` collects (step, host metrics) of every step."""
    paths.makedirs(workdir)  # a local directory or a gs:// prefix
    use_compilation_cache(workdir)  # persistent: a resumed run skips compiling
    inputs = inputs if inputs is not None else resolve_inputs(cfg, workdir)
    with contextlib.ExitStack() as cleanup:  # closes whatever was opened, on any exit
        # one trainer per workdir: a second one exits at once naming the first (a killed
        # process's lock dies with it)
        cleanup.enter_context(workdir_lock(workdir, jax.process_index()))
        try:
            check_caches(cfg, inputs, command)  # before anything compiles
            task = build_task(cfg, inputs, parallel.ShardingPlan.from_config(cfg.mesh), cleanup)
            return run(task, cfg, workdir, cleanup, max_steps, batch_log, metrics_log,
                       inputs.saved_config(cfg))
        except CacheError as e:
            raise repaired(e, inputs, command) from None


def run(task: Task, cfg, workdir: str, cleanup: contextlib.ExitStack, max_steps=None,
        batch_log=None, metrics_log=None, saved_config: dict | None = None) -> dict:
    prog, is_main = task.program, jax.process_index() == 0

    # ---- state: fresh or restored ---------------------------------------------------------------
    ckpt = ckpt_lib.Checkpointer(paths.join(workdir, "checkpoints"), cfg.checkpoint.keep,
                                 cfg.checkpoint.async_save)
    cleanup.callback(ckpt.close)  # waits for a pending async save
    abstract = ckpt_lib.abstract_with_shardings(prog.abstract_state, prog.shardings)
    restored = ckpt.restore_latest_good(abstract) if ckpt.steps else None
    if restored is not None:
        task.check_restored(restored)
        check_stage_position(task.stages, restored.step, restored.data_state)
        log.info("resumed from step %d in %s", restored.step, ckpt.directory)
    step = restored.step if restored is not None else 0
    data_state = restored.data_state if restored is not None else None
    total = task.stages[-1].end_step
    stop_at = total if max_steps is None else min(total, max_steps)

    # ---- every batch shape compiled ahead, in the background (train/compile_pool.py) -----------
    # started before a fresh run's weights load, so the first compile overlaps them
    ahead = Ahead(task, cfg, step, stop_at, data_state, cleanup)
    data_state = None if ahead.opened is not None else data_state
    state = restored.state if restored is not None else task.fresh_state()
    ahead.check_all_fit()

    # ---- logging --------------------------------------------------------------------------------
    cfg_json = saved_config or config_json(cfg)  # what checkpoints keep (the resolved VAE in it)
    writer = None  # TensorBoard, and W&B when log.wandb_project is set (train/writer.py)
    if is_main:  # finished on any exit, a W&B run marked failed on an error
        writer = cleanup.enter_context(open_writer(cfg, workdir, cfg_json))
    preempt = Preemption()
    cleanup.callback(preempt.restore)
    profile = ProfileWindow(cfg.profile_steps, workdir)
    cleanup.callback(profile.close)

    profile.note_start(step)
    summary = {"start_step": step, "losses": [], "eval": {}, "compiles": 0, "stopped": "done",
               **task.summary}
    pbar = progress(is_main, step, stop_at)
    if pbar is not None:
        cleanup.callback(pbar.close)
    read_metrics = MetricReader(cfg, MetricMeans(task.bin_labels), ckpt, task.lr_schedule, writer,
                                pbar, is_main, stop_at, summary["losses"], task.log_line,
                                task.lr_hint, metrics_log)

    def evaluate(s):
        result = task.evaluate(s, state, writer)
        if result is not None:
            summary["eval"][s] = result

    # ---- loop -----------------------------------------------------------------------------------
    if task.evaluate is not None and task.eval_at_start and step == 0:
        evaluate(0)
    pending = None  # (step, metrics) of the last dispatched step, read one step late
    ended = False
    try:
        for stage in task.stages:
            if step >= min(stage.end_step, stop_at):
                continue
            it, peeked = ahead.take(stage)
            try:
                if it is None:
                    it = stage.batches()
                    if data_state is not None and data_state.get("stage", 0) == stage.index:
                        it.set_state(data_state["iterator"])
                data_state = None

                def save(s):
                    ckpt.save(s, state, {"stage": stage.index, "start": stage_start(task.stages, stage),
                                         "iterator": it.get_state()}, cfg_json, task.metadata)

                while step < min(stage.end_step, stop_at):
                    profile.before_step(step)
                    local, peeked = (next(it) if peeked is None else peeked), None
                    if batch_log is not None:
                        batch_log.append((step + 1, batch_digest(local)))
                    batch = parallel.global_batch(local, prog.plan.mesh)
                    ahead.wait(batch, step + 1)
                    state, metrics = prog.step(state, task.frozen, batch)
                    step += 1
                    if pending is not None:
                        read_metrics(*pending)
                    pending = (step, metrics)
                    profile.after_step(step, state)
                    saved = step % cfg.checkpoint.every_steps == 0 or step == stop_at
                    if saved:
                        save(step)
                    if task.evaluate is not None and task.eval_every and step % task.eval_every == 0:
                        evaluate(step)
                    if preempt.should_stop(step):
                        if not saved:
                            save(step)
                        summary["stopped"] = "preempted"
                        break
            finally:
                it.close()
            if summary["stopped"] == "preempted":
                break
        if pending is not None:
            read_metrics(*pending)
        ended = summary["stopped"] == "done"
    finally:
        summary["compiles"] = prog.step.compile_count
        summary.update(ahead.finish(is_main, finish_running=ended))
    summary.update(end_step=step, state=state)
    return summary


def stage_start(stages, stage: Stage) -> int:
    """The step a stage starts at: the end of the one before it."""
    i = stages.index(stage)
    return stages[i - 1].end_step if i else 0


def check_stage_position(stages, step: int, data_state: dict | None) -> None:
    """A resumed run goes on from its saved data position only in the stage that position was
    saved in, starting at the same step; a position saved exactly at the end of its stage is
    left behind as the next stage starts. Any other case means a stage's length changed since
    the checkpoint, which would silently drop or misplace the position: ValueError naming the
    stages. (Checkpoints older than the saved "start" are checked by stage alone.)"""
    if data_state is None:
        return
    now = next((s for s in stages if step < s.end_step), None)
    if now is None:  # nothing left to train
        return
    saved = next((s for s in stages if s.index == data_state.get("stage", 0)), None)
    was = data_state.get("start")
    if saved is now and was in (None, stage_start(stages, now)):
        return
    if (saved is not None and stages.index(saved) == stages.index(now) - 1
            and step == saved.end_step and was in (None, stage_start(stages, saved))):
        return
    began = f", which began at step {was}" if was is not None else ""
    raise ValueError(
        f"the checkpoint of step {step} holds the data position of train.stages[{data_state.get('stage', 0)}]"
        f"{began}, but with this config step {step} falls in train.stages[{now.index}] (steps "
        f"{stage_start(stages, now)}–{now.end_step}): a stage's steps changed since the "
        "checkpoint. Restore the stage lengths it was trained with, or start a new workdir")


def batch_digest(batch: dict) -> str:
    h = hashlib.sha1()
    for k in sorted(batch):
        h.update(k.encode())
        h.update(np.ascontiguousarray(batch[k]).tobytes())
    return h.hexdigest()[:16]

