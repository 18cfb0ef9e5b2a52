"""Where a run's scalars and preview images go: TensorBoard (`<workdir>/tb`) always, and Weights &
Biases beside it when `log.wandb_project` is set, with the same tags at the same steps.

A gs:// run writes its TensorBoard events into a local directory and uploads the event files
whole at every log boundary (`flush`) and at close: object storage has no append, and a writer
appending through it would rewrite the object at every record. The event file name carries the
pid and a random suffix, so two writers started in the same second never share one.

Only process 0 opens a writer (the loop hands the others None). `wandb` is imported only when
enabled. Its files go under `<workdir>/wandb` (a gs:// run: under the local stand-in
`paths.local_mirror_dir(workdir, "wandb")`, W&B writes files); the run id is kept in
`<workdir>/wandb_id.txt`, so a
resumed run continues the same W&B run (`resume="allow"`) and its curves carry on. W&B keeps
steps monotonic: after resuming from a checkpoint older than the last logged step (a crash
between saves), it drops (with a warning) the re-run steps up to that step; TensorBoard keeps both.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid

import numpy as np

from sdxl_jax import paths

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

    def flush(self) -> None:
        """Make what was logged so far visible to TensorBoard (a gs:// run: uploaded)."""
        self.tb.flush()

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


class UploadedEvents:
    """A tensorboardX SummaryWriter into a local directory whose event files are uploaded whole to
    `url` at each flush (only files that grew) and at close."""

    def __init__(self, url: str):
        from tensorboardX import SummaryWriter
        self.url, self.local = url, tempfile.mkdtemp(prefix="sdxl_jax_tb_")
        self._sizes: dict = {}
        self._tb = SummaryWriter(self.local, filename_suffix=f".{os.getpid()}.{uuid.uuid4().hex[:8]}")

    def add_scalar(self, *args, **kw):
        self._tb.add_scalar(*args, **kw)

    def add_image(self, *args, **kw):
        self._tb.add_image(*args, **kw)

    def flush(self) -> None:
        self._tb.flush()
        for rel in paths.walk_files(self.local):
            size = os.path.getsize(os.path.join(self.local, rel))
            if self._sizes.get(rel) != size:
                paths.upload(os.path.join(self.local, rel), paths.join(self.url, rel))
                self._sizes[rel] = size

    def close(self) -> None:
        try:
            self._tb.close()
            self.flush()
        finally:
            shutil.rmtree(self.local, ignore_errors=True)


def open_writer(cfg, workdir: str, config: dict) -> Writer:
    """TensorBoard under `<workdir>/tb`, plus W&B when `cfg.log.wandb_project` is set, with
    `config` (the run's config as plain JSON) as the W&B run's config."""
    from tensorboardX import SummaryWriter
    tb_dir = paths.join(workdir, "tb")
    tb = UploadedEvents(tb_dir) if paths.is_remote(tb_dir) else SummaryWriter(tb_dir)
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
    id_path = paths.join(workdir, WANDB_ID_FILE)
    if paths.exists(id_path):
        run_id = paths.read_text(id_path).strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        paths.write_text(id_path, run_id + "\n")
    files = paths.local_mirror_dir(workdir, "wandb")  # W&B writes local files only
    os.makedirs(files, exist_ok=True)
    run = wandb.init(project=lg.wandb_project, entity=lg.wandb_entity or None,
                     name=lg.wandb_run_name or None, mode=lg.wandb_mode or None,
                     dir=files,  # W&B writes <dir>/wandb/
                     id=run_id, resume="allow", config=config)
    log.info("W&B run %s (project %s, mode %s) in %s", run.id, lg.wandb_project,
             run.settings.mode, os.path.join(files, "wandb"))
    return run
