"""Train SDXL with the NovelAI Diffusion V3 recipe.

    python train.py --config configs/ztsnr.py[:tiny] --workdir DIR [--config.a.b=value ...]

Resumes automatically from the latest good checkpoint in DIR. Multi-host: on TPU pod slices
run the same command on every worker (jax.distributed discovers the slice); elsewhere pass
--coordinator HOST:PORT --num_processes N --process_id I on each process.
"""
from __future__ import annotations

import logging
import sys

from absl import flags
from ml_collections import config_flags

from sdxl_jax.models.hf import block_torch

block_torch()  # diffusers imports torch when it is installed; training never needs it

_CONFIG = config_flags.DEFINE_config_file("config", "configs/ztsnr.py", "config file[:preset]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs, samples)",
                               required=True)
_COORD = flags.DEFINE_string("coordinator", "", "jax.distributed coordinator HOST:PORT (multi-process)")
_NPROC = flags.DEFINE_integer("num_processes", 0, "number of processes (with --coordinator)")
_PID = flags.DEFINE_integer("process_id", -1, "this process's index (with --coordinator)")


def quiet_libraries() -> None:
    """Orbax and Grain log every file they touch at INFO through absl; keep our log readable."""
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout, force=True)
    quiet_libraries()
    from sdxl_jax import parallel
    parallel.maybe_initialize_distributed(_COORD.value, _NPROC.value, _PID.value)
    import jax
    from sdxl_jax.config import validate

    cfg = _CONFIG.value
    validate(cfg, num_devices=jax.device_count())  # a ConfigError is one line (sdxl_jax.cli)
    from sdxl_jax import paths
    if paths.isfile(_WORKDIR.value):
        raise NotADirectoryError(f"--workdir {_WORKDIR.value!r} is a file, not a run directory; "
                                 "choose another path")
    from sdxl_jax.train.loop import train
    summary = train(cfg, _WORKDIR.value)  # the task of cfg.task (unet | vae_decoder)
    logging.info("finished at step %d (%s); %d compiled step shape(s)", summary["end_step"],
                 summary["stopped"], summary["compiles"])


if __name__ == "__main__":
    from sdxl_jax import cli
    cli.run_absl(main)  # user errors as one line `error: …`; --debug shows the traceback
