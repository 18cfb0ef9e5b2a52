"""Where a run's scalars and preview images go: TensorBoard (`<workdir>/tb`) always, and Weights &
Biases beside it when `log.wandb_project` is set, with the same tags at the same steps.

Only process 0 opens a writer (the loop hands the others None). `wandb` is imported only when
enabled. Its files go under `<workdir>/wandb`; the run id is kept in `<workdir>/wandb_id.txt`, so a
resumed run continues the same W&B run (`resume="allow"`) and its curves carry on. W&B keeps
steps monotonic: after resuming from a checkpoint older than the last logged step (a crash
between saves), it drops (with a warning) the re-run steps up to that step; TensorBoard keeps both.
"""
from __future__ import annotations

import logging
import os
import uuid

import numpy as np

log = logging.getLogger("sdxl_jax.train")

WANDB_ID_FILE = "wandb_id.txt"


class Writer:
    """SummaryWriter-shaped (add_scalar, add_image, close) fan-out over TensorBoard and an optional
    W&B run. As a context manager it finishes the W&B run on any exit, marked failed on an error."""

    def __init__(self, tb, wandb_run=None):
        self.tb, self.wandb_run = tb, wandb_run

    def add_scalar(self, tag: str, value, step: int) -> None:
        self.tb.add_scalar(tag, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log({tag: float(value)}, step=int(step))

    def add_image(self, tag: str, image, step: int, dataformats: str = "CHW") -> None:
        self.tb.add_image(tag, image, step, dataformats=dataformats)
        if self.wandb_run is not None:
            import wandb
            self.wandb_run.log({tag: wandb.Image(_hwc_uint8(image, dataformats))}, step=int(step))

    def close(self, failed: bool = False) -> None:
        """Closing TensorBoard on a full disk must not replace the error that ended the run (the
        checkpointer's one line naming the last good step) with its own; W&B is finished anyway."""
        try:
            self.tb.close()
        except OSError as e:
            log.warning("closing TensorBoard's event file failed: %s", e)
        finally:
            if self.wandb_run is not None:
                import wandb
                run, self.wandb_run = self.wandb_run, None
                run.finish(exit_code=1 if failed else 0)
                # finish() returns before W&B's service process has closed the run's stream (the
                # `.wandb` file was seen still at its 7-byte header); teardown waits for it, so
                # the run's files are complete (offline) or uploaded when train() returns.
                wandb.teardown()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close(failed=exc_type is not None)
        return False


def _hwc_uint8(image, dataformats: str) -> np.ndarray:
    """The pixels TensorBoard writes: HWC, uint8 as is, floats in [0, 1] scaled by 255."""
    if dataformats not in ("HWC", "CHW"):
        raise ValueError(f"dataformats={dataformats!r}: HWC or CHW")
    x = np.asarray(image)
    if dataformats == "CHW":
        x = np.transpose(x, (1, 2, 0))
    if x.dtype != np.uint8:
        x = np.clip(x.astype(np.float32) * 255.0, 0, 255).astype(np.uint8)
    return x


def open_writer(cfg, workdir: str, config: dict) -> Writer:
    """TensorBoard under `<workdir>/tb`, plus W&B when `cfg.log.wandb_project` is set, with
    `config` (the run's config as plain JSON) as the W&B run's config."""
    from tensorboardX import SummaryWriter
    tb = SummaryWriter(os.path.join(workdir, "tb"))
    lg = cfg.get("log")
    if not (lg and lg.wandb_project):
        return Writer(tb)
    try:
        return Writer(tb, _init_wandb(lg, workdir, config))
    except BaseException:
        tb.close()
        raise


def _init_wandb(lg, workdir: str, config: dict):
    import wandb
    id_path = os.path.join(workdir, WANDB_ID_FILE)
    if os.path.exists(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        with open(id_path, "w") as f:
            f.write(run_id + "\n")
    run = wandb.init(project=lg.wandb_project, entity=lg.wandb_entity or None,
                     name=lg.wandb_run_name or None, mode=lg.wandb_mode or None,
                     dir=workdir,  # W&B writes <dir>/wandb/
                     id=run_id, resume="allow", config=config)
    log.info("W&B run %s (project %s, mode %s) in %s", run.id, lg.wandb_project,
             run.settings.mode, os.path.join(workdir, "wandb"))
    return run
