"""Pieces of the one training loop (loop.py) kept apart for reading: run metadata, preemption
handling, the progress bar, metric pooling and the one-step-late metric reader."""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from importlib import metadata as importlib_metadata

import jax
import numpy as np

log = logging.getLogger("sdxl_jax.train")

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tokenizers")


class NonFiniteError(RuntimeError):
    pass


def package_versions() -> dict:
    """Versions of the packages a checkpoint's numbers depend on (None when not installed)."""
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = importlib_metadata.version(p)
        except importlib_metadata.PackageNotFoundError:
            versions[p] = None
    return versions


def config_json(cfg) -> dict:
    return json.loads(cfg.to_json_best_effort())


def use_compilation_cache(workdir: str) -> None:
    """Persistent XLA cache under the workdir (unless one is set): a resumed run skips compiling."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))


def demo_images(cfg, workdir: str) -> str:
    """The generated demo dataset in <workdir>/demo_data (made once): the tiny preset's fallback
    when no data is configured at all, so a demo runs on a fresh machine with no network."""
    from sdxl_jax.data.demo import data_dir, make_demo_dataset
    images = data_dir(workdir)
    if not os.path.isdir(images) or not os.listdir(images):
        log.info("generating the demo dataset (%d images) in %s", cfg.data.demo_size, images)
        make_demo_dataset(images, n=cfg.data.demo_size, seed=0)
    return images


class Preemption:
    """SIGTERM (and the TPU preemption notice on multi-host) → finish the step, save, exit 0."""

    def __init__(self):
        self.requested = False
        self._old = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        log.warning("SIGTERM received: finishing the current step, then checkpointing")
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    return True
            except RuntimeError:  # preemption service not running (explicit coordinator runs)
                pass
            # every host must agree, or one would wait forever in the next collective
            return bool(multihost_utils.process_allgather(np.array(self.requested)).any())
        return self.requested

    def restore(self):
        signal.signal(signal.SIGTERM, self._old)


def progress(is_main, start, total):
    if not is_main:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)


class MetricMeans:
    """Pools the metrics between two log lines: scalars are averaged over the finite steps
    (skipped steps are counted, not averaged in); a pair of arrays `<name>_sum` / `<name>_count`
    (e.g. the loss per timestep range) is pooled as Σsum/Σcount and reported under the labels
    `bin_labels[name]` gives (entries with no samples are left out)."""

    def __init__(self, bin_labels: dict | None = None):
        self.bin_labels = dict(bin_labels or {})
        self._reset()

    def _reset(self):
        self._sums: dict = {}
        self._scalars: set = set()
        self.n = self.skipped = 0

    def add(self, metrics: dict) -> None:
        self.n += 1
        self._scalars.update(k for k, v in metrics.items() if k != "finite" and np.ndim(v) == 0)
        if not metrics["finite"]:
            self.skipped += 1
            return
        for k, v in metrics.items():
            if k != "finite":
                v = np.asarray(v, np.float64)
                self._sums[k] = self._sums.get(k, 0.0) + v

    def pop(self) -> dict:
        good = max(self.n - self.skipped, 1)
        out = {}
        for k, v in self._sums.items():
            base = k[:-4] if k.endswith("_sum") else k[:-6] if k.endswith("_count") else None
            if base in self.bin_labels:
                if k.endswith("_sum"):
                    counts = self._sums.get(base + "_count")
                    for label, total, c in zip(self.bin_labels[base], v, counts):
                        if c:
                            out[label] = float(total / c)
            elif np.ndim(v) == 0:
                out[k] = float(v) / good
        for k in self._scalars - set(out):  # every step of the window was skipped
            out[k] = float("nan")
        out.update(nonfinite=self.skipped, _n=self.n)
        self._reset()
        return out


def host_metrics(m: dict) -> dict:
    """Fetched metrics as host numbers: scalars → float (finite → bool), arrays → numpy."""
    return {k: bool(v) if k == "finite" else float(v) if np.ndim(v) == 0 else np.asarray(v)
            for k, v in m.items()}


class MetricReader:
    """Reads one step's metrics (a step late, so the host never waits on the device it just fed):
    records the loss, counts non-finite steps (K in a row raise NonFiniteError, pointing at the
    last good checkpoint), advances the progress bar, and every `train.log_every` steps writes
    the means to TensorBoard and one log line (`log_line(step, means) -> str`).

    `acc` pools the metrics between log lines (MetricMeans); `metrics_log`, when given, collects
    (step, host metrics) of every step."""

    def __init__(self, cfg, acc, ckpt, schedule_fn, writer, pbar, is_main: bool, stop_at: int,
                 losses: list, log_line, lr_hint: str, metrics_log=None):
        self.cfg, self.acc, self.ckpt, self.schedule_fn = cfg, acc, ckpt, schedule_fn
        self.writer, self.pbar, self.is_main, self.stop_at = writer, pbar, is_main, stop_at
        self.losses, self.log_line, self.lr_hint = losses, log_line, lr_hint
        self.metrics_log = metrics_log
        self.t_last = time.perf_counter()

    def __call__(self, s: int, m) -> None:
        m = host_metrics(jax.device_get(m))
        in_a_row = int(m.pop("nonfinite_in_a_row"))  # the state's counter: it survives a resume
        self.losses.append(float(m["loss"]))
        if self.metrics_log is not None:
            self.metrics_log.append((s, m))
        acc = self.acc
        acc.add(m)
        if not m["finite"]:
            log.warning("step %d: non-finite loss/gradient, update skipped (%d in a row)", s, in_a_row)
            if in_a_row >= self.cfg.train.max_nonfinite:
                raise NonFiniteError(
                    f"{in_a_row} consecutive non-finite steps up to step {s}: "
                    f"stopping. The last good checkpoint ({self.ckpt.latest_step()}) is intact; "
                    f"lower {self.lr_hint} or check the data")
        if self.pbar is not None:
            self.pbar.update(1)
            self.pbar.set_postfix(loss=f"{float(m['loss']):.4f}")
        if s % self.cfg.train.log_every == 0 or s == self.stop_at:
            out = acc.pop()
            now = time.perf_counter()
            out["lr"] = float(self.schedule_fn(s))
            out["steps_per_s"] = out.pop("_n") / max(now - self.t_last, 1e-9)
            self.t_last = now
            if self.writer is not None:
                for k, v in out.items():
                    self.writer.add_scalar(f"train/{k}", v, s)
                self.writer.flush()  # a gs:// run's event file is uploaded here
            if self.is_main:
                log.info("%s", self.log_line(s, out))
