"""Sample images from a trained run with the ZTSNR-aware samplers (METHODS §4, §5).

    python -m sdxl_jax.sample --workdir runs/demo --prompt "completely black" \
        --width 256 --height 256 --steps 28 --cfg 5 --sampler euler --seed 0 --out black.png

EMA weights by default (`--weights raw` for the trained params). Several --prompt / --seed values
make a grid: one row per prompt, one column per seed. Latents are decoded with the VAE after
undoing the checkpoint's own latent normalisation (scale or per-channel statistics).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdxl_jax import diffusion
from sdxl_jax.grid import make_grid, save_png, to_uint8  # noqa: F401 (re-exported)
from sdxl_jax.diffusion import samplers

log = logging.getLogger("sdxl_jax.sample")


@dataclass
class SampleSettings:
    width: int
    height: int
    steps: int = 28
    cfg: float = 5.0
    rescale: float = 0.0
    sampler: str = "euler"
    schedule: str = "trailing"
    sigma_max_scaling: bool = True
    negative: str = ""

    @classmethod
    def from_config(cls, sp) -> "SampleSettings":
        return cls(width=int(sp["width"]), height=int(sp["height"]), steps=int(sp["steps"]),
                   cfg=float(sp["cfg"]), rescale=float(sp["rescale"]), sampler=sp["sampler"],
                   schedule=sp["schedule"], sigma_max_scaling=bool(sp["sigma_max_scaling"]),
                   negative=sp["negative"])


def size_multiple(preset: str) -> int:
    """Pixels an image side must be a multiple of: the VAE's and the UNet's downsamplings
    (32 for both presets: VAE 8×, UNet 4×); other sides fail deep inside the UNet's skips."""
    from sdxl_jax.models import presets
    levels = lambda cfg: 2 ** (len(cfg["block_out_channels"]) - 1)
    return levels(presets.vae_config(preset)) * levels(presets.unet_config(preset))


def check_settings(s: SampleSettings, preset: str | None = None) -> None:
    """ValueError naming the first setting the samplers cannot use; sizes against `preset`'s
    multiple when given (only positivity otherwise, as before the run is loaded)."""
    if s.steps < 1:
        raise ValueError(f"steps {s.steps}: sampling needs at least 1 step")
    if not np.isfinite(s.cfg) or not np.isfinite(s.rescale):
        raise ValueError(f"cfg {s.cfg} / rescale {s.rescale}: must be finite numbers")
    for name, v in (("width", s.width), ("height", s.height)):
        if v <= 0:
            raise ValueError(f"{name} {v}: must be a positive number of pixels")
        m = size_multiple(preset) if preset else 1
        if v % m:
            lo = max(m, v // m * m)
            raise ValueError(f"{name} {v}: the {preset} model needs a multiple of {m} pixels "
                             f"(VAE and UNet downsampling); try {lo} or {lo + m}")


class ImageSampler:
    """Text → image for one run config: tokenizers, frozen encoders/VAE, one jitted sampling
    function per (sampler, batch, size, steps); UNet params are an argument, so the same
    instance samples EMA and raw weights and follows training without recompiling."""

    def __init__(self, cfg, frozen: dict, latent_mean=None, latent_std=None):
        from sdxl_jax import models
        self.cfg = cfg
        from sdxl_jax.models.remat import build_unet_variant
        m = cfg["model"]
        preset, dtype = m["preset"], m["dtype"]
        # the run's attention options (memory-efficient attention matters most at large sizes);
        # remat is a training-only choice
        self.unet = build_unet_variant(preset, dtype, attention=m.get("attention", "standard"),
                                       split_head_dim=bool(m.get("split_head_dim", False)))
        self.text_l, self.text_g = models.build_text_encoders(preset, dtype)
        self.vae = models.build_vae(preset, dtype)
        self.tok_l, self.tok_g = models.get_tokenizers(preset, cfg["model"]["pretrained"])
        self.frozen = frozen
        self.max_chunks = int(cfg["text"]["max_chunks"])
        sched = cfg["schedule"]
        self.table = diffusion.make_schedule(sched["num_train_timesteps"], sched["beta_start"],
                                             sched["beta_end"], sched["ztsnr"]).sigmas
        self.ztsnr = sched["ztsnr"] == "rescale"
        lat = cfg["latents"]
        self.norm = dict(mode=lat["normalization"], scale=float(lat["scale_factor"]),
                         mean=latent_mean, std=latent_std)
        self._fns: dict = {}

    def _tokens(self, texts: Sequence[str]):
        from sdxl_jax import models
        return (models.tokenize(self.tok_l, list(texts), self.max_chunks),
                models.tokenize(self.tok_g, list(texts), self.max_chunks))

    def _fn(self, sampler: str):
        if sampler not in self._fns:
            self._fns[sampler] = jax.jit(self._generate, static_argnames=("sampler",))
        return self._fns[sampler]

    def _generate(self, unet_params, frozen, ids, neg_ids, time_ids, noise, sigmas, rng, scale,
                  phi, *, sampler):
        from sdxl_jax import models
        ctx_c, pool_c = models.encode_text(self.text_l, self.text_g, frozen["text_l"], frozen["text_g"],
                                           ids[0], ids[1], self.max_chunks)
        ctx_u, pool_u = models.encode_text(self.text_l, self.text_g, frozen["text_l"], frozen["text_g"],
                                           neg_ids[0], neg_ids[1], self.max_chunks)

        def model_fn(x_in, t, cond):
            context, pooled, tids = cond
            return models.unet_apply(self.unet, unet_params, x_in, t, context, pooled, tids)

        guided = samplers.make_cfg_model(model_fn, (ctx_c, pool_c, time_ids),
                                         (ctx_u, pool_u, time_ids), scale, phi)
        denoise = samplers.make_v_denoiser(guided, self.table)
        x0 = samplers.sample(denoise, noise, sigmas, sampler, rng)
        latents = diffusion.denormalize_latents(x0, **self.norm)
        images = models.vae_decode(self.vae, frozen["vae"], latents)
        return images, x0

    def sigmas(self, s: SampleSettings) -> np.ndarray:
        return samplers.sampling_sigmas(self.table, s.steps, s.schedule, s.height, s.width,
                                        s.sigma_max_scaling, ztsnr=self.ztsnr)

    def __call__(self, unet_params, prompts: Sequence[str], seeds: Sequence[int], s: SampleSettings):
        """uint8 images (len(prompts)·len(seeds), H, W, 3), prompt-major, and the latents."""
        check_settings(s, self.cfg["model"]["preset"])
        pairs = [(p, seed) for p in prompts for seed in seeds]
        n = len(pairs)
        h, w = s.height // 8, s.width // 8
        noise = jnp.concatenate([jax.random.normal(jax.random.PRNGKey(int(seed)), (1, h, w, 4))
                                 for _, seed in pairs])
        ids = self._tokens([p for p, _ in pairs])
        neg = self._tokens([s.negative] * n)
        time_ids = jnp.tile(jnp.array([[s.height, s.width, 0, 0, s.height, s.width]], jnp.float32), (n, 1))
        rng = jax.random.PRNGKey(int(seeds[0]) + 1)
        images, x0 = self._fn(s.sampler)(unet_params, self.frozen, ids, neg, time_ids, noise,
                                         jnp.asarray(self.sigmas(s), jnp.float32), rng,
                                         jnp.float32(s.cfg), jnp.float32(s.rescale), sampler=s.sampler)
        images = np.asarray(jax.device_get(images), np.float32)
        if not np.all(np.isfinite(images)):
            raise FloatingPointError("sampling produced non-finite pixels")
        return to_uint8(images), np.asarray(jax.device_get(x0))


# ---- loading a run ----------------------------------------------------------------------------
def resolve_checkpoint(workdir: str | None, checkpoint: str | None, step: int | None):
    """(checkpoints directory, step) from --workdir [--step] or --checkpoint <dir>/<step>; without
    a step, the newest whose config and metadata read (`runs.open_run`; its arrays are checked,
    and older steps fallen back to, when they are read)."""
    run = _open(workdir, checkpoint, step)
    return run.directory, run.step


def _open(workdir, checkpoint, step):
    from sdxl_jax.runs import open_run
    if checkpoint:
        path = os.path.abspath(checkpoint.rstrip("/"))
        if not os.path.basename(path).isdigit() or not os.path.isdir(path):
            raise FileNotFoundError(f"--checkpoint {path!r} is not a checkpoint step directory "
                                    f"(expected <workdir>/checkpoints/<step>)")
        return open_run(path, step)
    return open_run(workdir, step)


def load_run(workdir=None, checkpoint=None, step=None, weights: str | None = "ema"):
    """(config dict, UNet params, meta) of a saved run on one device, reading only the chosen
    weights (None: EMA when the run kept one); config and meta are those of the step read."""
    run = _open(workdir, checkpoint, step)
    params = run.params("unet", weights)
    log.info("loaded %s weights of step %d from %s", weights or run.default_weights(), run.step,
             run.directory)
    return run.config, params, run.meta


def sampler_for_run(cfg: dict, meta: dict) -> ImageSampler:
    from sdxl_jax.models.weights import frozen_params
    lat = meta.get("latents", {})
    return ImageSampler(cfg, frozen_params(cfg), lat.get("mean"), lat.get("std"))


def main(argv=None) -> int:
    from sdxl_jax.models.hf import block_torch
    block_torch()
    from sdxl_jax import cli
    p = cli.ArgumentParser(prog="python -m sdxl_jax.sample", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="run directory (latest checkpoint unless --step)")
    src.add_argument("--checkpoint", help="a checkpoint step directory <workdir>/checkpoints/<step>")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a grid row each")
    p.add_argument("--negative", default="")
    p.add_argument("--seed", type=int, action="append", help="repeat for a grid column each")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the run's sample.width)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--rescale", type=float, default=0.0, help="CFG rescale φ")
    p.add_argument("--sampler", choices=samplers.SAMPLERS, default="euler")
    p.add_argument("--schedule", choices=samplers.SCHEDULE_KINDS, default="trailing")
    p.add_argument("--no-sigma-max-scaling", action="store_true")
    p.add_argument("--out", required=True, help="PNG path")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # what can be checked before loading anything (the run's own sizes are checked after)
    check_settings(SampleSettings(width=1 if a.width is None else a.width,
                                  height=1 if a.height is None else a.height, steps=a.steps,
                                  cfg=a.cfg, rescale=a.rescale))
    if os.path.isdir(a.out):
        raise IsADirectoryError(f"--out {a.out!r} is a directory; give the PNG file to write")
    cfg, params, meta = load_run(a.workdir, a.checkpoint, a.step, a.weights)
    settings = SampleSettings(width=a.width or int(cfg["sample"]["width"]),
                              height=a.height or int(cfg["sample"]["height"]), steps=a.steps,
                              cfg=a.cfg, rescale=a.rescale, sampler=a.sampler, schedule=a.schedule,
                              sigma_max_scaling=not a.no_sigma_max_scaling, negative=a.negative)
    check_settings(settings, cfg["model"]["preset"])  # before any compile
    seeds = a.seed or [0]
    images, _ = sampler_for_run(cfg, meta)(params, a.prompt, seeds, settings)
    save_png(make_grid(images, len(a.prompt), len(seeds)), a.out)
    print(f"wrote {a.out} ({len(a.prompt)}×{len(seeds)} grid, {settings.width}×{settings.height})")
    return 0


if __name__ == "__main__":
    from sdxl_jax import cli
    sys.exit(cli.run(main))  # user errors as one line `error: …`; --debug shows the traceback
