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
        if s.width % 8 or s.height % 8:
            raise ValueError(f"width and height must be multiples of 8, got {s.width}x{s.height}")
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


def to_uint8(images_m1_1: np.ndarray) -> np.ndarray:
    return np.clip(np.round((images_m1_1 + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, rows: int, cols: int) -> np.ndarray:
    n, h, w, c = images.shape
    if n != rows * cols:
        raise ValueError(f"{n} images do not fill a {rows}×{cols} grid")
    return images.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def save_png(image: np.ndarray, path: str) -> None:
    from PIL import Image
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    Image.fromarray(image).save(tmp)
    os.replace(tmp, path)


# ---- loading a run ----------------------------------------------------------------------------
def resolve_checkpoint(workdir: str | None, checkpoint: str | None, step: int | None):
    """(checkpoints directory, step) from --workdir [--step] or --checkpoint <dir>/<step>."""
    if checkpoint:
        checkpoint = os.path.abspath(checkpoint.rstrip("/"))
        base, name = os.path.split(checkpoint)
        if not name.isdigit() or not os.path.isdir(checkpoint):
            raise FileNotFoundError(f"--checkpoint {checkpoint!r} is not a checkpoint step directory "
                                    f"(expected <workdir>/checkpoints/<step>)")
        return base, int(name)
    ckdir = os.path.join(workdir, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(ckdir) if d.isdigit()) if os.path.isdir(ckdir) else []
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {ckdir}")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {ckdir} (have {steps})")
    return ckdir, step if step is not None else steps[-1]


def load_run(workdir=None, checkpoint=None, step=None, weights: str = "ema"):
    """(config dict, UNet params, meta) of a saved run, reading only the chosen weights."""
    from sdxl_jax import models
    from sdxl_jax.checkpoint import Checkpointer
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    ckdir, step = resolve_checkpoint(workdir, checkpoint, step)
    ck = Checkpointer(ckdir, async_save=False)
    cfg = ck.read_json(step, "config")
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev),
                            models.abstract_params("unet", cfg["model"]["preset"]))
    params, cfg, meta = ck.restore_params(step, abstract, "ema_params" if weights == "ema" else "params")
    ck.close()
    log.info("loaded %s weights of step %d from %s", weights, step, ckdir)
    return cfg, params, meta


def sampler_for_run(cfg: dict, meta: dict) -> ImageSampler:
    from sdxl_jax.models.weights import frozen_params
    lat = meta.get("latents", {})
    return ImageSampler(cfg, frozen_params(cfg), lat.get("mean"), lat.get("std"))


def main(argv=None) -> int:
    from sdxl_jax.models.hf import block_torch
    block_torch()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    try:
        cfg, params, meta = load_run(a.workdir, a.checkpoint, a.step, a.weights)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    settings = SampleSettings(width=a.width or int(cfg["sample"]["width"]),
                              height=a.height or int(cfg["sample"]["height"]), steps=a.steps,
                              cfg=a.cfg, rescale=a.rescale, sampler=a.sampler, schedule=a.schedule,
                              sigma_max_scaling=not a.no_sigma_max_scaling, negative=a.negative)
    seeds = a.seed or [0]
    images, _ = sampler_for_run(cfg, meta)(params, a.prompt, seeds, settings)
    save_png(make_grid(images, len(a.prompt), len(seeds)), a.out)
    print(f"wrote {a.out} ({len(a.prompt)}×{len(seeds)} grid, {settings.width}×{settings.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
