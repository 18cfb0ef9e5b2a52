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
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket

log = logging.getLogger(__name__)


class WorkdirLockedError(RuntimeError):
    """Another live process holds this workdir."""


def lock_path(workdir: str, process_index: int = 0) -> str:
    return os.path.join(os.path.abspath(workdir), f"train.{int(process_index)}.lock")


def _describe(info: dict) -> str:
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since "
            f"{info.get('since', '?')}")


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
        json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                   "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}, f)
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
