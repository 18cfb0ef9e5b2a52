"""Pieces shared by the trainers (UNet loop.py, VAE decoder vae_loop.py): run metadata,
preemption handling, the progress bar, the demo dataset fallback, metric averaging."""
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

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "diffusers", "transformers")


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
    when no data is configured, so a demo runs on a fresh machine with no network."""
    from data_tools.make_demo_dataset import make_demo_dataset
    images = os.path.join(workdir, "demo_data")
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


class ScalarMeans:
    """Means of scalar metrics over the finite steps between two log lines (skipped steps are
    counted, not averaged in)."""

    def __init__(self):
        self.consecutive_nonfinite = 0
        self._sums: dict[str, float] = {}
        self.n = self.skipped = 0

    def add(self, metrics: dict) -> None:
        self.n += 1
        if not metrics["finite"]:
            self.skipped += 1
            return
        for k, v in metrics.items():
            if k != "finite":
                self._sums[k] = self._sums.get(k, 0.0) + float(v)

    def pop(self) -> dict:
        good = max(self.n - self.skipped, 1)
        out = {k: v / good for k, v in self._sums.items()}
        out.update(nonfinite=self.skipped, _n=self.n)
        self._sums, self.n, self.skipped = {}, 0, 0
        return out


class MetricReader:
    """Reads one step's metrics (a step late, so the host never waits on the device it just fed):
    records the loss, counts non-finite steps (K in a row raise NonFiniteError, pointing at the
    last good checkpoint), advances the progress bar, and every `train.log_every` steps writes
    the means to TensorBoard and one log line (`log_line(step, means) -> str`).

    `acc` pools the metrics between log lines (add / pop, `consecutive_nonfinite`); `host`
    converts the fetched metrics (default: as fetched)."""

    def __init__(self, cfg, acc, ckpt, schedule_fn, writer, pbar, is_main: bool, stop_at: int,
                 losses: list, log_line, lr_hint: str, host=None, metrics_log=None):
        self.cfg, self.acc, self.ckpt, self.schedule_fn = cfg, acc, ckpt, schedule_fn
        self.writer, self.pbar, self.is_main, self.stop_at = writer, pbar, is_main, stop_at
        self.losses, self.log_line, self.lr_hint = losses, log_line, lr_hint
        self.host, self.metrics_log = host, metrics_log
        self.t_last = time.perf_counter()

    def __call__(self, s: int, m) -> None:
        m = jax.device_get(m)
        if self.host is not None:
            m = self.host(m)
        self.losses.append(float(m["loss"]))
        if self.metrics_log is not None:
            self.metrics_log.append((s, m))
        acc = self.acc
        acc.add(m)
        if not m["finite"]:
            acc.consecutive_nonfinite += 1
            log.warning("step %d: non-finite loss/gradient, update skipped (%d in a row)",
                        s, acc.consecutive_nonfinite)
            if acc.consecutive_nonfinite >= self.cfg.train.max_nonfinite:
                raise NonFiniteError(
                    f"{acc.consecutive_nonfinite} consecutive non-finite steps up to step {s}: "
                    f"stopping. The last good checkpoint ({self.ckpt.latest_step()}) is intact; "
                    f"lower {self.lr_hint} or check the data")
        else:
            acc.consecutive_nonfinite = 0
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
            if self.is_main:
                log.info("%s", self.log_line(s, out))
