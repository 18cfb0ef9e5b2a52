"""Every batch shape a run will feed, compiled ahead of time in a pool of threads.

Each bucket (and each stage's batch size) is its own compiled train step. Compiled when its first
batch arrives, a fresh run stalls once per bucket while every accelerator idles (an SDXL step
takes minutes to compile). Instead the loop submits every shape the data plan will use before
the first step, the first batch's shape first, and waits only for the shape it needs now.

XLA's compile releases the GIL, so threads compile in parallel. Workers (`train.compile_workers`,
0 = auto) default to one per core, at most one per shape, and at most as many as host memory
holds: the first shape compiles alone and the growth of the process's peak resident memory
during it (Linux: VmHWM after resetting it) is taken as one compile's footprint; then
⌊MemAvailable / footprint⌋ bounds the workers (at least one).

Every process submits the same shapes in the same order (the plan is the same on every host),
so no host waits on a compile another host does not do; the barrier before a shape's first step
is in `CompiledStep.__call__`, on the loop's thread, never in a worker.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Sequence

import jax

log = logging.getLogger("sdxl_jax.train")


@dataclass(frozen=True)
class Shape:
    label: str  # how logs and the fit check name it ("bucket 96x64, 8 rows")
    batch: dict  # {name: ShapeDtypeStruct with sharding}: the global batch the step is fed


def abstract_batch(batch: dict) -> dict:
    """A global batch of jax.Arrays (or ShapeDtypeStructs) as sharded ShapeDtypeStructs."""
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in batch.items()}


def bucket_label(rows: int, height: int, width: int, stage: int | None = None) -> str:
    where = f", stage {stage}" if stage is not None else ""
    return f"bucket {width}x{height} (global batch {rows}{where})"


def host_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _proc_bytes(path: str, key: str) -> int | None:
    """A "Key:  N kB" line of a /proc file, in bytes (None off Linux)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class _PeakMemory:
    """Growth of this process's peak resident memory over a block (Linux; None elsewhere)."""

    def __enter__(self):
        self.before = _proc_bytes("/proc/self/status", "VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (the peak) to the current resident size
        except OSError:
            self.before = None
        return self

    def __exit__(self, *exc):
        peak = _proc_bytes("/proc/self/status", "VmHWM")
        self.growth = None if self.before is None or peak is None else max(peak - self.before, 0)


NICE = 10  # how much lower than the training thread's the compile workers' CPU priority is


def lower_priority(by: int = NICE) -> None:
    """Lower the calling thread's CPU priority (Linux: nice is per thread; elsewhere a no-op).

    Compiles ahead are background work: where they share cores with the run's own work (the
    training step's host threads, the demo VAE's training, a cache build) the scheduler gives
    the run precedence, so the compiles fill idle cycles instead of slowing the run's critical
    path; when the run waits for a program, nothing else competes and the compile gets the core."""
    if sys.platform != "linux":  # elsewhere setpriority(PRIO_PROCESS, …) is per process
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
    except OSError:
        pass


def memory_bound(footprint: int | None) -> int | None:
    """How many compiles of `footprint` bytes the host's available memory holds (≥ 1)."""
    available = _proc_bytes("/proc/meminfo", "MemAvailable")
    if not footprint or available is None:
        return None
    return max(1, available // footprint)


class _Job:
    def __init__(self, shape: Shape):
        self.shape, self.future, self.seconds = shape, Future(), None


class CompilePool:
    """Compiles `step` (a CompiledStep) for submitted shapes in worker threads.

    `inputs` are the sharded abstract (state, frozen) every shape shares. `submit` may be called
    from anywhere and more than once (a shape submitted again is ignored); `wait(batch)` returns
    the seconds the caller waited for that batch's program and raises its compile error."""

    def __init__(self, step, inputs: tuple[Any, Any], workers: int = 0):
        if int(workers) < 0:
            raise ValueError(f"train.compile_workers={workers}: must be ≥ 0 (0 = one per core)")
        self._step, self._inputs = step, inputs
        self._requested = int(workers)
        self._jobs: dict = {}  # signature → _Job, in submission order
        self._queue: deque = deque()
        self._cv = threading.Condition()
        self._target = 1 if not self._requested else self._requested  # auto: one, until measured
        self._busy = 0  # threads alive
        self._closed = False
        self.footprint: int | None = None  # bytes one compile grew the peak by (auto only)
        self.workers_used = 0  # the most threads alive at once

    # ---- submitting and waiting -------------------------------------------------------------------
    def submit(self, shapes: Sequence[Shape], first: bool = False) -> None:
        """Queue `shapes` in order (`first`: ahead of those already queued)."""
        new = []
        with self._cv:
            for sh in shapes:
                key = self._step.signature(sh.batch)
                if key not in self._jobs:
                    self._jobs[key] = job = _Job(sh)
                    new.append(job)
            if first:
                self._queue.extendleft(reversed(new))
            else:
                self._queue.extend(new)
            self._spawn()

    def wait(self, batch: dict, label: str = "") -> tuple[float, Any]:
        """Block until `batch`'s program is ready (a shape nobody submitted goes first in the
        queue); raises its compile error. Returns (seconds waited, the executable)."""
        key = self._step.signature(batch)
        job = self._jobs.get(key)
        if job is None:
            log.warning("%s was not among the shapes compiled ahead: compiling it now",
                        label or "a batch shape")
            self.submit([Shape(label or "unplanned shape", abstract_batch(batch))], first=True)
            job = self._jobs[key]
        if job.future.done():  # the common case: exactly 0 s, not a clock's jitter
            return 0.0, job.future.result()
        t0 = time.perf_counter()
        compiled = job.future.result()
        return time.perf_counter() - t0, compiled

    def wait_all(self) -> list[tuple[Shape, Any]]:
        """(shape, executable) of every submitted shape, in submission order, once all are
        compiled; raises the first failure."""
        return [(job.shape, job.future.result()) for job in list(self._jobs.values())]

    @property
    def closed(self) -> bool:
        return self._closed

    def signature(self, batch: dict) -> tuple:
        return self._step.signature(batch)

    def seconds(self, all_shapes: bool = False) -> dict:
        """{label: compile seconds} of the shapes compiled so far (`all_shapes`: of every shape
        submitted, None when not compiled), in submission order."""
        return {j.shape.label: j.seconds for j in list(self._jobs.values())
                if all_shapes or j.seconds is not None}

    def close(self, finish_running: bool = True) -> None:
        """Drop the shapes not started; with `finish_running`, wait for those being compiled (so
        the persistent cache gets them). Idempotent."""
        if _POOLS.get(self._step) is self:
            del _POOLS[self._step]
        with self._cv:
            self._closed = True
            while self._queue:
                self._queue.popleft().future.cancel()
            if finish_running:
                while self._busy:
                    self._cv.wait()

    # ---- workers ----------------------------------------------------------------------------------
    def _spawn(self) -> None:  # holds self._cv
        if self._closed:
            return
        for _ in range(min(self._target - self._busy, len(self._queue))):
            self._busy += 1
            self.workers_used = max(self.workers_used, self._busy)
            threading.Thread(target=self._work, name=f"compile-{self._busy}", daemon=True).start()

    def _work(self) -> None:
        lower_priority()
        try:
            while True:
                with self._cv:
                    if self._closed or not self._queue or self._busy > self._target:
                        return
                    job = self._queue.popleft()
                    if not job.future.set_running_or_notify_cancel():
                        continue
                    measure = not self._requested and self.footprint is None
                if measure:
                    with _PeakMemory() as peak:
                        self._run(job)
                    self._set_auto_target(peak.growth)
                else:
                    self._run(job)
        finally:
            with self._cv:
                self._busy -= 1
                self._cv.notify_all()

    def _run(self, job: _Job) -> None:
        t0 = time.perf_counter()
        try:
            compiled = self._step.compiled_for(*self._inputs, job.shape.batch)
            job.seconds = time.perf_counter() - t0
        except BaseException as e:  # the waiter re-raises it
            job.future.set_exception(e)
        else:
            job.future.set_result(compiled)

    def _set_auto_target(self, growth: int | None) -> None:
        cores = host_cores()
        with self._cv:
            self.footprint = growth or 0
            bound = memory_bound(growth)
            self._target = min(cores, bound) if bound is not None else cores
            log.info("compile workers: %d (%d cores; one compile grew host memory by %s)",
                     self._target, cores, f"{growth / 2 ** 20:.0f} MiB" if growth else "an unknown amount")
            self._spawn()


# The pool of each CompiledStep with one running: compiles submitted before the run's loop starts
# (by whatever prepares the run's data) are the ones the loop then waits for.
_POOLS: dict = {}


def pool_for(program, workers: int = 0) -> CompilePool:
    """The running pool of `program`'s step, or a new one with `workers` threads."""
    pool = _POOLS.get(program.step)
    if pool is None or pool.closed:
        inputs = program.abstract_inputs(1, 8, 8)[:2]  # (state, frozen): the same for every shape
        pool = _POOLS[program.step] = CompilePool(program.step, inputs, workers)
    return pool


def start(program, shapes: Sequence[tuple[int, int, int]], workers: int = 0) -> CompilePool:
    """Compile `program`'s step for (global rows, height, width) `shapes` in the background,
    from anywhere (e.g. while a run's caches are still being built); the loop finds the pool."""
    pool = pool_for(program, workers)
    pool.submit([Shape(bucket_label(*sh), program.abstract_batch(*sh)) for sh in shapes])
    return pool


def summary_line(seconds: dict, stall_s: float, first_wait_s: float) -> str:
    per = ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
    return (f"compiles: {per or 'none'}; total {sum(seconds.values()):.1f} s; waited {first_wait_s:.1f} s "
            f"for the first program; loop stall waiting for programs after it {stall_s:.1f} s")
