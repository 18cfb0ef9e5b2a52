"""One trainer per workdir: an exclusive `fcntl.flock` on `<workdir>/train.<process>.lock`.

Two trainers on one workdir would both resume from the same step and race on the same temporary
checkpoint directory; the second now stops at once with a message naming the first (pid, host,
start time, written into the lock file by its holder).

The kernel drops a flock when its holder dies, so a lock left by a killed run (kill -9, OOM,
a lost node) is simply taken over: no pid checks, no timeouts. On Linux NFS, flock is carried
by NFS byte-range locks, so it also holds between hosts sharing the workdir.

Multi-host: one lock file per process index (`train.0.lock`, `train.1.lock`, …). The processes
of one job share the workdir, so a single file would make them lock each other out; per index,
every process of a second job meets the lock of the same-index process of the first and all of
them stop, instead of process 0 alone while the others wait in a collective.

Fork note: a child forked while the lock is held inherits it (flock belongs to the open file);
the trainer forks no workers, and none should be started before `release`.

A gs:// workdir has no flock: `ObjectLock` creates the lock object create-only (a generation
precondition: of two trainers racing, exactly one upload succeeds), writes its holder into it and
rewrites it every `heartbeat_s` (again under a precondition on its own last generation). Nothing
tells GCS that a holder died, so a lock whose last heartbeat (the object's update time, on the
storage service's clock) is older than `stale_s` (STALE_S, or SDXL_JAX_LOCK_STALE_S) counts as
left by a dead run and is taken over, logged. A holder whose heartbeat finds the lock taken over
(it was frozen or cut off for longer than `stale_s`) stops the process at once without saving:
another trainer now owns the run directory. `workdir_lock` picks the kind for a workdir.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid

from sdxl_jax import paths

log = logging.getLogger(__name__)

STALE_S = 300.0  # a gs:// lock not refreshed for this long was left by a dead run


class WorkdirLockedError(RuntimeError):
    """Another live process holds this workdir."""


def lock_path(workdir: str, process_index: int = 0) -> str:
    return paths.join(paths.absolute(workdir), f"train.{int(process_index)}.lock")


def workdir_lock(workdir: str, process_index: int = 0):
    """The lock for `workdir`: a flock'ed file locally, a heartbeat object on gs://."""
    if paths.is_remote(workdir):
        return ObjectLock(workdir, process_index)
    return WorkdirLock(workdir, process_index)


def _describe(info: dict) -> str:
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since "
            f"{info.get('since', '?')}")


def _owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _read_info(f) -> dict:
    f.seek(0)
    text = f.read()
    try:
        info = json.loads(text) if text.strip() else {}
    except ValueError:
        info = {}
    return info if isinstance(info, dict) else {}


class WorkdirLock:
    """`with WorkdirLock(workdir, jax.process_index()):` around a training run. Acquiring raises
    WorkdirLockedError when a live process holds it; a clean exit empties the file, so a
    non-empty file found on acquiring means its writer died without releasing (logged)."""

    def __init__(self, workdir: str, process_index: int = 0):
        self.path = lock_path(workdir, process_index)
        self._f = None

    def acquire(self) -> "WorkdirLock":
        if self._f is not None:
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        f = open(self.path, "a+")  # never truncate before holding the lock: it names the holder
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                f.close()
                raise
            holder = _read_info(f)
            f.close()
            raise WorkdirLockedError(self.busy(f"{_describe(holder)}; lock file {self.path}")) from None
        previous = _read_info(f)
        if previous:
            log.warning("took over the lock of %s: that run ended without releasing it (killed?)",
                        _describe(previous))
        f.seek(0)
        f.truncate()
        json.dump(_owner(), f)
        f.flush()
        self._f = f
        return self

    def busy(self, holder: str) -> str:
        """The message when another process holds the lock (`holder`: who, and the file)."""
        return (f"workdir {os.path.dirname(self.path)} is in use by another trainer ({holder}): "
                "wait for it to finish, stop it, or give another workdir")

    def release(self) -> None:
        if self._f is None:
            return
        try:
            self._f.seek(0)
            self._f.truncate()  # "released cleanly"; the next holder then logs no takeover
            self._f.flush()
        except OSError:
            pass  # e.g. disk trouble at exit: the lock still goes with the descriptor below
        finally:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)
            self._f.close()
            self._f = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _dead_here(info: dict) -> bool:
    """The holder ran on this host and its process is gone (e.g. it stopped during a storage
    outage and could not delete its lock): no need to wait for its heartbeat to go stale."""
    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return False
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class ObjectLock:
    """The lock object `<workdir>/train.<process>.lock` of a gs:// workdir (see the module
    docstring). `acquire` raises WorkdirLockedError naming the holder while its heartbeat is
    younger than `stale_s`."""

    def __init__(self, workdir: str, process_index: int = 0, stale_s: float | None = None,
                 heartbeat_s: float | None = None):
        self.path = lock_path(workdir, process_index)
        self.stale_s = float(stale_s or os.environ.get("SDXL_JAX_LOCK_STALE_S") or STALE_S)
        self.heartbeat_s = float(heartbeat_s or self.stale_s / 10)
        self._generation: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bucket = None
        self._info = dict(_owner(), token=uuid.uuid4().hex)  # tells our own writes from others'

    def _blob(self):
        if self._bucket is None:
            from google.cloud import storage
            self._bucket = storage.Client().bucket(self.path[len("gs://"):].partition("/")[0])
        return self._bucket.blob(self.path[len("gs://"):].partition("/")[2])

    def _write(self, if_generation_match: int) -> int:
        from google.api_core.retry import Retry
        blob, limit = self._blob(), max(self.heartbeat_s, 10.0)
        blob.upload_from_string(json.dumps(dict(self._info, heartbeat_s=self.heartbeat_s)),
                                content_type="application/json",
                                if_generation_match=if_generation_match,
                                retry=Retry(timeout=limit), timeout=limit)
        return int(blob.generation)

    def _ours_now(self) -> int | None:
        """The lock object's generation if it still holds our record (a refresh whose reply was
        lost and whose retry then failed its precondition), else None."""
        blob = self._blob()
        try:
            blob.reload()
            info = json.loads(blob.download_as_text(if_generation_match=blob.generation))
        except Exception:  # noqa: BLE001 — gone or replaced meanwhile: not ours
            return None
        return int(blob.generation) if info.get("token") == self._info["token"] else None

    def acquire(self) -> "ObjectLock":
        from google.api_core.exceptions import NotFound, PreconditionFailed
        if self._generation is not None:
            return self
        try:
            self._generation = paths.call_remote("lock", self.path, lambda: self._write(0))
        except PreconditionFailed:
            holder = self._blob()
            try:
                paths.call_remote("read", self.path, holder.reload)
                info = json.loads(holder.download_as_text(if_generation_match=holder.generation))
            except (NotFound, PreconditionFailed, ValueError):
                return self.acquire()  # released or refreshed between our two requests
            age = time.time() - holder.updated.timestamp()
            dead_here = _dead_here(info)
            if age <= self.stale_s and not dead_here:
                raise WorkdirLockedError(
                    f"workdir {os.path.dirname(self.path)} is in use by another trainer "
                    f"({_describe(info)}, heartbeat {age:.0f} s ago; lock object {self.path}): wait "
                    f"for it to finish, stop it, or give another workdir (a lock not refreshed for "
                    f"{self.stale_s:.0f} s is taken over)") from None
            try:  # only one of several trainers taking over the same stale lock succeeds
                self._generation = self._write(int(holder.generation))
            except PreconditionFailed:
                raise WorkdirLockedError(f"workdir {os.path.dirname(self.path)}: another trainer "
                                         f"took over the stale lock {self.path} first") from None
            why = ("that process no longer runs on this host" if dead_here else
                   f"its last heartbeat was {age:.0f} s ago (limit {self.stale_s:.0f} s)")
            log.warning("took over the lock of %s: %s, so that run ended without releasing it",
                        _describe(info), why)
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        from google.api_core.exceptions import PreconditionFailed
        failing_since = None
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._generation = self._write(self._generation)
                failing_since = None
            except PreconditionFailed:
                if self._stop.is_set():
                    return
                ours = self._ours_now()
                if ours is not None:
                    self._generation, failing_since = ours, None
                    continue
                # another trainer owns the run directory now: any further write of ours (a
                # checkpoint) would mix two runs, so stop without one
                log.error("lost the workdir lock %s: another trainer took it over after this "
                          "process could not refresh it for %.0f s; stopping at once without "
                          "saving", self.path, self.stale_s)
                logging.shutdown()
                os._exit(3)
            except Exception as e:  # noqa: BLE001 — storage trouble: the run's own writes report it
                if failing_since is None:
                    failing_since = time.time()
                    log.warning("could not refresh the workdir lock %s (%s: %s); retrying every "
                                "%.0f s", self.path, type(e).__name__, str(e)[:200], self.heartbeat_s)

    def release(self) -> None:
        if self._generation is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.heartbeat_s + 5)
        try:
            from google.api_core.retry import Retry
            limit = max(self.heartbeat_s, 10.0)
            self._blob().delete(if_generation_match=self._generation, retry=Retry(timeout=limit),
                                timeout=limit)
        except Exception as e:  # noqa: BLE001 — a lock left behind is taken over once stale
            log.warning("could not delete the workdir lock %s (%s); the next trainer takes it "
                        "over after %.0f s", self.path, type(e).__name__, self.stale_s)
        self._generation = None

    def __enter__(self) -> "ObjectLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
