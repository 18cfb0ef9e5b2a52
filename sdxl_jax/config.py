"""Loading configs and the one validator every task's config passes before anything is built or
compiled.

The ConfigDict is locked, so a misspelt key already fails in ml_collections; `validate` checks
values and types and names the offending key in one clear message. It knows every task
(`task` = "unet" | "vae_decoder") but imports no trainer: plain values only.
"""
from __future__ import annotations

import importlib.util
import os
import re

from sdxl_jax import paths
from sdxl_jax.config_sections import MODEL_PRESETS, REMAT_MODES, TASKS, TRAINABLE_MODES  # noqa: F401
from sdxl_jax.diffusion import HUBER_SCHEDULES, LOSS_TYPES, NORMALIZATIONS, WEIGHTINGS, ZTSNR_MODES

OPTIMIZERS = ("adamw", "adafactor", "lion")  # sdxl_jax.train.optim builds them
LR_SCHEDULES = ("constant", "cosine", "cosine_tail")
DTYPES = ("bfloat16", "float32", "float16")
STAGE_KEYS = ("steps", "cache_dir", "global_batch_size")
SOURCE_KEYS = ("images_dir", "manifest", "cache_dir", "repeats", "weight", "name")
WANDB_MODES = ("", "online", "offline", "disabled")  # "" = WANDB_MODE, else online


class ConfigError(ValueError):
    pass


# ---- loading ------------------------------------------------------------------------------------
def load_config(spec: str, overrides: dict | None = None):
    """`"configs/x.py[:preset]"` → its get_config(preset) with dotted `overrides` applied
    ({"train.steps": 4, …}); for tools and tests (train.py uses absl's config flags)."""
    path, _, preset = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found")
    module_spec = importlib.util.spec_from_file_location(
        f"_sdxl_jax_config_{os.path.splitext(os.path.basename(path))[0]}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cfg = module.get_config(preset) if preset else module.get_config()
    return apply_overrides(cfg, overrides or {})


def apply_overrides(cfg, overrides: dict):
    """Set dotted keys on a (locked) ConfigDict; a misspelt key is a ConfigError naming it."""
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        try:
            for p in parents:
                node = node[p]
            if leaf not in node:
                raise KeyError(leaf)
            node[leaf] = value
        except (KeyError, AttributeError):
            raise ConfigError(f"{key}: no such config key") from None
    return cfg


# ---- checks --------------------------------------------------------------------------------------
def _get(cfg, key: str):
    val = cfg
    for part in key.split("."):
        val = val[part]
    return val


def _choice(cfg, key: str, options) -> None:
    val = _get(cfg, key)
    if val not in options:
        raise ConfigError(f"{key}={val!r}: must be one of {tuple(options)}")


def _number(cfg, key: str, allow_zero: bool = False) -> None:
    val = _get(cfg, key)
    if not isinstance(val, (int, float)) or isinstance(val, bool) or val < 0 or (val == 0 and not allow_zero):
        raise ConfigError(f"{key}={val!r}: must be a {'non-negative' if allow_zero else 'positive'} number")


def _fraction(cfg, key: str, upper_open: bool = True) -> None:
    val = _get(cfg, key)
    if not (0.0 <= val < 1.0 if upper_open else 0.0 <= val <= 1.0):
        raise ConfigError(f"{key}={val}: must be in [0, {'1)' if upper_open else '1]'}")


def validate(cfg, num_devices: int | None = None) -> None:
    """Raise ConfigError naming the first bad key of any task's config."""
    task = cfg.task
    if task not in TASKS:
        raise ConfigError(f"task={task!r}: must be one of {TASKS}")
    _check_common(cfg)
    (_check_unet if task == "unet" else _check_vae)(cfg)
    check_devices(cfg, num_devices)


def _check_common(cfg) -> None:
    _choice(cfg, "model.preset", MODEL_PRESETS)
    _choice(cfg, "model.dtype", DTYPES)
    _choice(cfg, "train.optimizer", OPTIMIZERS)
    _choice(cfg, "train.lr_schedule", LR_SCHEDULES)
    _choice(cfg, "data.buckets.crop", ("random", "center"))
    for key in ("train.steps", "train.global_batch_size", "train.log_every", "train.max_nonfinite",
                "checkpoint.every_steps", "checkpoint.keep", "ema.inv_gamma", "ema.power",
                "ema.every", "data.read_threads"):
        _number(cfg, key)
    for key in ("train.learning_rate", "train.warmup_steps", "train.grad_clip",
                "train.per_device_batch_size", "sample.every_steps", "data.prefetch"):
        _number(cfg, key, allow_zero=True)
    if not isinstance(cfg.train.steps, int) or not isinstance(cfg.train.per_device_batch_size, int):
        raise ConfigError("train.steps and train.per_device_batch_size must be integers")
    workers = cfg.train.compile_workers
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise ConfigError(f"train.compile_workers={workers!r}: must be an integer ≥ 0 (0 = one per core)")
    from sdxl_jax.fit import parse_fit_check
    try:
        parse_fit_check(cfg.train.fit_check)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _fraction(cfg, "ema.decay")
    _fraction(cfg, "data.val_fraction")
    b = cfg.data.buckets
    if b.min_side > b.max_side or b.min_side * b.min_side > b.max_area or b.step <= 0:
        raise ConfigError(f"data.buckets (min_side={b.min_side}, max_side={b.max_side}, "
                          f"max_area={b.max_area}, step={b.step}) produce no bucket")
    for key in ("images_dir", "manifest"):
        if cfg.data[key] and not paths.exists(cfg.data[key]):
            raise ConfigError(f"data.{key}={cfg.data[key]!r}: no such file or directory")
    _check_pretrained(cfg)
    _check_log(cfg)
    _check_profile(cfg)


def _check_profile(cfg) -> None:
    """profile_steps: "" or "a,b" with 0 ≤ a < b (the loop starts a trace at a, stops it at b)."""
    spec = cfg.get("profile_steps", "")
    if not spec:
        return
    parts = str(spec).split(",")
    try:
        a, b = (int(x) for x in parts)
    except ValueError:
        a = b = None
    if a is None or not 0 <= a < b:
        raise ConfigError(f"profile_steps={spec!r}: give 'a,b', the first and last step to trace "
                          "with 0 ≤ a < b (e.g. '10,15'), or '' for no trace")


def _check_lora_targets(cfg) -> None:
    """lora.targets: each a regular expression (re.search on module paths)."""
    targets = cfg.get("lora", {}).get("targets", ()) or ()
    for i, pattern in enumerate(targets):
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ConfigError(f"lora.targets[{i}]={pattern!r}: not a regular expression ({e})") from None


def _check_log(cfg) -> None:
    """W&B (log.*, sdxl_jax.train.writer): the mode, and that wandb imports when it is enabled, so
    a missing or broken install is one line here rather than a traceback after compiling."""
    if "log" not in cfg:  # a config saved before the section
        return
    _choice(cfg, "log.wandb_mode", WANDB_MODES)
    if cfg.log.wandb_project:
        try:
            importlib.import_module("wandb")
        except Exception as e:  # not only ImportError: a broken install (protobuf) fails anyhow
            raise ConfigError(f"log.wandb_project={cfg.log.wandb_project!r}: W&B logging needs the "
                              f"wandb package (pinned in requirements.txt), which does not import: "
                              f"{type(e).__name__}: {e}") from None


def _check_unet(cfg) -> None:
    from sdxl_jax.models.attention import ATTENTION_MODES  # jax only (no diffusers)
    _choice(cfg, "model.attention", ATTENTION_MODES)
    _choice(cfg, "model.remat", REMAT_MODES)
    chunks = cfg.model.ff_chunks
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
        raise ConfigError(f"model.ff_chunks={chunks!r}: must be an integer ≥ 1 (1 = the feed-forward unchunked)")
    _choice(cfg, "train.trainable", TRAINABLE_MODES)
    if cfg.train.trainable == "unet+text" and not (cfg.text_encoders.train_l or cfg.text_encoders.train_g):
        raise ConfigError("train.trainable='unet+text' with text_encoders.train_l and train_g both "
                          "False: nothing but the UNet would train; set one, or train.trainable='unet'")
    _check_lora_targets(cfg)
    if cfg.model.lora_init and cfg.train.trainable != "lora":
        raise ConfigError(f"model.lora_init={cfg.model.lora_init!r} needs train.trainable='lora'")
    if cfg.model.lora_init and not os.path.isfile(cfg.model.lora_init):
        raise ConfigError(f"model.lora_init={cfg.model.lora_init!r}: no such file")
    _choice(cfg, "schedule.ztsnr", ZTSNR_MODES)
    _choice(cfg, "loss.weighting", WEIGHTINGS)
    _choice(cfg, "loss.type", LOSS_TYPES)
    _choice(cfg, "loss.huber_schedule", HUBER_SCHEDULES)
    _number(cfg, "loss.huber_c")
    _choice(cfg, "loss.masked", (False, True))
    from sdxl_jax.prompts import SEED_LIMIT
    for i, seed in enumerate(cfg.sample.seeds):
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < SEED_LIMIT:
            raise ConfigError(f"sample.seeds[{i}]={seed!r}: a seed must be an integer from 0 to "
                              f"{SEED_LIMIT - 1}")
    if cfg.sample.prompts_file:
        from sdxl_jax.prompts import read_prompt_file
        try:
            read_prompt_file(cfg.sample.prompts_file)
        except (OSError, ValueError) as e:
            raise ConfigError(f"sample.prompts_file: {e}") from None
    _choice(cfg, "latents.normalization", NORMALIZATIONS)
    for key in ("loss.snr_gamma", "text.max_chunks", "sample.steps", "sample.width", "sample.height"):
        _number(cfg, key)
    _fraction(cfg, "schedule.terminal_prob")
    _fraction(cfg, "data.caption_dropout", upper_open=False)
    for key in ("sample.width", "sample.height"):  # the sample CLI's rule (sample.size_multiple)
        if _get(cfg, key) % 32:
            raise ConfigError(f"{key}={_get(cfg, key)}: must be a multiple of 32 (the VAE's 8× "
                              "times the UNet's two 2× downsamplings)")
    if cfg.latents.normalization == "per_channel" and (cfg.latents.mean is None) != (cfg.latents.std is None):
        raise ConfigError("latents.mean and latents.std must be given together (or both left unset)")
    has_images = bool(cfg.data.images_dir or cfg.data.manifest or cfg.data.tfds)
    given = [k for k in ("images_dir", "manifest", "tfds") if cfg.data[k]]
    if len(given) > 1:
        raise ConfigError(f"data.{given[0]} and data.{given[1]} are both set: give one image source")
    stages = list(cfg.train.stages)
    for i, st in enumerate(stages):
        if not isinstance(st, dict) or "steps" not in st or set(st) - set(STAGE_KEYS):
            extra = sorted(set(st) - set(STAGE_KEYS)) if isinstance(st, dict) else st
            raise ConfigError(f"train.stages[{i}]={st!r}: needs 'steps' (and optionally 'cache_dir', "
                              f"'global_batch_size'); unknown: {extra}")
        if not isinstance(st["steps"], int) or st["steps"] < 1:
            raise ConfigError(f"train.stages[{i}].steps={st['steps']!r}: must be a positive integer")
        gbs = st.get("global_batch_size", cfg.train.global_batch_size)
        if not isinstance(gbs, int) or gbs < 1:
            raise ConfigError(f"train.stages[{i}].global_batch_size={gbs!r}: must be a positive integer")
        if st.get("cache_dir"):
            _cache_exists(st["cache_dir"], f"train.stages[{i}].cache_dir", has_images)
    sources = _check_sources(cfg, given)
    if cfg.data.cache_dir and not sources:  # with data.sources: the folder of their caches
        _cache_exists(cfg.data.cache_dir, "data.cache_dir", has_images)
    if cfg.model.vae_workdir and not paths.isdir(paths.join(cfg.model.vae_workdir, "checkpoints")):
        raise ConfigError(f"model.vae_workdir={cfg.model.vae_workdir!r}: not a run directory (no "
                          "checkpoints/); give the --workdir of a configs/vae_decoder.py run")
    if cfg.model.preset == "sdxl" and not cfg.model.pretrained:
        raise ConfigError("model.pretrained is empty: the sdxl preset trains from real SDXL weights "
                          "(a diffusers folder, a single-file .safetensors, or a Hub id when online)")


def _check_sources(cfg, single: list) -> list:
    """data.sources entries (sdxl_jax.data.sources resolves them); `single`: the data.* image
    inputs that are set, which must then be empty."""
    sources = list(cfg.data.sources or ())
    if sources and single:
        raise ConfigError(f"data.sources and data.{single[0]} are both set: list every dataset "
                          "in data.sources")
    for i, s in enumerate(sources):
        key = f"data.sources[{i}]"
        s = s.to_dict() if hasattr(s, "to_dict") else s
        if not isinstance(s, dict):
            raise ConfigError(f"{key}={s!r}: must be a dict such as {{\"images_dir\": DIR, "
                              "\"repeats\": 2}")
        extra = sorted(set(s) - set(SOURCE_KEYS))
        if extra:
            raise ConfigError(f"{key}: unknown key(s) {extra}; known: {SOURCE_KEYS}")
        if s.get("images_dir") and s.get("manifest"):
            raise ConfigError(f"{key}: images_dir and manifest are both set: give one")
        if not (s.get("images_dir") or s.get("manifest") or s.get("cache_dir")):
            raise ConfigError(f"{key}: needs one of images_dir, manifest or cache_dir")
        for k in ("images_dir", "manifest", "cache_dir", "name"):
            if k in s and not isinstance(s[k], str):
                raise ConfigError(f"{key}.{k}={s[k]!r}: must be a string")
        for k in ("images_dir", "manifest"):
            if s.get(k) and not paths.exists(s[k]):
                raise ConfigError(f"{key}.{k}={s[k]!r}: no such file or directory")
        if s.get("cache_dir"):
            _cache_exists(s["cache_dir"], f"{key}.cache_dir", bool(s.get("images_dir") or s.get("manifest")))
        r = s.get("repeats", 1)
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ConfigError(f"{key}.repeats={r!r}: must be an integer ≥ 1")
        w = s.get("weight", 1.0)
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not 0 < w < float("inf"):
            raise ConfigError(f"{key}.weight={w!r}: must be a number > 0")
        if "name" in s and not re.fullmatch(r"[A-Za-z0-9_.-]+", s["name"]):
            raise ConfigError(f"{key}.name={s['name']!r}: use letters, digits, '_', '.' or '-' "
                              "(it names the cache folder and the loss_<name> scalar)")
    return sources


def _cache_exists(path: str, key: str, has_images: bool) -> None:
    """A cache given by path must exist unless images are given to build it there: a typo
    never silently becomes a freshly generated demo cache."""
    if not has_images and not paths.exists(paths.join(path, "manifest.json")):  # or gs://
        raise ConfigError(f"{key}={path!r}: no latent cache there (no manifest.json); build one "
                          "with python -m data_tools.build_cache, or set data.images_dir / "
                          "data.manifest to build it")


def _check_vae(cfg) -> None:
    for key in ("disc.channels", "disc.layers", "disc.learning_rate", "disc.max_adaptive_weight",
                "sample.num_images", "sample.image_size"):
        _number(cfg, key)
    for key in ("loss.l1_weight", "loss.mse_weight", "loss.perceptual_weight", "loss.kl_weight",
                "disc.weight", "disc.start_step", "data.crop_size"):
        _number(cfg, key, allow_zero=True)
    if not (cfg.loss.l1_weight or cfg.loss.mse_weight or
            (cfg.loss.perceptual_weights and cfg.loss.perceptual_weight)):
        raise ConfigError("loss.l1_weight, loss.mse_weight and the perceptual loss are all off: "
                          "nothing to train the decoder on")
    b, crop = cfg.data.buckets, int(cfg.data.crop_size)
    if crop % 8 or crop > b.min_side:
        raise ConfigError(f"data.crop_size={crop}: must be a multiple of 8 (the VAE's downsampling) "
                          f"and ≤ data.buckets.min_side={b.min_side} (0 = whole buckets)")
    if cfg.sample.image_size % 8:
        raise ConfigError(f"sample.image_size={cfg.sample.image_size}: must be a multiple of 8")
    if cfg.data.images_dir and cfg.data.manifest:
        raise ConfigError("data.images_dir and data.manifest are both set: give one")
    if cfg.loss.perceptual_weights and not os.path.isfile(cfg.loss.perceptual_weights):
        raise ConfigError(f"loss.perceptual_weights={cfg.loss.perceptual_weights!r}: no such file "
                          "(set '' to train without the perceptual loss)")
    if cfg.model.preset == "sdxl" and not cfg.model.pretrained and not cfg.model.train_encoder:
        raise ConfigError("model.pretrained is empty: the sdxl preset finetunes a real SDXL VAE "
                          "(a diffusers folder, a single-file .safetensors, or a Hub id when online)")


def _check_pretrained(cfg) -> None:
    """model.pretrained: a local path must exist."""
    pre = cfg.model.pretrained
    if pre and (pre.startswith((".", "/", "~")) or os.sep in pre and not _looks_like_hub_id(pre)):
        if not os.path.exists(os.path.expanduser(pre)):
            raise ConfigError(f"model.pretrained={pre!r}: no such file or directory")


def check_devices(cfg, num_devices: int | None) -> None:
    """The mesh fits `num_devices`; every global batch splits into whole micro-batches over the
    data-parallel devices (METHODS §13: global = per-device micro × data parallel × k)."""
    if num_devices is None:
        return
    from sdxl_jax.parallel import mesh_shape
    try:
        data, fsdp = mesh_shape(int(cfg.mesh.data), int(cfg.mesh.fsdp), num_devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    dp, micro = data * fsdp, int(cfg.train.per_device_batch_size)
    batches = [("train.global_batch_size", cfg.train.global_batch_size)]
    batches += [(f"train.stages[{i}].global_batch_size", st["global_batch_size"])
                for i, st in enumerate(cfg.get("train", {}).get("stages", ()) or ())
                if isinstance(st, dict) and "global_batch_size" in st]
    for key, gbs in batches:
        if gbs % dp:
            raise ConfigError(f"{key}={gbs} is not divisible by the {dp} data-parallel devices")
        if micro and gbs % (micro * dp):
            raise ConfigError(
                f"{key}={gbs} does not split into micro-batches of train.per_device_batch_size="
                f"{micro} × {dp} devices = {micro * dp} samples; choose a per-device batch "
                f"that divides {gbs // dp}")


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not os.path.exists(s)
