"""The loop's contract with its tasks: a `Task` is plain data and functions (its compiled
program, frozen weights, fresh state, data stages, evaluation, log line and metadata), built by
a short module per task (`unet_task.py`, `vae_task.py`) from (cfg, inputs, plan)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from sdxl_jax import checkpoint as ckpt_lib
from sdxl_jax.train.program import Program
from sdxl_jax.train.state import TrainState


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
