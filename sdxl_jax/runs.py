"""One reader of a saved run: `open_run(workdir, step=None)` → its config, metadata and named
parameter trees, for sample, export and any task that starts from another run.

    run = open_run("runs/nai3")                  # newest readable step
    unet = run.params("unet")                    # EMA when the run kept one, else raw
    frozen = run.frozen()                        # {"vae", "text_l", "text_g"} of the run
    vae = open_run("runs/vae_ft").params("vae")  # a decoder finetune: source encoder + decoder

What comes from where:
- UNet runs: "unet" from the checkpoint (only the chosen tree is read: no optimizer state, no
  second copy); "vae", "text_l", "text_g" from `weights.frozen_params` (model.pretrained, else
  the seeded random init) — the frozen weights the run trained with.
- VAE decoder runs (config task "vae_decoder"): "vae" is the frozen encoder rebuilt from the
  run's source, checked against the fingerprint saved at training time, merged with the trained
  decoder; with model.train_encoder the whole VAE comes from the checkpoint.

Unreadable steps: as in training, the newest step that reads is used and newer broken ones are
reported (a reader never renames them: it may run beside the trainer or without write access;
the trainer moves them aside when it next starts). Once a tree has been read the run's step is
fixed, so every tree and the metadata come from one step. A step asked for explicitly is
never substituted: it reads or raises CheckpointError.

Placement: one device (this host's first) by default, or host numpy (`on_host=True`, what export
converts from); neither needs the device count the run trained on.
"""
from __future__ import annotations

import os

import jax

from sdxl_jax.checkpoint import CORRUPT_SUFFIX, Checkpointer, CheckpointError, quiet_abandoned_reads
from sdxl_jax.models import vae_parts
from sdxl_jax.models.weights import FROZEN

NAMES = ("unet",) + FROZEN
VAE_TASK = "vae_decoder"
WEIGHTS = ("ema", "raw")
_FIELD = {"ema": "ema_params", "raw": "params"}


def _checkpoints_dir(path: str, step: int | None) -> tuple[str, int | None]:
    """(checkpoints directory, step) from a workdir or a step directory <workdir>/checkpoints/<n>."""
    path = os.path.abspath(os.path.expanduser(str(path)).rstrip("/"))
    base, name = os.path.split(path)
    if name.isdigit() and os.path.isdir(path):
        if step is not None and step != int(name):
            raise ValueError(f"{path} is the checkpoint of step {name}, but step {step} was asked for")
        return base, int(name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such run directory")
    ckdir = os.path.join(path, "checkpoints")
    if not os.path.isdir(ckdir):
        raise FileNotFoundError(f"no checkpoints in {path}: not a run directory (no checkpoints/ "
                                "in it) nor a checkpoint step directory <workdir>/checkpoints/<step>")
    return ckdir, step


class Run:
    """A saved run at one step. Attributes: config (dict), meta (dict), step (int), task,
    directory (<workdir>/checkpoints), checkpoint_dir (<workdir>/checkpoints/<step>)."""

    def __init__(self, directory: str, step: int | None):
        self.directory = directory
        self._pinned = step is not None  # an explicit step, or one a tree was already read from
        self._frozen: dict = {}
        ck = self._open()
        try:
            steps = ck.steps
            if not steps:
                moved = sorted(n for n in os.listdir(directory) if CORRUPT_SUFFIX in n)
                hint = f" (only steps moved aside as unreadable: {moved})" if moved else ""
                raise CheckpointError(f"no finished checkpoint in {directory}{hint}")
            if step is not None and step not in steps:
                raise CheckpointError(f"no checkpoint for step {step} in {directory} (have {steps})")
            self._read(ck, self._read_json, step, older_than=None)
        finally:
            ck.close()

    # ---- what the run is -----------------------------------------------------------------------
    @property
    def task(self) -> str:
        return self.config.get("task", "unet")

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.directory, str(self.step))

    def default_weights(self) -> str:
        return "ema" if self.config.get("ema", {}).get("enabled", True) else "raw"

    # ---- parameter trees -----------------------------------------------------------------------
    def params(self, name: str, weights: str | None = None, on_host: bool = False):
        """Parameter tree `name` ("unet", "vae", "text_l", "text_g"); `weights` "ema" or "raw"
        (default: EMA when the run kept one) picks the trained copy and is ignored for frozen
        models."""
        if name not in NAMES:
            raise ValueError(f"unknown parameter tree {name!r}; choose from {NAMES}")
        weights = weights or self.default_weights()
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
        if self.task == VAE_TASK:
            if name != "vae":
                raise ValueError(f"{self.directory} is a VAE decoder run: it has a 'vae' tree "
                                 f"only, not {name!r}")
            return self._vae(weights, on_host)
        if name == "unet":
            return self._trained(weights, on_host)
        return self.frozen((name,), on_host)[name]

    def frozen(self, components=FROZEN, on_host: bool = False) -> dict:
        """The run's frozen models (weights.frozen_params of its config), made once per Run."""
        from sdxl_jax.models.weights import frozen_params
        missing = tuple(c for c in components if c not in self._frozen)
        if missing:
            self._frozen.update(frozen_params(self.config, components=missing))
        out = {c: self._frozen[c] for c in components}
        return jax.device_get(out) if on_host else out

    def _vae(self, weights: str, on_host: bool) -> dict:
        trained = self._trained(weights, on_host)["generator"]
        if self.config["model"].get("train_encoder", False):  # the whole VAE trained
            return trained
        encoder, _ = vae_parts.split_vae_params(self.frozen(("vae",), on_host)["vae"])
        saved = self.meta.get("encoder_fingerprint")
        now = vae_parts.encoder_fingerprint(encoder)
        if saved and saved != now:
            source = self.config["model"]["pretrained"] or "the seeded random init"
            raise ValueError(f"the encoder rebuilt from the run's source ({source}) is not the one "
                             f"the decoder in {self.checkpoint_dir} was trained against "
                             f"(fingerprint {now} ≠ {saved}): the pretrained weights changed "
                             "since training")
        return vae_parts.merge_vae_params(encoder, trained)

    def _trained(self, weights: str, on_host: bool):
        """The params or EMA tree of the checkpoint's state, as saved (shapes from the step's
        metadata), falling back like training while the step is not pinned."""
        if weights == "ema" and not self.config.get("ema", {}).get("enabled", True):
            raise ValueError(f"the run in {self.directory} trained with ema.enabled=False, so its "
                             "EMA weights are the initial ones; ask for the raw weights "
                             "(--weights raw)")
        field = _FIELD[weights]
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this host's first

        def read(ck, step):
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev),
                                    ck.saved_tree(step, field))
            tree, cfg, meta = ck.restore_params(step, abstract, field, on_host)
            return cfg, meta, tree

        ck = self._open()
        try:
            _, _, tree = self._read(ck, read, self.step if self._pinned else None,
                                    older_than=None if self._pinned else self.step + 1)
        finally:
            ck.close()
        self._pinned = True
        return tree

    # ---- reading with the fallback -------------------------------------------------------------
    def _open(self) -> Checkpointer:
        return Checkpointer(self.directory, read_only=True)

    @staticmethod
    def _read_json(ck: Checkpointer, step: int):
        return ck.read_json(step, "config"), ck.read_json(step, "meta") or {}

    def _read(self, ck: Checkpointer, read, step: int | None, older_than: int | None):
        """read(ck, step) of the pinned `step`, else of the newest step below `older_than` that
        reads (config and meta switch with it)."""
        if step is not None:
            try:
                out = read(ck, step)
            except Exception as e:  # noqa: BLE001 — one message for any read failure
                quiet_abandoned_reads()
                raise CheckpointError(
                    f"checkpoint step {step} in {self.directory} is unreadable ({type(e).__name__}: "
                    f"{str(e)[:300]}); ask for another step, or leave the step out to use the "
                    "newest readable one") from None
        else:
            result = ck.latest_good(lambda s: (s, read(ck, s)), move_aside=False,
                                    steps=[s for s in ck.steps if older_than is None or s < older_than])
            if result is None:
                raise CheckpointError(f"no readable checkpoint in {self.directory}")
            step, out = result
        self._use(step, out)
        return out

    def _use(self, step: int, out) -> None:
        self.step, self.config, self.meta = int(step), out[0], out[1] or {}


def open_run(workdir: str, step: int | None = None) -> Run:
    """The run in `workdir` (or a step directory <workdir>/checkpoints/<step>) at `step`
    (default: the newest readable). Raises FileNotFoundError for a path that is not a run and
    CheckpointError when the step does not exist or no step reads."""
    directory, step = _checkpoints_dir(workdir, step)
    return Run(directory, step)
