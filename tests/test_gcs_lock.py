"""One trainer per gs:// run directory, with real processes against a GCS server on loopback
(conftest.gcs_server): of several processes racing for the lock object exactly one wins and the
others stop naming it; a killed holder's lock is refused while its heartbeat is fresh and taken
over (logged) once it is older than the limit; a holder that finds its lock taken over stops at
once (exit 3) without writing anything more."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

from conftest import GCS_BUCKET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTEND = ("import logging, sys, time\n"
           "from sdxl_jax.workdir_lock import workdir_lock, WorkdirLockedError\n"
           "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
           "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all start together\n"
           "try:\n"
           "    lock = workdir_lock(sys.argv[1], 0).acquire()\n"
           "except WorkdirLockedError as e:\n"
           "    sys.exit(f'error: {e}')\n"
           "print('locked', flush=True)\n"
           "time.sleep(600)\n")


def _start(workdir, at=0.0, stale_s=None):
    env = dict(os.environ, PYTHONPATH=ROOT)
    if stale_s is not None:
        env["SDXL_JAX_LOCK_STALE_S"] = str(stale_s)
    return subprocess.Popen([sys.executable, "-c", CONTEND, workdir, str(at)], cwd=ROOT, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _lock_object(server, workdir):
    from google.cloud import storage
    key = workdir.split(f"gs://{GCS_BUCKET}/", 1)[1] + "/train.0.lock"
    blob = storage.Client().bucket(GCS_BUCKET).blob(key)
    blob.reload()
    return json.loads(blob.download_as_text()), int(blob.generation)


def _kill(*procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)


def test_racing_trainers_one_wins_the_others_name_it(gcs_server, gcs_dir):
    procs = [_start(gcs_dir, at=time.time() + 6) for _ in range(3)]
    try:
        deadline = time.time() + 60
        while sum(p.poll() is not None for p in procs) < 2 and time.time() < deadline:
            time.sleep(0.2)
        losers = [p for p in procs if p.poll() is not None]
        (winner,) = [p for p in procs if p.poll() is None]
        assert winner.stdout.readline().strip() == "locked"
        info, _ = _lock_object(gcs_server, gcs_dir)
        assert info["pid"] == winner.pid and info["host"] == socket.gethostname()
        for p in losers:
            err = p.stderr.read().strip().splitlines()[-1]
            assert p.returncode == 1 and err.startswith(
                f"error: workdir {gcs_dir} is in use by another trainer (pid {winner.pid} on host "
                f"{socket.gethostname()} since "), err
            assert f"lock object {gcs_dir}/train.0.lock" in err
    finally:
        _kill(*procs)


def test_stale_lock_taken_over_and_a_fenced_holder_stops(gcs_server, gcs_dir):
    procs = [_start(gcs_dir, stale_s=3)]
    try:
        first = procs[0]
        assert first.stdout.readline().strip() == "locked", first.stderr.read()
        _, gen0 = _lock_object(gcs_server, gcs_dir)
        time.sleep(1.5)  # heartbeat every 0.3 s: the object is rewritten while held
        assert _lock_object(gcs_server, gcs_dir)[1] != gen0
        # frozen (a suspended VM, a cut-off host): alive, so refused while its heartbeat is fresh
        first.send_signal(signal.SIGSTOP)
        procs.append(_start(gcs_dir, stale_s=3))
        assert procs[-1].wait(timeout=60) == 1 and f"pid {first.pid} on host" in procs[-1].stderr.read()
        time.sleep(3.5)  # now its last heartbeat is older than the limit
        second = _start(gcs_dir, stale_s=3)
        procs.append(second)
        assert second.stdout.readline().strip() == "locked", second.stderr.read()
        assert _lock_object(gcs_server, gcs_dir)[0]["pid"] == second.pid
        # on waking, the frozen holder finds its lock taken over and stops at once (exit 3)
        # instead of writing beside the new one
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=60) == 3
        assert "lost the workdir lock" in first.stderr.read()
        assert _lock_object(gcs_server, gcs_dir)[0]["pid"] == second.pid
        # killed holding it: the object stays, but its process is gone from this host, so the
        # next trainer takes over without waiting for the heartbeat to go stale
        second.kill()
        second.wait(timeout=30)
        third = _start(gcs_dir)  # default limit (minutes)
        procs.append(third)
        assert third.stdout.readline().strip() == "locked", third.stderr.read()
        assert _lock_object(gcs_server, gcs_dir)[0]["pid"] == third.pid
        third.kill()
        third.wait(timeout=30)
        err = second.stderr.read() + third.stderr.read()
        assert (f"took over the lock of pid {first.pid} on host {socket.gethostname()} since "
                in err and "its last heartbeat was" in err), err
        assert (f"took over the lock of pid {second.pid} on host {socket.gethostname()} since "
                in err and "that process no longer runs on this host" in err), err
    finally:
        _kill(*procs)
