"""One reader of a saved run: `open_run(workdir, step=None)` → its config, metadata and named
parameter trees, for sample, export and any task that starts from another run.

    run = open_run("runs/nai3")                  # newest readable step
    unet = run.params("unet")                    # EMA when the run kept one, else raw
    text_l = run.params("text_l")                # trained (unet+text / LoRA) or the frozen one
    frozen = run.frozen()                        # {"vae", "text_l", "text_g"} of the run's source
    tree, plan = open_run("runs/lora").adapters()  # a LoRA run's adapters themselves
    vae = open_run("runs/vae_ft").params("vae")  # a decoder finetune: source encoder + decoder

What comes from where (`params` gives every tree AS TRAINED, whatever trained):
- UNet runs (train.trainable "unet", and runs older than the key): "unet" from the checkpoint
  (only the chosen tree is read: no optimizer state, no second copy); "vae", "text_l", "text_g"
  from `weights.frozen_params` (model.pretrained, else the seeded random init) — the frozen
  weights the run trained with.
- "unet+text": the state's params are {"unet", and the trained encoders of meta["trained_text"]};
  each is read alone from the checkpoint, the untrained encoder comes from the source as above.
- "lora": the state's params are the adapter tree ({model: …}, sdxl_jax.adapters) and
  meta["lora"] the AdapterConfig, so the plan is rebuilt from abstract shapes; each adapted
  model is its source weights (frozen_params, the UNet included) + the adapters, merged in
  float32 at scale 1 (`adapters.merge_params`); `adapters()` gives the tree and plan themselves.
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

import dataclasses
import logging
import os

import jax

from sdxl_jax import paths
from sdxl_jax.checkpoint import CORRUPT_SUFFIX, Checkpointer, CheckpointError, quiet_abandoned_reads
from sdxl_jax.models import vae_parts
from sdxl_jax.config import TRAINABLE_MODES
from sdxl_jax.models.weights import FROZEN

log = logging.getLogger(__name__)

NAMES = ("unet",) + FROZEN
TEXT = ("text_l", "text_g")
VAE_TASK = "vae_decoder"
WEIGHTS = ("ema", "raw")
_FIELD = {"ema": "ema_params", "raw": "params"}


def _checkpoints_dir(path: str, step: int | None) -> tuple[str, int | None]:
    """(checkpoints directory, step) from a workdir or a step directory <workdir>/checkpoints/<n>
    (local paths or gs:// URLs)."""
    path = paths.absolute(str(path).rstrip("/"))
    base, name = os.path.split(path)
    if name.isdigit() and paths.isdir(path):
        if step is not None and step != int(name):
            raise ValueError(f"{path} is the checkpoint of step {name}, but step {step} was asked for")
        return base, int(name)
    if not paths.exists(path):
        raise FileNotFoundError(f"{path}: no such run directory")
    ckdir = paths.join(path, "checkpoints")
    if not paths.isdir(ckdir):
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
        self._adapters: dict = {}  # weights -> host adapter tree (LoRA runs)
        self._plans: dict = {}  # step -> adapter plan (from that step's meta)
        ck = self._open()
        try:
            steps = ck.steps
            if not steps:
                moved = sorted(n for n in paths.listdir(directory) if CORRUPT_SUFFIX in n)
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
        return paths.join(self.directory, str(self.step))

    def default_weights(self) -> str:
        return "ema" if self.config.get("ema", {}).get("enabled", True) else "raw"

    @property
    def trainable(self) -> str:
        """What trained: "unet", "unet+text" or "lora" (meta, else the config; runs older than
        train.trainable trained the UNet)."""
        mode = (self.meta.get("trainable") or self.config.get("train", {}).get("trainable")
                or "unet")
        if mode not in TRAINABLE_MODES:
            raise ValueError(f"{self.checkpoint_dir}: train.trainable={mode!r} is not one this "
                             f"reader knows {TRAINABLE_MODES}; read it with the sdxl_jax that wrote it")
        return mode

    @property
    def trained_text(self) -> tuple:
        """The text encoders the checkpoint holds trained weights of ("unet+text" runs only)."""
        if self.trainable != "unet+text":
            return ()
        names = tuple(self.meta.get("trained_text") or ())
        bad = [n for n in names if n not in TEXT]
        if bad or not names:
            raise ValueError(f"{self.checkpoint_dir}: a unet+text run needs meta trained_text, a "
                             f"non-empty subset of {TEXT}; it has {names}")
        return names

    # ---- parameter trees -----------------------------------------------------------------------
    def params(self, name: str, weights: str | None = None, on_host: bool = False):
        """Parameter tree `name` ("unet", "vae", "text_l", "text_g") as the run trained it (see
        the module docstring: LoRA runs give the source merged with the adapters); `weights`
        "ema" or "raw" (default: EMA when the run kept one) picks the trained copy and is ignored
        for frozen models."""
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
        mode = self.trainable
        if mode == "lora":
            adapters, plan = self.adapters(weights)
            if name in plan:
                return self._merged(name, adapters, plan, on_host)
        elif mode == "unet+text":
            if name == "unet" or name in self.trained_text:
                return self._trained(weights, on_host, sub=name)
        elif name == "unet":
            return self._trained(weights, on_host)
        return self.frozen((name,), on_host)[name]

    def all_params(self, weights: str | None = None, on_host: bool = False) -> dict:
        """{"unet", "vae", "text_l", "text_g"}: params() of each, the source models made or
        loaded in one frozen_params call (one read of model.pretrained)."""
        mode = self.trainable
        if mode == "lora":
            sources = NAMES  # the adapted models too: their base
        elif mode == "unet+text":
            sources = ("vae",) + tuple(n for n in TEXT if n not in self.trained_text)
        else:
            sources = FROZEN
        if self.task != VAE_TASK:
            self.frozen(sources, on_host=True)
        return {n: self.params(n, weights, on_host) for n in NAMES}

    def adapters(self, weights: str | None = None) -> tuple[dict, dict]:
        """(adapter tree as host numpy, plan) of a LoRA run, `weights` "ema" / "raw" as for
        params; the tree is checked against the plan rebuilt from meta["lora"]."""
        if self.trainable != "lora":
            raise ValueError(f"{self.directory} trained {self.trainable!r} (train.trainable), not "
                             "adapters: it has no LoRA to read; use params() / export "
                             "--format single-file or diffusers")
        weights = weights or self.default_weights()
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
        if weights not in self._adapters:
            from sdxl_jax.adapters import abstract_adapters
            from sdxl_jax.models.convert import check_tree
            tree = self._trained(weights, on_host=True)  # pins the step: meta["lora"] is its
            check_tree(f"{self.checkpoint_dir}: the adapters (against meta lora)", tree,
                       abstract_adapters(self.lora_plan()))
            self._adapters[weights] = tree
        return self._adapters[weights], self.lora_plan()

    def lora_config(self):
        """The AdapterConfig the LoRA run trained with (meta["lora"], JSON lists as tuples)."""
        from sdxl_jax.adapters import AdapterConfig
        saved = self.meta.get("lora")
        if not isinstance(saved, dict):
            raise ValueError(f"{self.checkpoint_dir}: a LoRA run's meta needs 'lora' (the "
                             "AdapterConfig as a dict); this checkpoint has none")
        fields = {f.name for f in dataclasses.fields(AdapterConfig)}
        ignored = sorted(set(saved) - fields)
        if ignored:  # e.g. a training-only key: not part of what the adapters are
            log.info("%s: meta lora keys %s are not AdapterConfig fields; ignored",
                     self.checkpoint_dir, ignored)
        return AdapterConfig(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in saved.items() if k in fields})

    def lora_plan(self) -> dict:
        """The run's adapter plan, rebuilt from abstract shapes (nothing allocated)."""
        from sdxl_jax.adapters import make_plan
        from sdxl_jax.models.weights import cached_abstract_params
        if self.step not in self._plans:
            cfg = self.lora_config()
            preset = self.config["model"]["preset"]
            self._plans[self.step] = make_plan(
                {n: cached_abstract_params(n, preset) for n in cfg.models}, cfg)
        return self._plans[self.step]

    def _merged(self, name: str, adapters: dict, plan: dict, on_host: bool) -> dict:
        """Source weights of `name` + the adapters, float32 merge at scale 1, then W's dtype."""
        from sdxl_jax.adapters import merge_params
        base = self.frozen((name,), on_host=True)[name]
        tree = merge_params({name: base}, adapters, {name: plan[name]})[name]
        return tree if on_host else jax.device_put(tree, _first_device())

    def frozen(self, components=FROZEN, on_host: bool = False) -> dict:
        """The run's source models (weights.frozen_params of its config: "vae", "text_l",
        "text_g", and "unet", a LoRA run's base), made once per Run. Not what trained: for that
        use params()."""
        missing = tuple(c for c in components if c not in self._frozen)
        if missing:
            self._frozen.update(source_params(self.config, components=missing))
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

    def _trained(self, weights: str, on_host: bool, sub: str | None = None):
        """The params or EMA tree of the checkpoint's state, as saved (shapes from the step's
        metadata), falling back like training while the step is not pinned; `sub`: only that
        entry of a dict-of-models state (unet+text runs), the others are not read."""
        if weights == "ema" and not self.config.get("ema", {}).get("enabled", True):
            raise ValueError(f"the run in {self.directory} trained with ema.enabled=False, so its "
                             "EMA weights are the initial ones; ask for the raw weights "
                             "(--weights raw)")
        field = _FIELD[weights]
        dev = _first_device()

        def read(ck, step):
            saved = ck.saved_tree(step, field)
            if sub is not None:
                if not isinstance(saved, dict) or sub not in saved:
                    have = sorted(saved) if isinstance(saved, dict) else "one tree"
                    raise ValueError(f"the state holds no {sub!r} params (has {have})")
                saved = {sub: saved[sub]}
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev),
                                    saved)
            tree, cfg, meta = ck.restore_params(step, abstract, field, on_host)
            return cfg, meta, tree if sub is None else tree[sub]

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


def _first_device():
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this host's first


def source_params(config, shardings=None, components=FROZEN) -> dict:
    """A run's source models (weights.frozen_params), except that `model.vae_workdir` — a VAE
    task run, e.g. the demo's VAE trained from scratch — replaces the source's VAE: the one
    rule for the trainer, the cache builder, sample and export."""
    from sdxl_jax.models.weights import frozen_params
    vae_run = config["model"].get("vae_workdir", "")
    rest = tuple(c for c in components if not (c == "vae" and vae_run))
    out = frozen_params(config, shardings, components=rest) if rest else {}
    if "vae" in components and vae_run:
        vae = open_run(vae_run).params("vae", on_host=True)
        sh = (shardings or {}).get("vae")
        out["vae"] = jax.device_put(vae, sh) if sh is not None else jax.device_put(vae)
    return {c: out[c] for c in components}


def open_run(workdir: str, step: int | None = None) -> Run:
    """The run in `workdir` (or a step directory <workdir>/checkpoints/<step>) at `step`
    (default: the newest readable). Raises FileNotFoundError for a path that is not a run and
    CheckpointError when the step does not exist or no step reads."""
    directory, step = _checkpoints_dir(workdir, step)
    return Run(directory, step)
