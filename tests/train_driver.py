"""Subprocess driver for the fault-injection tests: train the test config in WORKDIR, logging
"step digest" per batch (flushed, so a killed run leaves what it fed) and, at the end, a digest
of the final params.

    python tests/train_driver.py WORKDIR LOGFILE [key=value ...]   (values parsed as JSON)

When a `train()` call returns, its losses ("loss STEP VALUE") and "run START_STEP END_STEP" are
appended to the log.

SDXL_JAX_TEST_PAUSE_AT=N with SDXL_JAX_TEST_PAUSE_FILE=P: when step N's batch is fetched, create
P.paused and wait until P.go exists (a test acts on the world between two known steps).
"""
import hashlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))


class FileLog(list):
    def __init__(self, path):
        super().__init__()
        self._f = open(path, "a", buffering=1)

    def append(self, item):
        super().append(item)
        self._f.write(f"{item[0]} {item[1]}\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        if str(item[0]) == os.environ.get("SDXL_JAX_TEST_PAUSE_AT"):
            pause = os.environ["SDXL_JAX_TEST_PAUSE_FILE"]
            open(pause + ".paused", "w").close()
            while not os.path.exists(pause + ".go"):
                time.sleep(0.05)


def params_digest(params) -> str:
    import jax
    import numpy as np
    h = hashlib.sha1()
    for leaf in jax.tree.leaves(params):
        h.update(np.asarray(jax.device_get(leaf)).tobytes())
    return h.hexdigest()


def main():
    workdir, logfile, *pairs = sys.argv[1:]
    if os.environ.get("SDXL_JAX_TEST_COORDINATOR"):  # multi-process test: one of N CPU processes
        from sdxl_jax.parallel import maybe_initialize_distributed
        maybe_initialize_distributed(os.environ["SDXL_JAX_TEST_COORDINATOR"],
                                     int(os.environ["SDXL_JAX_TEST_NUM_PROCESSES"]),
                                     int(os.environ["SDXL_JAX_TEST_PROCESS_ID"]))
    from helpers import tiny_config
    from sdxl_jax.train.loop import train
    overrides = {k: json.loads(v) for k, v in (p.split("=", 1) for p in pairs)}
    # SDXL_JAX_TEST_RESTART_AT=N: stop after step N, then resume in the same process (a restart
    # from the checkpoint without paying for a second process start)
    restart = os.environ.get("SDXL_JAX_TEST_RESTART_AT")
    log = FileLog(logfile)
    for max_steps in ([int(restart)] if restart else []) + [None]:
        summary = train(tiny_config(**overrides), workdir, max_steps=max_steps, batch_log=log)
        with open(logfile, "a") as f:
            for i, loss in enumerate(summary["losses"]):
                f.write(f"loss {summary['start_step'] + i + 1} {loss!r}\n")
            f.write(f"run {summary['start_step']} {summary['end_step']}\n")
    with open(logfile, "a") as f:
        f.write(f"final {summary['stopped']} {summary['end_step']} {params_digest(summary['state'].params)}\n")


if __name__ == "__main__":
    from sdxl_jax import cli
    cli.run(lambda argv: main())  # user errors as one line `error: …`, as train.py
