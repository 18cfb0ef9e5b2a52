"""Text → image with a run's models: the settings, their checks, and the jitted sampler that
previews, `sdxl_jax.sample` (the CLI), prompt_check and black_check share (METHODS §4, §5)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdxl_jax import diffusion
from sdxl_jax.diffusion import samplers
from sdxl_jax.grid import to_uint8

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
        from sdxl_jax.models.build import build_unet
        m = cfg["model"]
        preset, dtype = m["preset"], m["dtype"]
        # the run's attention options (memory-efficient attention matters most at large sizes);
        # remat is a training-only choice
        attention = m.get("attention", "standard")
        if attention == "splash":  # a TPU-only kernel: sample wherever this runs with its best one
            attention = "auto"
        self.unet = build_unet(preset, dtype, attention=attention,
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

    def __call__(self, unet_params, prompts: Sequence[str], seeds: Sequence[int], s: SampleSettings,
                 text_params: dict | None = None):
        """uint8 images (len(prompts)·len(seeds), H, W, 3), prompt-major, and the latents."""
        return self.generate(unet_params, [(p, seed) for p in prompts for seed in seeds], s, text_params)

    def generate(self, unet_params, pairs: Sequence[tuple[str, int]], s: SampleSettings,
                 text_params: dict | None = None):
        """uint8 images, one per (prompt, seed) pair in order, and the latents: one batch.
        `text_params` ({"text_l"?, "text_g"?}) replace the frozen text encoders (a run that
        trains them samples with its current weights)."""
        check_settings(s, self.cfg["model"]["preset"])
        n = len(pairs)
        h, w = s.height // 8, s.width // 8
        noise = jnp.concatenate([jax.random.normal(jax.random.PRNGKey(int(seed)), (1, h, w, 4))
                                 for _, seed in pairs])
        ids = self._tokens([p for p, _ in pairs])
        neg = self._tokens([s.negative] * n)
        time_ids = jnp.tile(jnp.array([[s.height, s.width, 0, 0, s.height, s.width]], jnp.float32), (n, 1))
        rng = jax.random.PRNGKey(int(pairs[0][1]) + 1)
        frozen = dict(self.frozen, **(text_params or {}))
        images, x0 = self._fn(s.sampler)(unet_params, frozen, ids, neg, time_ids, noise,
                                         jnp.asarray(self.sigmas(s), jnp.float32), rng,
                                         jnp.float32(s.cfg), jnp.float32(s.rescale), sampler=s.sampler)
        images = np.asarray(jax.device_get(images), np.float32)
        if not np.all(np.isfinite(images)):
            raise FloatingPointError("sampling produced non-finite pixels")
        return to_uint8(images), np.asarray(jax.device_get(x0))


# ---- loading a run ----------------------------------------------------------------------------
