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

_CONFIG = config_flags.DEFINE_config_file("config", "configs/ztsnr.py", "config file[:preset]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs, samples)",
                               required=True)
_COORD = flags.DEFINE_string("coordinator", "", "jax.distributed coordinator HOST:PORT (multi-process)")
_NPROC = flags.DEFINE_integer("num_processes", 0, "number of processes (with --coordinator)")
_PID = flags.DEFINE_integer("process_id", -1, "this process's index (with --coordinator)")


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout, force=True)  # library INFO: quieted by cli.run
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
    from sdxl_jax.run_inputs import Command
    from sdxl_jax.train.loop import train
    from sdxl_jax.train.prepare import prepare_run
    # how this trainer was started: a repair command it prints reruns with the same settings
    command = Command.from_argv(config_flags.get_config_filename(flags.FLAGS["config"]), sys.argv[1:])
    inputs = prepare_run(cfg, _WORKDIR.value, command)  # demo data, demo VAE, caches: made first
    summary = train(cfg, _WORKDIR.value, inputs, command)  # the task of cfg.task (unet | vae_decoder)
    logging.info("finished at step %d (%s); %d compiled step shape(s)", summary["end_step"],
                 summary["stopped"], summary["compiles"])


if __name__ == "__main__":
    from sdxl_jax import cli
    cli.run_absl(main)  # user errors as one line `error: …`; --debug shows the traceback
