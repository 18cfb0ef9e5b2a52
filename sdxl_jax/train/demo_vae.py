"""The tiny demo's own VAE: trained from scratch on the generated demo images (encoder and
decoder, L1 + MSE + KL) before the latent cache is built, so the demo's previews decode to
pictures and its latents carry the images' colours (a random VAE maps a black and a white image
to nearly the same latent: no "completely black" experiment is possible with it).

Trained by the prepare phase (train/prepare.py), and reused, not retrained, when a finished one
with the same settings exists under the workdir or in the user cache (`$SDXL_JAX_CACHE_DIR`,
else `~/.cache/sdxl_jax`): the settings' hash names its directory and a `demo_vae.json` marker
is written only once its last checkpoint is saved.

Recipe (measured by training it here, held-out PSNR on unseen demo images at 256²): batch 16 of
32² crops from images fit to 128², Adam lr 5e-3 after 20 warm-up steps, constant, then a cosine
tail to 5 % over the last quarter; 800 steps reach 22.4 dB (600 at a constant rate: 20.7 dB).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

log = logging.getLogger("sdxl_jax.train")

MARKER = "demo_vae.json"
CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "vae_decoder.py")
RECIPE = {  # on top of configs/vae_decoder.py:tiny
    "model.train_encoder": True, "model.dtype": "float32", "loss.kl_weight": 1e-6, "disc.enabled": False,
    "data.crop_size": 32, "train.global_batch_size": 16, "train.learning_rate": 5e-3,
    "train.warmup_steps": 20, "train.lr_schedule": "cosine_tail", "train.weight_decay": 0.0,
    "data.buckets.max_area": 128 * 128, "data.buckets.min_side": 128, "data.buckets.max_side": 128,
    "data.buckets.base": (128, 128), "data.buckets.max_ar_error": 1.0, "data.val_fraction": 0.05,
    "ema.enabled": False, "sample.every_steps": 0, "checkpoint.async_save": False,
    "mesh.data": -1, "mesh.fsdp": 1,
}


def user_cache_dir() -> str:
    from sdxl_jax import paths
    return paths.user_cache_dir()


def vae_config(unet_cfg, images_dir: str):
    """The demo VAE's config: the recipe, `data.demo_vae_steps` steps, the UNet run's seed."""
    from sdxl_jax.config import apply_overrides, load_config
    overrides = dict(RECIPE, **{"train.steps": int(unet_cfg.data.demo_vae_steps),
                                "checkpoint.every_steps": int(unet_cfg.data.demo_vae_steps),
                                "train.seed": int(unet_cfg.train.seed), "data.images_dir": images_dir})
    return apply_overrides(load_config(os.path.abspath(CONFIG) + ":tiny"), overrides)


def settings_hash(vcfg, demo_size: int) -> str:
    """What fixes the trained VAE: its config (without paths) and the demo data it sees."""
    d = json.loads(vcfg.to_json_best_effort())
    d["data"].pop("images_dir", None)
    return hashlib.sha256(json.dumps({"config": d, "demo_size": int(demo_size)},
                                     sort_keys=True).encode()).hexdigest()[:16]


def locations(unet_cfg, workdir: str | None) -> tuple[str, str]:
    """(under the workdir, in the user cache): where a demo VAE of these settings is kept; the
    settings' hash names the directory (without a workdir: the user cache's, twice). Beside a
    gs:// workdir it stays on this host: its finished marker and shared copy are local files."""
    from sdxl_jax import paths
    digest = settings_hash(vae_config(unet_cfg, ""), unet_cfg.data.demo_size)
    shared = os.path.join(user_cache_dir(), "demo_vae", digest)
    if not workdir:
        return shared, shared
    return os.path.join(paths.local_mirror_dir(workdir, "runs"), "demo_vae", digest), shared


def finished(path: str) -> bool:
    """A demo VAE whose last checkpoint is saved (its marker names the settings of its folder)."""
    try:
        with open(os.path.join(path, MARKER)) as f:
            return json.load(f).get("settings") == os.path.basename(os.path.normpath(path))
    except (OSError, ValueError):
        return False


def mark_finished(path: str, steps: int) -> None:
    with open(os.path.join(path, MARKER), "w") as f:
        json.dump({"settings": os.path.basename(os.path.normpath(path)), "steps": int(steps)}, f)


def share(local: str) -> None:
    """Best effort: keep a finished demo VAE in the user cache for other demo workdirs."""
    shared = os.path.join(user_cache_dir(), "demo_vae", os.path.basename(os.path.normpath(local)))
    try:
        if not finished(shared):
            tmp = shared + f".tmp{os.getpid()}"
            shutil.copytree(local, tmp, ignore=shutil.ignore_patterns("tb", "jax_cache", "demo_data", "*.lock"))
            os.replace(tmp, shared)
    except OSError as e:
        log.warning("could not keep the demo VAE in the user cache %s: %s", shared, e)
