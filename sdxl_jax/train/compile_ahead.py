"""The loop's side of compiling ahead: which shapes a run will feed, in which order, the fit
check of each, and the time the loop waits for programs.

The first stage to run is opened (its iterator restored to the checkpoint's data position) and
its first batch read before anything compiles, so that batch's shape is compiled first; then
every bucket of every stage still to run, as each stage's loader declares them (`batch_sizes`:
bucket (w, h) → global rows; `image_shape`: the fixed crop of pixel batches, if any). The data
plan is the same on every host, so every host submits the same list in the same order.

`train.fit_check` with a known limit (a size, or "auto" on a device that reports one) checks
every shape before the first step, so a bucket that cannot fit stops the run before it trains
(not hours later when its first batch comes); the first step then waits for all compiles
(with one worker per shape: about one compile). With no limit to check against (XLA:CPU's
"auto", "off") training starts when the first shape is ready.
"""
from __future__ import annotations

import logging
import time

import jax

from sdxl_jax import parallel
from sdxl_jax.train.compile_pool import Shape, abstract_batch, bucket_label, pool_for, summary_line

log = logging.getLogger("sdxl_jax.train")


def loader_shapes(it) -> list[tuple[int, int, int]]:
    """(global rows, height, width) of every bucket a loader can yield, in bucket order."""
    sizes = getattr(it, "batch_sizes", None) or {}
    crop = getattr(it, "image_shape", None)
    out = []
    for (w, h), rows in sorted(sizes.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        height, width = crop if crop else (h, w)
        out.append((int(rows), int(height), int(width)))
    return list(dict.fromkeys(out))  # a crop maps every bucket of one batch size to one shape


def _fit_checker(prog, cfg, is_main: bool):
    """(check(shape, compiled) or None, whether it has a limit to check against)."""
    from sdxl_jax.fit import check_step_fit, device_limit, parse_fit_check
    setting = parse_fit_check(cfg.train.fit_check)
    if setting == "off":
        return None, False
    devices = list(prog.plan.mesh.devices.flat)
    mesh_shape = dict(prog.plan.mesh.shape)

    def check(shape: Shape, compiled) -> None:
        report = check_step_fit(compiled, devices, cfg, mesh_shape, what=f"the train step of {shape.label}")
        if report is not None and is_main:
            log.info("%s: %s", shape.label, report.line())
    return check, setting != "auto" or device_limit(devices) is not None


class Ahead:
    """Compiles every shape of the stages still to run (steps `start`…`stop_at`) in a pool.

    `opened` is (stage index, its iterator restored to `data_state`, its first local batch)
    when a stage runs; `take(stage)` hands them to the loop once."""

    def __init__(self, task, cfg, start: int, stop_at: int, data_state, cleanup):
        self.opened, self.pool, self._gating = None, None, False
        self.first_wait_s, self.stall_s, self._waits = 0.0, 0.0, 0
        running = [st for st in task.stages if start < min(st.end_step, stop_at)]
        if not running:
            return
        first = running[0]
        it = first.batches()
        cleanup.callback(it.close)
        if data_state is not None and data_state.get("stage", 0) == first.index:
            it.set_state(data_state["iterator"])
        local = next(it)
        self.opened = (first.index, it, local)
        prog, is_main = task.program, jax.process_index() == 0
        several = len(running) > 1
        shapes = []
        for st in running:
            loader = it if st is first else st.batches()
            try:
                shapes += [Shape(bucket_label(r, h, w, st.index if several else None),
                                 prog.abstract_batch(r, h, w)) for r, h, w in loader_shapes(loader)]
            finally:
                if loader is not it:
                    loader.close()
        self._labels = {prog.step.signature(s.batch): s.label for s in shapes}
        batch = abstract_batch(parallel.global_batch(local, prog.plan.mesh))
        label = self._labels.get(prog.step.signature(batch), "the first batch's shape")
        self._check, self._gating = _fit_checker(prog, cfg, is_main)
        self.pool = pool_for(prog, int(cfg.train.compile_workers))
        self.pool.submit([Shape(label, batch)], first=True)
        self.pool.submit(shapes)
        cleanup.callback(self.pool.close, False)  # an error or preemption: drop the rest
        self._checked: set = set()
        if is_main:
            planned = list(self.pool.seconds(all_shapes=True))
            log.info("compiling the train step ahead for %d batch shape(s): %s", len(planned),
                     "; ".join(planned))

    def _fit(self, shape: Shape, compiled, key: tuple | None = None) -> None:
        key = self.pool.signature(shape.batch) if key is None else key
        if self._check is not None and key not in self._checked:
            self._checked.add(key)
            self._check(shape, compiled)

    def check_all_fit(self) -> None:
        """With a fit limit: every shape compiled and checked before the first step."""
        if self.pool is not None and self._gating:
            t0 = time.perf_counter()
            for shape, compiled in self.pool.wait_all():
                self._fit(shape, compiled)
            self.first_wait_s += time.perf_counter() - t0
            self._waits = 1  # the first step's wait is this one

    def take(self, stage):
        """(iterator, first local batch) of the stage opened ahead, else (None, None)."""
        if self.opened is not None and self.opened[0] == stage.index:
            _, it, local = self.opened
            self.opened = None
            return it, local
        return None, None

    def wait(self, batch: dict, step: int) -> None:
        """Before step `step`: its batch's program ready. A wait after the run's first program
        is a stall of the loop, logged."""
        if self.pool is None:
            return
        key = self.pool.signature(batch)  # once per step: host-side shapes only
        label = self._labels.get(key, "")
        waited, compiled = self.pool.wait(batch, label)
        self._fit(Shape(label or "a new shape", batch), compiled, key)
        if self._waits == 0:
            self.first_wait_s += waited
        else:
            self.stall_s += waited
            if waited > 0.01:
                log.info("step %d waited %.1f s for the train step of %s", step, waited, label or "a new shape")
        self._waits += 1

    def finish(self, is_main: bool, finish_running: bool) -> dict:
        """The run's compile figures (summary entries), logged once. `finish_running`: wait for
        the compiles under way (a run that ended normally: the persistent cache gets them)."""
        if self.pool is None:
            return {"compile_s": {}, "compile_total_s": 0.0, "first_wait_s": 0.0, "stall_s": 0.0}
        self.pool.close(finish_running)
        seconds = self.pool.seconds()
        if is_main:
            log.info("%s", summary_line(seconds, self.stall_s, self.first_wait_s))
        return {"compile_s": seconds, "compile_total_s": sum(seconds.values()),
                "first_wait_s": self.first_wait_s, "stall_s": self.stall_s,
                "compile_workers": self.pool.workers_used}
