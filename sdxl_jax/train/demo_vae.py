"""The tiny demo's own VAE: trained from scratch on the generated demo images (encoder and
decoder, L1 + MSE + KL) before the latent cache is built, so the demo's previews decode to
pictures and its latents carry the images' colours (a random VAE maps a black and a white image
to nearly the same latent: no "completely black" experiment is possible with it).

Reused, not retrained, when a finished one with the same settings exists under the workdir or in
the user cache (`$SDXL_JAX_CACHE_DIR`, else `~/.cache/sdxl_jax`): the settings' hash names its
directory and a `demo_vae.json` marker is written only once its last checkpoint is saved.

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


def finished(path: str, digest: str) -> bool:
    try:
        with open(os.path.join(path, MARKER)) as f:
            return json.load(f).get("settings") == digest
    except (OSError, ValueError):
        return False


def find_or_train(unet_cfg, workdir: str, images_dir: str) -> str:
    """The run directory of a demo VAE trained with these settings (trained here if none is)."""
    from sdxl_jax.train.loop import train
    if int(unet_cfg.data.demo_vae_steps) <= 0:
        raise ValueError(f"data.demo_vae_steps={unet_cfg.data.demo_vae_steps}: the demo VAE needs "
                         "training steps (800 reach 22 dB held-out PSNR)")
    vcfg = vae_config(unet_cfg, images_dir)
    digest = settings_hash(vcfg, unet_cfg.data.demo_size)
    local = os.path.join(workdir, "demo_vae", digest)
    shared = os.path.join(user_cache_dir(), "demo_vae", digest)
    for path in (local, shared):
        if finished(path, digest):
            log.info("reusing the demo VAE in %s (same settings %s)", path, digest)
            return path
    log.info("training the demo VAE from scratch (%d steps) in %s", vcfg.train.steps, local)
    summary = train(vcfg, local)
    if summary["end_step"] < vcfg.train.steps:  # preempted: the next run resumes it
        raise InterruptedError(f"the demo VAE stopped at step {summary['end_step']}; rerun to resume")
    with open(os.path.join(local, MARKER), "w") as f:
        json.dump({"settings": digest, "steps": int(vcfg.train.steps)}, f)
    try:  # best effort: other demo workdirs on this machine reuse it
        if not finished(shared, digest):
            tmp = shared + f".tmp{os.getpid()}"
            shutil.copytree(local, tmp, ignore=shutil.ignore_patterns("tb", "jax_cache", "demo_data", "*.lock"))
            os.replace(tmp, shared)
    except OSError as e:
        log.warning("could not keep the demo VAE in the user cache %s: %s", shared, e)
    return local
