"""One trainer per workdir, checked with real processes: a second one stops at once naming the
first (pid, host, start time); a lock left by a kill -9 is taken over; lock files are per process
index, so the processes of one multi-host job do not lock each other out."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from sdxl_jax.workdir_lock import WorkdirLock, WorkdirLockedError, lock_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLDER = ("import sys, time\n"
          "from sdxl_jax.workdir_lock import WorkdirLock\n"
          "lock = WorkdirLock(sys.argv[1], int(sys.argv[2])).acquire()\n"
          "print('locked', flush=True)\n"
          "time.sleep(600)\n")
TRY = ("import logging, sys\n"
       "from sdxl_jax.workdir_lock import WorkdirLock, WorkdirLockedError\n"
       "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
       "try:\n"
       "    with WorkdirLock(sys.argv[1], int(sys.argv[2])):\n"
       "        print('acquired', flush=True)\n"
       "except WorkdirLockedError as e:\n"
       "    sys.exit(f'error: {e}')\n")


def _python(code, *args, **kw):
    return [sys.executable, "-c", code, *map(str, args)], dict(cwd=ROOT, text=True,
                                                            env=dict(os.environ, PYTHONPATH=ROOT), **kw)


def _hold(workdir, index=0):
    cmd, kw = _python(HOLDER, workdir, index, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc = subprocess.Popen(cmd, **kw)
    assert proc.stdout.readline().strip() == "locked", proc.stderr.read()
    return proc


def _try(workdir, index=0):
    cmd, kw = _python(TRY, workdir, index, capture_output=True, timeout=60)
    t0 = time.time()
    proc = subprocess.run(cmd, **kw)
    return proc, time.time() - t0


def test_second_process_stops_naming_the_first_and_stale_lock_is_taken_over(tmp_path):
    wd = str(tmp_path / "run")
    first = _hold(wd)
    try:
        second, seconds = _try(wd)
        assert second.returncode == 1 and "acquired" not in second.stdout
        msg = second.stderr.strip()
        assert msg.startswith(f"error: workdir {wd} is in use by another trainer (pid {first.pid} "
                              f"on host {socket.gethostname()} since "), msg
        assert lock_path(wd) in msg and "\n" not in msg
        assert seconds < 30  # at once: no waiting for the holder
        other_index, _ = _try(wd, index=1)  # another process of the same job: its own file
        assert other_index.returncode == 0 and other_index.stdout.strip() == "acquired"
    finally:
        first.send_signal(signal.SIGKILL)  # dies holding the lock: no clean release
        first.wait(timeout=30)
    assert json.load(open(lock_path(wd)))["pid"] == first.pid  # the stale record is still there
    third, _ = _try(wd)
    assert third.returncode == 0 and third.stdout.strip() == "acquired", third.stderr
    assert f"took over the lock of pid {first.pid} on host {socket.gethostname()}" in third.stderr
    assert open(lock_path(wd)).read() == ""  # released cleanly: the next holder logs no takeover


def test_in_process_release_and_reacquire(tmp_path, caplog):
    wd = str(tmp_path / "run")
    with WorkdirLock(wd) as lock:
        info = json.load(open(lock.path))
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()} on host"):
            WorkdirLock(wd).acquire()  # a second open file of the same process is refused too
    with caplog.at_level("WARNING"), WorkdirLock(wd):
        pass
    assert "took over" not in caplog.text
