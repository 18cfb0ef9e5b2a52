"""The one training loop: every task (the UNet, the VAE decoder, …) runs through `train`.

A task is plain data and functions (`Task` below), built by a short module per task
(`unet_task.py`, `vae_task.py`) from the config: its compiled program, its frozen weights, how
to make a fresh state, its data stages, its evaluation, its log line and its metadata. The loop
owns what every run shares: resume from the latest good checkpoint, the step loop with its
one-step-late metric read and non-finite stop, checkpoint / evaluation / profile / preemption
cadence, and clean-up on any exit.

The host never waits on the device inside the loop except to read the *previous* step's
metrics (so the device is already busy with the next step) and at checkpoint boundaries.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import numpy as np

from sdxl_jax import checkpoint as ckpt_lib
from sdxl_jax import parallel, paths
from sdxl_jax.train.common import MetricMeans, MetricReader, Preemption, config_json, progress
from sdxl_jax.train.common import use_compilation_cache
from sdxl_jax.train.program import Program
from sdxl_jax.train.state import TrainState
from sdxl_jax.train.writer import open_writer
from sdxl_jax.workdir_lock import workdir_lock

log = logging.getLogger("sdxl_jax.train")

# cfg.task → the module whose `build(cfg, workdir, cleanup) -> Task` makes the task
TASKS = {"unet": "sdxl_jax.train.unet_task", "vae_decoder": "sdxl_jax.train.vae_task"}


@dataclass(frozen=True)
class Stage:
    index: int
    end_step: int  # cumulative: the stage runs while state.step < end_step
    batches: Callable[[], Any]  # opens its iterator of local numpy batches (get/set_state, close)


def _nothing(*_):
    return None


@dataclass(frozen=True)
class Task:
    name: str
    program: Program
    stages: tuple[Stage, ...]
    frozen: Any  # the frozen trees the step reads, placed on the mesh
    fresh_state: Callable[[], TrainState]  # a new run's state, placed (pretrained or seeded)
    lr_schedule: Callable[[int], float]
    log_line: Callable[[int, dict], str]  # (step, pooled metrics) → one log line
    metadata: dict  # saved with every checkpoint (sample/export/open_run read it)
    lr_hint: str = "train.learning_rate"  # what the non-finite stop advises lowering
    check_restored: Callable[[ckpt_lib.Restored], None] = _nothing  # refuse a foreign checkpoint
    evaluate: Callable[[int, TrainState, Any], dict | None] | None = None  # (step, state, writer)
    eval_every: int = 0
    eval_at_start: bool = False  # evaluate a fresh run at step 0 (the "before" figure)
    bin_labels: dict = field(default_factory=dict)  # MetricMeans: labels of pooled array metrics
    summary: dict = field(default_factory=dict)  # extra entries of the returned summary


def build_task(cfg, workdir: str, cleanup: contextlib.ExitStack) -> Task:
    if cfg.task not in TASKS:
        raise ValueError(f"task={cfg.task!r}: must be one of {tuple(TASKS)}")
    return importlib.import_module(TASKS[cfg.task]).build(cfg, workdir, cleanup)


def train(cfg, workdir: str, max_steps: int | None = None, batch_log: list | None = None,
          metrics_log: list | None = None) -> dict:
    """Train (or resume) the task `cfg.task` in `workdir`; returns a summary (with the state).

    `max_steps` stops early after a checkpoint (as a preemption would); `batch_log`, when given,
    collects (step, digest) of every local batch fed (tests compare data order across resumes);
    `metrics_log` collects (step, host metrics) of every step."""
    paths.makedirs(workdir)  # a local directory or a gs:// prefix
    use_compilation_cache(workdir)  # persistent: a resumed run skips compiling
    with contextlib.ExitStack() as cleanup:  # closes whatever was opened, on any exit
        # one trainer per workdir: a second one exits at once naming the first (a killed
        # process's lock dies with it)
        cleanup.enter_context(workdir_lock(workdir, jax.process_index()))
        task = build_task(cfg, workdir, cleanup)
        return run(task, cfg, workdir, cleanup, max_steps, batch_log, metrics_log)


def run(task: Task, cfg, workdir: str, cleanup: contextlib.ExitStack, max_steps=None,
        batch_log=None, metrics_log=None) -> dict:
    prog, is_main = task.program, jax.process_index() == 0

    # ---- state: fresh or restored ---------------------------------------------------------------
    ckpt = ckpt_lib.Checkpointer(paths.join(workdir, "checkpoints"), cfg.checkpoint.keep,
                                 cfg.checkpoint.async_save)
    cleanup.callback(ckpt.close)  # waits for a pending async save
    abstract = ckpt_lib.abstract_with_shardings(prog.abstract_state, prog.shardings)
    restored = ckpt.restore_latest_good(abstract) if ckpt.steps else None
    if restored is not None:
        task.check_restored(restored)
        state, data_state = restored.state, restored.data_state
        check_stage_position(task.stages, restored.step, data_state)
        log.info("resumed from step %d in %s", restored.step, ckpt.directory)
    else:
        state, data_state = task.fresh_state(), None

    # ---- logging --------------------------------------------------------------------------------
    writer = None  # TensorBoard, and W&B when log.wandb_project is set (train/writer.py)
    if is_main:  # finished on any exit, a W&B run marked failed on an error
        writer = cleanup.enter_context(open_writer(cfg, workdir, config_json(cfg)))
    preempt = Preemption()
    cleanup.callback(preempt.restore)
    profile = _parse_profile(cfg.profile_steps)

    step = int(jax.device_get(state.step))
    total = task.stages[-1].end_step
    stop_at = total if max_steps is None else min(total, max_steps)
    summary = {"start_step": step, "losses": [], "eval": {}, "compiles": 0, "stopped": "done",
               **task.summary}
    pbar = progress(is_main, step, stop_at)
    if pbar is not None:
        cleanup.callback(pbar.close)
    read_metrics = MetricReader(cfg, MetricMeans(task.bin_labels), ckpt, task.lr_schedule, writer,
                                pbar, is_main, stop_at, summary["losses"], task.log_line,
                                task.lr_hint, metrics_log)
    cfg_json = config_json(cfg)
    prog.step.on_compile = lambda compiled: _check_fit(compiled, prog, cfg)

    def evaluate(s):
        result = task.evaluate(s, state, writer)
        if result is not None:
            summary["eval"][s] = result

    # ---- loop -----------------------------------------------------------------------------------
    if task.evaluate is not None and task.eval_at_start and step == 0:
        evaluate(0)
    pending = None  # (step, metrics) of the last dispatched step, read one step late
    try:
        for stage in task.stages:
            if step >= min(stage.end_step, stop_at):
                continue
            it = stage.batches()
            try:
                if data_state is not None and data_state.get("stage", 0) == stage.index:
                    it.set_state(data_state["iterator"])
                data_state = None

                def save(s):
                    ckpt.save(s, state, {"stage": stage.index, "start": stage_start(task.stages, stage),
                                         "iterator": it.get_state()}, cfg_json, task.metadata)

                while step < min(stage.end_step, stop_at):
                    if profile and step == profile[0]:
                        jax.profiler.start_trace(os.path.join(workdir, "profile"))
                    local = next(it)
                    if batch_log is not None:
                        batch_log.append((step + 1, batch_digest(local)))
                    state, metrics = prog.step(state, task.frozen, parallel.global_batch(local, prog.plan.mesh))
                    step += 1
                    if pending is not None:
                        read_metrics(*pending)
                    pending = (step, metrics)
                    if profile and step == profile[1]:
                        jax.block_until_ready(state)
                        jax.profiler.stop_trace()
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
    finally:
        summary["compiles"] = prog.step.compile_count
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


def _check_fit(compiled, prog: Program, cfg) -> None:
    """Before the first step of each batch shape: stop with one message (bytes needed,
    available, settings that would fit) instead of an allocator crash mid-run."""
    from sdxl_jax.fit import check_step_fit
    report = check_step_fit(compiled, list(prog.plan.mesh.devices.flat), cfg, dict(prog.plan.mesh.shape))
    if report is not None and jax.process_index() == 0:
        log.info("%s", report.line())


def batch_digest(batch: dict) -> str:
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
