"""Orbax checkpoints: train state (params, EMA, optimizer, step, RNG), data-iterator state,
config and metadata in one step directory; async saves, keep-N, restore onto any mesh.

Layout: <workdir>/checkpoints/<step>/{state/, data/, config/, meta/}. Orbax writes each step
to a temporary directory and renames it when complete, so a killed save never looks finished.

Faults, each ending in one message rather than a wall of Orbax/TensorStore tracebacks:
- a committed step that does not restore (truncated or damaged files) is renamed
  `<step>.corrupt` (kept for inspection, never read again) and the previous step is used, so the
  resumed run can write that step number again; when steps exist but none restores, the run
  stops with `CheckpointError` naming the directory and nothing is renamed (starting over from 0
  silently would look like success);
- a save that runs out of disk (ENOSPC, also when TensorStore reports it inside another error
  from Orbax's async writer) raises `DiskFullError` "no space left on DIR; last good checkpoint
  is step N"; the unfinished temporary directory is removed, earlier steps are untouched.
"""
from __future__ import annotations

import errno
import logging
import re
import sys
from typing import Any, Callable, NamedTuple, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp

from sdxl_jax import paths
from sdxl_jax.parallel import host_barrier

log = logging.getLogger(__name__)
T = TypeVar("T")

# Orbax splits replicated shards between their replicas to parallelise writes; each split is an
# eager slice that compiles per shape, which costs far more than it saves for small arrays (a
# 4×2 mesh save of the tiny model compiled 225 slice programs: 22.4 s a save, 6.9 s without).
# Only shards of at least this many bytes per replica are split.
REPLICA_PARALLEL_MIN_BYTES = 16 * 1024 ** 2
CORRUPT_SUFFIX = ".corrupt"
_TMP_STEP = re.compile(r"^\d+" + re.escape(ocp.step.TMP_DIR_SUFFIX))
_NO_SPACE = ("No space left on device", "Disk quota exceeded")


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be used as asked (one line, names the directory)."""


class DiskFullError(CheckpointError):
    """A checkpoint write ran out of disk space."""


def _type_handlers():
    th = ocp.type_handlers
    return th.create_type_handler_registry(
        (int, th.ScalarHandler()), (float, th.ScalarHandler()), (np.number, th.ScalarHandler()),
        (np.ndarray, th.NumpyHandler()),
        (jax.Array, th.ArrayHandler(min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES,
                                    # every restore here names its target shardings (any mesh),
                                    # so the saved ones are never read: not writing them makes a
                                    # save of the tiny model's 1,637 arrays ~25 % faster
                                    enable_write_sharding_file=False)))


class Restored(NamedTuple):
    step: int
    state: Any
    data_state: dict
    config: dict
    meta: dict


def abstract_with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying the *target* shardings: restoring onto another device count
    or mesh only needs a different `shardings` tree."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract_tree, shardings)


# ---- disk full ---------------------------------------------------------------------------------

def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT anywhere in the exception's cause/context chain or exception group;
    TensorStore's errors arrive as ValueError("RESOURCE_EXHAUSTED: … No space left on device
    [os_error_code='28']"), so the text counts too."""
    for e in paths.exception_chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(s in str(e) for s in _NO_SPACE):
            return True
    return False


class _QuietOrbax(logging.Filter):
    """Drops Orbax log records that say nothing to the user: every failed array write of its
    writer threads with its traceback (a 30 MB tmpfs gave 1,002 of them; `DiskFullError` says it
    once), and the notice that a directory we opened read-only is read-only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and is_disk_full(record.exc_info[1]):
            return False
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 — a malformed record is not ours to judge
            return True
        return not (any(s in text for s in _NO_SPACE) or text.startswith("Given directory is read only"))


logging.getLogger("absl").addFilter(_QuietOrbax())  # Orbax logs through absl's logger


def quiet_abandoned_reads() -> None:
    """After a failed restore, TensorStore completes the reads Orbax abandoned and calls back into
    Orbax's already closed event loop; each callback prints "Exception ignored … RuntimeError:
    Event loop is closed" (hundreds of lines on a damaged SDXL step, after the one message that
    matters). Only that exact error is dropped; every other unraisable exception still prints."""
    if getattr(sys.unraisablehook, "_sdxl_jax_quiet", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
            previous(unraisable)
    hook._sdxl_jax_quiet = True
    sys.unraisablehook = hook


# ---- multi-host agreement ----------------------------------------------------------------------

def _all_processes_ok(ok: bool) -> bool:
    """True only if every process read the step: a shard damaged on one host's share must make
    all of them fall back together, or they would resume from different steps."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


class Checkpointer:
    """One run's checkpoint directory. `read_only=True` (sample, export) never creates, renames,
    deletes or cleans anything, so it is safe next to a running trainer."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = paths.absolute(directory)  # a local path or a gs:// URL
        self.read_only = read_only
        self._failure: DiskFullError | paths.StorageError | None = None  # ends every later call
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                                   save_interval_steps=0)
        else:
            # stale temporary directories of a killed save are removed at start (the workdir
            # lock guarantees no other trainer is writing one)
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                   enable_async_checkpointing=async_save,
                                                   cleanup_tmp_directories=True)
        self._mngr = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers()),
                           "data": ocp.JsonCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    @property
    def steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    # ---- writing -------------------------------------------------------------------------------
    def save(self, step: int, state, data_state: dict, config: dict, meta: dict) -> None:
        """Start (async) or write (sync) step `step`. Raises DiskFullError when this save or the
        previous async one ran out of space, StorageError when a gs:// directory does not answer
        (checked before starting: a save begun into an outage leaves Orbax's writer threads
        retrying for many minutes)."""
        def start():
            paths.check_reachable(self.directory)
            self._mngr.save(int(step), force=True, args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config),
                meta=ocp.args.JsonSave(meta)))
        self._guard(start)

    def wait(self) -> None:
        self._guard(self._mngr.wait_until_finished)

    def close(self) -> None:
        """Wait for a pending save, then release the manager. After a DiskFullError or
        StorageError was raised it only releases: closing while that error unwinds must not
        replace it."""
        try:
            if self._failure is None:
                self._guard(self._mngr.wait_until_finished)
        finally:
            try:
                self._mngr.close()
            except Exception:
                if self._failure is None:
                    raise

    def _guard(self, fn: Callable[[], T]) -> T:
        if self._failure is not None:
            raise self._failure
        try:
            return fn()
        except Exception as e:
            if is_disk_full(e):
                self._failure = self._disk_full_error()
            elif paths.is_remote(self.directory) and paths.is_unreachable(e):
                last = self._mngr.latest_step()  # known without asking the storage
                self._failure = paths.StorageError(
                    f"cannot write checkpoints to {self.directory}: storage did not answer "
                    f"({type(e).__name__}); the last committed checkpoint is "
                    f"{'step ' + str(last) if last is not None else 'none'}. Rerun the same "
                    "command once the bucket answers to resume from it")
            else:
                raise
            raise self._failure from e

    def _disk_full_error(self) -> DiskFullError:
        """Remove the unfinished step (it frees the space it took and can never complete) and
        name the newest complete one."""
        if jax.process_index() == 0:
            for name in paths.listdir(self.directory):
                if _TMP_STEP.match(name):
                    paths.rmtree(paths.join(self.directory, name))
        complete = [int(n) for n in paths.listdir(self.directory) if n.isdigit()]
        last = (f"last good checkpoint is step {max(complete)}" if complete
                else "no checkpoint has been written yet")
        return DiskFullError(f"no space left on {self.directory}; {last}. Free space (or lower "
                             "checkpoint.keep) and rerun the same command to resume")

    # ---- reading -------------------------------------------------------------------------------
    def restore(self, step: int, abstract_state) -> Restored:
        out = self._mngr.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=abstract_state,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)),
            data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        return Restored(int(step), out["state"], out["data"], out["config"], out["meta"])

    def restore_params(self, step: int, abstract_params, which: str = "ema_params",
                       on_host: bool = False):
        """Only one parameter tree of the state ("ema_params" or "params"), plus config and meta:
        sampling and export need neither the optimizer state nor the other copy (3× less I/O
        and host memory for a full-size model). `on_host`: numpy arrays, whatever shardings
        `abstract_params` carries (export converts on the host, on any device count)."""
        item = {which: abstract_params}
        if on_host:
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        else:
            restore_args = ocp.checkpoint_utils.construct_restore_args(item)
        out = self._mngr.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
            config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        return out["state"][which], out["config"], out["meta"] or {}

    def saved_tree(self, step: int, which: str):
        """The shapes/dtypes (Orbax metadata) of one tree of a step's state, read from its
        metadata file alone: a reader restores what was saved without tracing the model."""
        return self._mngr.item_metadata(int(step))["state"].tree[which]

    def read_json(self, step: int, name: str) -> dict:
        """The "config" or "meta" item of a step, without touching the arrays."""
        return self._mngr.restore(int(step), args=ocp.args.Composite(
            **{name: ocp.args.JsonRestore()}))[name]

    def latest_good(self, read: Callable[[int], T], move_aside: bool,
                    steps: list[int] | None = None) -> T | None:
        """`read(step)` of the newest of `steps` (default: all) it succeeds on, on every
        process; None when there are no steps. Failing steps are logged and, with `move_aside`,
        renamed `<step>.corrupt` once a readable one is found. All failing: CheckpointError,
        nothing renamed."""
        bad: list[tuple[int, str]] = []
        for step in sorted(self.steps if steps is None else steps, reverse=True):
            try:
                result, error = read(step), None
            except Exception as e:  # noqa: BLE001 — any read/validation failure means "bad step"
                result, error = None, f"{type(e).__name__}: {str(e)[:300]}"
                quiet_abandoned_reads()
            if not _all_processes_ok(error is None):
                error = error or "unreadable on another process"
                bad.append((step, error))
                log.warning("checkpoint step %d in %s is unreadable (%s); falling back to the "
                            "previous one", step, self.directory, error)
                continue
            if bad and move_aside:
                self._move_aside([s for s, _ in bad])
            return result
        if bad:
            hint = (": restore them from a backup, or move the directory away to start the run "
                    "over") if move_aside else ""
            raise CheckpointError(
                f"none of the checkpoints in {self.directory} is readable (steps "
                f"{sorted(s for s, _ in bad)}; newest: {bad[0][1]}). Nothing was changed{hint}")
        return None

    def restore_latest_good(self, abstract_state) -> Restored | None:
        """The trainer's resume: newest step that restores cleanly onto `abstract_state`; newer
        unreadable steps are renamed `<step>.corrupt`. None when there is no checkpoint;
        CheckpointError when there are some but none restores."""
        return self.latest_good(lambda s: self.restore(s, abstract_state), move_aside=True)

    def _move_aside(self, steps: list[int]) -> None:
        if self.read_only:
            raise CheckpointError(f"{self.directory} is opened read-only; not renaming steps {steps}")
        if jax.process_index() == 0:
            for step in steps:
                src = paths.join(self.directory, str(step))
                dst, n = src + CORRUPT_SUFFIX, 1
                while paths.exists(dst):  # the same step number went bad again in a later run
                    dst, n = f"{src}{CORRUPT_SUFFIX}.{n}", n + 1
                paths.rename(src, dst)
                log.warning("moved unreadable checkpoint step %d aside to %s (kept for "
                            "inspection; delete it when done)", step, dst)
        host_barrier("checkpoint.move_aside")
        self._mngr.reload()
