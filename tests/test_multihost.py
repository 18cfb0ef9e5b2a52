"""Two CPU processes on localhost with jax.distributed (2 devices each) train the tiny model
from the cache, checkpoint, stop, and resume from that checkpoint (each process restarts its
run in place: a second pair of process starts would double the test's time); their losses equal
a single-process run with the same global batch (the reference run on 8 devices)."""
import os
import re
import socket
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(__file__)
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    # mesh.data=-1, mesh.fsdp=2 of the test config gives a 2×2 mesh over the 4 global devices;
    # the suite's other XLA flags (conftest.py) are kept
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    return dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}", **extra)


def _driver(workdir, log, cache, env, max_steps=None):
    args = [sys.executable, os.path.join(HERE, "train_driver.py"), workdir, log,
            f'data.cache_dir="{cache}"', f"train.steps={max_steps or STEPS}", "checkpoint.every_steps=2"]
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _losses(log) -> dict:
    out = {}
    for line in open(log):
        parts = line.split()
        if parts[0] == "loss":
            out[int(parts[1])] = float(parts[2])
    return out


def _run_pair(workdir, logs, cache, steps, restart_at):
    port = _free_port()
    procs = [_driver(workdir, logs[i], cache, _env(2, SDXL_JAX_TEST_COORDINATOR=f"127.0.0.1:{port}",
                                                   SDXL_JAX_TEST_NUM_PROCESSES="2",
                                                   SDXL_JAX_TEST_PROCESS_ID=str(i),
                                                   SDXL_JAX_TEST_RESTART_AT=str(restart_at)), steps)
             for i in range(2)]
    for p in procs:
        assert p.wait(timeout=1200) == 0, p.stderr.read()[-3000:]


def _runs(log) -> list[tuple[int, int]]:
    """(start step, end step) of each train() call, in order."""
    return [(int(p[1]), int(p[2])) for p in (line.split() for line in open(log)) if p[0] == "run"]


def test_two_processes_checkpoint_resume_and_match_single_process(demo_cache, reference_run, tmp_path):
    ref = dict(list(enumerate(reference_run[2]["losses"], start=1))[:STEPS])
    wd = str(tmp_path / "multi")
    logs = [str(tmp_path / f"p{i}.log") for i in range(2)]
    # each process: train to step 2 (checkpointed), stop, restore from step 2, train to the end
    _run_pair(wd, logs, demo_cache, steps=STEPS, restart_at=STEPS // 2)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2", "4"]
    for log in logs:
        assert _runs(log) == [(0, 2), (2, 4)]  # the second run started from the checkpoint
        got = _losses(log)
        assert sorted(got) == list(range(1, STEPS + 1))
        np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], rtol=1e-5)
