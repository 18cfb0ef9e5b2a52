"""`profile_steps="a,b"`: one jax.profiler trace of optimizer steps a+1 … b under the workdir.

The window belongs to the run's step count, not to one process: a run resumed after step a
(its trace, if any, was written by the process that got there) traces nothing, and a window
that reaches past where this process stops (the run's end, `max_steps`, a preemption) is
closed when the process stops, so a trace is never left open nor stopped twice.
"""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("sdxl_jax.train")


def parse_window(spec: str) -> tuple[int, int] | None:
    if not spec:
        return None
    a, b = (int(x) for x in spec.split(","))
    if not 0 <= a < b:
        raise ValueError(f"profile_steps must be 'a,b' with 0 ≤ a < b, got {spec!r}")
    return a, b


class ProfileWindow:
    """Starts the trace before the step that follows step a, stops it after step b or at
    `close()`, whichever comes first."""

    def __init__(self, spec: str, workdir: str):
        self.window = parse_window(spec)
        self.directory = os.path.join(workdir, "profile")
        self.active = False

    def note_start(self, step: int) -> None:
        """Log when this process starts past the window's start (it writes no trace)."""
        if self.window is not None and step > self.window[0]:
            log.info("profile_steps=%d,%d: this run starts at step %d, past the window's start; "
                     "no trace is written", *self.window, step)

    def before_step(self, step: int) -> None:
        """`step`: optimizer steps done so far (the step about to run is step + 1)."""
        if self.window is not None and step == self.window[0] and not self.active:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after_step(self, step: int, state) -> None:
        if self.active and step >= self.window[1]:
            jax.block_until_ready(state)  # the trace holds the device work of its last step
            self._stop()

    def close(self) -> None:
        """On any exit: a trace still open (the window ends past where this process stops) is
        written with what it holds."""
        if self.active:
            self._stop()

    def _stop(self) -> None:
        jax.profiler.stop_trace()
        self.active = False
