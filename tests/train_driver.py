"""Subprocess driver for the fault-injection tests: train the test config in WORKDIR, logging
"step digest" per batch (flushed, so a killed run leaves what it fed) and, at the end, a digest
of the final params.

    python tests/train_driver.py WORKDIR LOGFILE [key=value ...]   (values parsed as JSON)
"""
import hashlib
import json
import os
import sys

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
    summary = train(tiny_config(**overrides), workdir, batch_log=FileLog(logfile))
    with open(logfile, "a") as f:
        for i, loss in enumerate(summary["losses"]):
            f.write(f"loss {summary['start_step'] + i + 1} {loss!r}\n")
        f.write(f"final {summary['stopped']} {summary['end_step']} {params_digest(summary['state'].params)}\n")


if __name__ == "__main__":
    main()
