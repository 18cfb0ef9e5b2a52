"""Config checks that run before anything is built or compiled.

The ConfigDict is locked, so a misspelt key already fails in ml_collections; this module checks
values and types and names the offending key in one clear message.
"""
from __future__ import annotations

import os

from sdxl_jax.diffusion import NORMALIZATIONS, WEIGHTINGS, ZTSNR_MODES


class ConfigError(ValueError):
    pass


def _choice(cfg, key: str, options) -> None:
    val = cfg
    for part in key.split("."):
        val = val[part]
    if val not in options:
        raise ConfigError(f"{key}={val!r}: must be one of {tuple(options)}")


def _positive(cfg, key: str, allow_zero: bool = False) -> None:
    val = cfg
    for part in key.split("."):
        val = val[part]
    if not isinstance(val, (int, float)) or isinstance(val, bool) or val < 0 or (val == 0 and not allow_zero):
        raise ConfigError(f"{key}={val!r}: must be a {'non-negative' if allow_zero else 'positive'} number")


def validate(cfg, num_devices: int | None = None) -> None:
    """Raise ConfigError naming the first bad key (dispatching on `task`)."""
    if cfg.get("task", "unet") == "vae_decoder":
        from sdxl_jax.train.vae_loop import validate_vae_config
        return validate_vae_config(cfg, num_devices)
    _choice(cfg, "schedule.ztsnr", ZTSNR_MODES)
    _choice(cfg, "loss.weighting", WEIGHTINGS)
    _choice(cfg, "latents.normalization", NORMALIZATIONS)
    _choice(cfg, "model.preset", ("sdxl", "tiny"))
    _choice(cfg, "model.dtype", ("bfloat16", "float32", "float16"))
    _choice(cfg, "train.optimizer", ("adamw", "adafactor", "lion"))
    _choice(cfg, "train.lr_schedule", ("constant", "cosine"))
    _choice(cfg, "data.buckets.crop", ("random", "center"))
    for key in ("loss.snr_gamma", "train.steps", "train.global_batch_size", "train.grad_accum_steps",
                "checkpoint.every_steps", "checkpoint.keep", "text.max_chunks", "train.log_every",
                "ema.inv_gamma", "ema.power", "ema.every", "train.max_nonfinite"):
        _positive(cfg, key)
    for key in ("train.learning_rate", "train.warmup_steps", "train.grad_clip", "sample.every_steps"):
        _positive(cfg, key, allow_zero=True)
    if not 0.0 <= cfg.schedule.terminal_prob < 1.0:
        raise ConfigError(f"schedule.terminal_prob={cfg.schedule.terminal_prob}: must be in [0, 1)")
    if not 0.0 <= cfg.data.caption_dropout <= 1.0:
        raise ConfigError(f"data.caption_dropout={cfg.data.caption_dropout}: must be in [0, 1]")
    if not 0.0 <= cfg.ema.decay < 1.0:
        raise ConfigError(f"ema.decay={cfg.ema.decay}: must be in [0, 1)")
    check_buckets(cfg)
    for key in ("data.cache_dir", "data.images_dir", "data.manifest"):
        path = cfg.data[key.split(".")[1]]
        if path and key != "data.cache_dir" and not os.path.exists(path):
            raise ConfigError(f"{key}={path!r}: no such file or directory")
    check_pretrained(cfg, "trains from real SDXL weights")
    if cfg.latents.normalization == "per_channel" and (cfg.latents.mean is None) != (cfg.latents.std is None):
        raise ConfigError("latents.mean and latents.std must be given together (or both left unset)")
    check_devices(cfg, num_devices)


# ---- checks shared with the VAE decoder trainer's config ------------------------------------
def check_buckets(cfg) -> None:
    b = cfg.data.buckets
    if b.min_side > b.max_side or b.min_side * b.min_side > b.max_area or b.step <= 0:
        raise ConfigError(f"data.buckets (min_side={b.min_side}, max_side={b.max_side}, "
                          f"max_area={b.max_area}, step={b.step}) produce no bucket")


def check_pretrained(cfg, sdxl_needs: str) -> None:
    """model.pretrained: a local path must exist; the sdxl preset needs one (`sdxl_needs` says why)."""
    pre = cfg.model.pretrained
    if pre and (pre.startswith((".", "/", "~")) or os.sep in pre and not _looks_like_hub_id(pre)):
        if not os.path.exists(os.path.expanduser(pre)):
            raise ConfigError(f"model.pretrained={pre!r}: no such file or directory")
    if cfg.model.preset == "sdxl" and not pre:
        raise ConfigError(f"model.pretrained is empty: the sdxl preset {sdxl_needs} (a diffusers "
                          "folder, a single-file .safetensors, or a Hub id when online)")


def check_devices(cfg, num_devices: int | None) -> None:
    """The mesh fits `num_devices` and the global batch divides over them (None: not checked)."""
    if num_devices is None:
        return
    from sdxl_jax.parallel import mesh_shape
    try:
        mesh_shape(int(cfg.mesh.data), int(cfg.mesh.fsdp), num_devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.train.global_batch_size % num_devices:
        raise ConfigError(f"train.global_batch_size={cfg.train.global_batch_size} is not divisible "
                          f"by the {num_devices} data-parallel devices")


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not os.path.exists(s)
