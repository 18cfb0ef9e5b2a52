"""Config sections shared by every trainer config (configs/ztsnr.py, configs/vae_decoder.py).

Plain ml_collections, no JAX: config files import this before any device is set up.
"""
import ml_collections

PRESETS = ("sdxl", "tiny")  # the config presets (configs/ztsnr.py:PRESET), here so configs need no JAX
# The model sizes (sdxl_jax.models.presets): the config presets' own, plus "micro" (tiny's text
# towers and VAE, a one-level UNet; smoke and engine tests: ~2.5x faster to compile than tiny) and
# "mid" (tiny's text towers and VAE, SDXL's UNet structure at 1/5 width: parity tests and benches).
MODEL_PRESETS = PRESETS + ("micro", "mid")
# The choices of the keys that name a mode, each kept here once (config.validate checks them)
TASKS = ("unet", "vae_decoder")  # task: train.loop maps each to the module that builds it
TRAINABLE_MODES = ("unet", "unet+text", "lora")  # train.trainable (train/trainable.py, runs.py)
REMAT_MODES = ("none", "blocks", "dots")  # model.remat (models/remat.py applies them)


def offline_preset(model_preset: str) -> bool:
    """A CPU-sized model (tiny, micro): random init is allowed, the generated vocabulary is its
    tokenizer and, with no data configured, the generated demo dataset is its data."""
    return model_preset != "sdxl"


def root_config(preset: str, task: str) -> ml_collections.ConfigDict:
    """The top of a trainer config: `preset` ("" = "sdxl") checked, and the trainer `task`
    train.py runs ("unet": the UNet trainer; "vae_decoder": the VAE decoder trainer)."""
    preset = preset or "sdxl"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.task = task
    return c


def ema_section(decay: float) -> ml_collections.ConfigDict:
    """EMA of the trained weights (METHODS §12); export and samples use it."""
    e = ml_collections.ConfigDict()
    e.enabled = True
    e.decay = decay  # d_max
    e.inv_gamma = 1.0
    e.power = 2.0 / 3.0
    e.every = 1
    return e


def mesh_section() -> ml_collections.ConfigDict:
    """Device mesh: data parallel × FSDP."""
    ms = ml_collections.ConfigDict()
    ms.data = -1  # data-parallel axis size; -1 fills the remaining devices
    ms.fsdp = 1  # parameter-sharding axis size
    ms.min_fsdp_size = 2**18  # parameters with fewer elements stay replicated
    return ms


def checkpoint_section(every_steps: int) -> ml_collections.ConfigDict:
    """Orbax checkpoints: every N steps and at the end, keep the newest `keep`, async saves."""
    ck = ml_collections.ConfigDict()
    ck.every_steps = every_steps
    ck.keep = 3
    ck.async_save = True
    return ck


def log_section() -> ml_collections.ConfigDict:
    """Monitoring beside TensorBoard (`<workdir>/tb`, always written): Weights & Biases when
    `wandb_project` is set, with the same scalars and preview images (sdxl_jax.train.writer)."""
    lg = ml_collections.ConfigDict()
    lg.wandb_project = ""  # "" = no W&B (wandb is then never imported)
    lg.wandb_entity = ""  # team or user; "" = the W&B account's default
    # "online" | "offline" (no network; `wandb sync <workdir>/wandb/offline-run-*` uploads later) |
    # "disabled"; "" = the WANDB_MODE environment variable, else online
    lg.wandb_mode = ""
    lg.wandb_run_name = ""  # "" = a name W&B picks
    return lg
