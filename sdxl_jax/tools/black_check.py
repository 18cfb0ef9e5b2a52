"""The report's Fig. 2 claim at tiny scale: can the model make a "completely black" image?

    python -m sdxl_jax.tools.black_check [--steps 1200] [--workdir runs/black_check]

Trains the tiny model on the demo data twice with identical steps and seeds, once with
`schedule.ztsnr=rescale` and once with `schedule.ztsnr=off`, samples "completely black" from
each (ZTSNR from σ = ∞; the baseline from its σ_max = 14.6) and prints the mean decoded
brightness and latent mean of each next to those of the demo's own black images through the same
VAE — the demo's own VAE trained from scratch (train/demo_vae.py, reused from the README demo when
its settings match): with a random VAE a black image's latent sits at the dataset mean and the
experiment cannot show anything. Then prints the mean-colour leak (`mean_leak`) at this latent
size and at SDXL's, the measured reason the plain schedule's greying needs large latents. Writes
the samples side by side (`--png`, rows: ZTSNR, plain, the dataset's black images decoded).
Reuses finished runs in --workdir, so a second invocation only samples.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import numpy as np

from sdxl_jax import cli

PROMPT = "completely black"


def run_config(ztsnr: str, steps: int, cache_dir: str, vae_steps: int = 0):
    from sdxl_jax.config import load_config
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "ztsnr.py") + ":tiny")
    cfg.schedule.ztsnr = ztsnr
    cfg.train.steps = steps or cfg.train.steps  # 0: the tiny preset's (the README demo's) steps
    cfg.data.cache_dir = cache_dir
    cfg.data.demo_vae_steps = vae_steps or cfg.data.demo_vae_steps  # 0: the preset's (reused from the demo)
    cfg.sample.every_steps = 0
    cfg.checkpoint.every_steps = cfg.train.steps
    # the preset's square bucket only (every demo image cropped into it): one compiled step per run
    cfg.data.buckets.min_side = cfg.data.buckets.max_side = cfg.data.buckets.base[0]
    cfg.data.buckets.max_ar_error = 1.0
    cfg.data.val_fraction = 0.0
    return cfg


@cli.entry_point  # user errors: one line `error: …`; --debug shows the traceback
def main(argv=None) -> int:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=0, help="UNet steps of each run (0: the tiny preset's)")
    p.add_argument("--vae-steps", type=int, default=0, help="steps of the demo VAE (0: the tiny preset's; trained once, reused)")
    p.add_argument("--workdir", default="runs/black_check")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--png", default="", help="write the side-by-side picture here (e.g. docs/black_check.png)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import jax.numpy as jnp

    from sdxl_jax import diffusion
    from sdxl_jax.sample import SampleSettings, load_run, sampler_for_run
    from sdxl_jax.train.common import demo_images
    from sdxl_jax.train.loop import train
    from sdxl_jax.train.prepare import demo_vae_run, prepare_run

    cache = os.path.join(a.workdir, "cache")
    rows, pictures = [], []
    for mode in ("rescale", "off"):
        cfg = run_config(mode, a.steps, cache, a.vae_steps)
        images = demo_images(cfg, a.workdir)
        cfg.model.vae_workdir = os.path.abspath(demo_vae_run(cfg, a.workdir, images))
        cfg.data.images_dir = images  # the shared cache is built from them once
        wd = os.path.join(a.workdir, f"ztsnr_{mode}")
        train(cfg, wd, prepare_run(cfg, wd))
        run_cfg, params, meta = load_run(wd, weights="ema")
        sampler = sampler_for_run(run_cfg, meta)
        s = SampleSettings.from_config(run_cfg["sample"])
        images, x0 = sampler(params, [PROMPT], a.seeds, s)
        first = sampler.sigmas(s)[0]
        rows.append((mode, first, images.mean() / 255.0, float(x0.mean())))
        pictures.append(images)
    ref = black_reference_latents(cache)
    lat = meta.get("latents", {})
    ref_z = diffusion.normalize_latents(jnp.asarray(ref), run_cfg["latents"]["normalization"],
                                        run_cfg["latents"]["scale_factor"], lat.get("mean"), lat.get("std"))
    ref_img = np.asarray(sampler_vae_decode(sampler, ref))
    if a.png:
        from sdxl_jax.grid import save_png
        from sdxl_jax.prompts import rows_grid
        refs = np.round(ref_img[:len(a.seeds)] * 255).astype(np.uint8)
        refs = refs[:, :pictures[0].shape[1], :pictures[0].shape[2]]
        save_png(rows_grid(pictures + [refs]), a.png)
        print(f"wrote {a.png} (rows: ztsnr=rescale, ztsnr=off, the dataset's black images)")
    print(f"\n'{PROMPT}' after {cfg.train.steps} steps, {len(a.seeds)} seeds (brightness: 0 black … 1 white)")
    print(f"{'run':<16}{'first σ':>10}{'brightness':>12}{'latent mean':>14}")
    for mode, first, bright, z_mean in rows:
        print(f"{'ztsnr=' + mode:<16}{first:>10.4g}{bright:>12.4f}{z_mean:>14.4f}")
    print(f"{'demo black imgs':<16}{'':>10}{ref_img.mean():>12.4f}{float(ref_z.mean()):>14.4f}"
          "   (their latents through the same VAE; the source pixels are 0.0)")
    from sdxl_jax.data import load_manifest
    data_z = diffusion.normalize_latents(jnp.asarray(load_manifest(cache)["latent_stats"]["mean"]),
                                         run_cfg["latents"]["normalization"],
                                         run_cfg["latents"]["scale_factor"], lat.get("mean"), lat.get("std"))
    offset = np.asarray(ref_z, np.float64).mean(axis=(0, 1, 2)) - np.asarray(data_z, np.float64)
    plain_first = rows[1][1]
    latent = (s.height // 8, s.width // 8)
    print(f"\nmean-colour leak at the plain schedule's first σ = {plain_first:.4g} (how many standard "
          "deviations of the noise's spatial mean the black images' latent mean sits from the "
          "dataset's; the sampler's pure-noise start has none of it):")
    for hw, what in ((latent, "this run"), ((128, 128), "SDXL at 1024²")):
        print(f"  {hw[0]}×{hw[1]} latents ({what}): {mean_leak(offset, plain_first, hw):.2f}")
    return 0


def mean_leak(offset, sigma: float, latent_hw: tuple[int, int]) -> float:
    """‖offset‖·√(h·w)/σ: the distance of an image class's per-channel latent mean from the
    dataset's (`offset`, normalised units), in standard deviations of the spatial mean of
    N(0, σ²) noise over h×w latents (σ/√(h·w) per channel).

    Training at the plain schedule's last step sees z + σε, whose spatial mean still tells the
    class's colour at this z-score; sampling starts from σε alone, which has the dataset's
    mean. Where the z-score is small, the model cannot have learnt to read the colour from the
    input and takes it from the prompt (the start does no harm); where it is large (it grows
    with the latent side), the model reads the pure-noise start as a mean-coloured image: the
    report's greyed "completely black". ZTSNR trains at σ = ∞, where the leak is 0.
    """
    offset = np.asarray(offset, np.float64)
    return float(np.sqrt(np.sum(offset ** 2)) * np.sqrt(latent_hw[0] * latent_hw[1]) / sigma)


def black_reference_latents(cache_dir: str) -> np.ndarray:
    """Raw VAE latents (N, h, w, 4) of the cached images captioned "completely black"."""
    from sdxl_jax.data.cache import RecordSource, decode_record, read_index
    index = read_index(cache_dir)
    src = RecordSource(index.files, index.counts)
    try:
        lat = [np.array(decode_record(src[i])["latent"], np.float32)
               for i, tags in enumerate(index.tags) if PROMPT in tags]
    finally:
        src.close()
    if not lat:
        raise RuntimeError(f"no '{PROMPT}' images in the cache {cache_dir}")
    return np.stack([x for x in lat if x.shape == lat[0].shape])


def sampler_vae_decode(sampler, latents) -> np.ndarray:
    """Decode raw latents with the run's VAE to brightness in [0, 1]."""
    from sdxl_jax.models import vae_decode
    img = vae_decode(sampler.vae, sampler.frozen["vae"], latents)
    return np.clip((np.asarray(img) + 1.0) / 2.0, 0.0, 1.0)


if __name__ == "__main__":
    sys.exit(main())
