"""The NAI-v3 UNet loss: ZTSNR v-prediction with MinSNR and tag weights (METHODS §2–§9), as the
UNet task's per-micro-batch `grad_fn` (train/update.py turns it into the optimizer step).

Everything numerically delicate is in VP form and float32; only the UNet and text encoders run
in the compute dtype (bfloat16 by default).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sdxl_jax import diffusion

NUM_T_BINS = 10  # loss per timestep range: t in [0,100), [100,200), … [900,1000)


@dataclass(frozen=True)
class StepConfig:
    """The static pieces of the step, resolved from the config once."""
    alphas_cumprod: np.ndarray  # host float64 table
    weighting: str
    snr_gamma: float
    terminal_prob: float
    normalization: str
    scale_factor: float
    latent_mean: tuple | None
    latent_std: tuple | None
    max_chunks: int
    tag_weighting: bool
    loss_type: str = "mse"  # "mse" | "huber" (pseudo-Huber, METHODS §15)
    huber_c: float = 0.1
    huber_schedule: str = "snr"
    masked: bool = False  # mask-weighted mean under batch["loss_mask"] (METHODS §15)

    @classmethod
    def from_config(cls, cfg, latent_mean=None, latent_std=None):
        sched = diffusion.schedule_from_config(cfg.schedule)
        return cls(alphas_cumprod=sched.alphas_cumprod, weighting=cfg.loss.weighting,
                   snr_gamma=float(cfg.loss.snr_gamma), terminal_prob=float(cfg.schedule.terminal_prob),
                   normalization=cfg.latents.normalization, scale_factor=float(cfg.latents.scale_factor),
                   latent_mean=None if latent_mean is None else tuple(latent_mean),
                   latent_std=None if latent_std is None else tuple(latent_std),
                   max_chunks=int(cfg.text.max_chunks), tag_weighting=bool(cfg.loss.tag_weighting),
                   loss_type=cfg.loss.type, huber_c=float(cfg.loss.huber_c),
                   huber_schedule=cfg.loss.huber_schedule, masked=bool(cfg.loss.masked))


def draw_t_and_noise(keys, sc: StepConfig, latents):
    """Timestep and noise per sample from that sample's own key (update.per_sample_keys): uniform
    over the T indices, with optional extra mass `terminal_prob` on the pure-noise step T−1."""
    num_steps = sc.alphas_cumprod.shape[0]

    def one(key):
        k_t, k_term, k_eps = jax.random.split(key, 3)
        t = jax.random.randint(k_t, (), 0, num_steps)
        if sc.terminal_prob > 0:
            t = jnp.where(jax.random.uniform(k_term) < sc.terminal_prob, num_steps - 1, t)
        return t, jax.random.normal(k_eps, latents.shape[1:], jnp.float32)
    return jax.vmap(one)(keys)


def per_sample_loss(predict_v: Callable, sc: StepConfig, batch, t, eps):
    """(B,) weighted losses at timesteps t with noise eps. `predict_v(z_NHWC, t) -> v̂_NHWC`."""
    x0 = diffusion.normalize_latents(batch["latents"].astype(jnp.float32), sc.normalization,
                                     sc.scale_factor, sc.latent_mean, sc.latent_std)
    a, s = diffusion.vp_coefficients(sc.alphas_cumprod, t)
    z, v = diffusion.add_noise(x0, eps, a, s), diffusion.v_target(x0, eps, a, s)
    w_snr = diffusion.snr_loss_weight(diffusion.snr(a, s), sc.weighting, sc.snr_gamma)
    w_tag = batch["loss_weight"] if sc.tag_weighting else None
    c = diffusion.huber_threshold(a, s, sc.huber_c, sc.huber_schedule) if sc.loss_type == "huber" else None
    mask = batch["loss_mask"] if sc.masked else None
    return diffusion.weighted_v_loss(predict_v(z, t), v, w_snr, w_tag, loss_type=sc.loss_type, huber_c=c,
                                     mask=mask)


def text_conditioning(text_l, text_g, text_params, batch, max_chunks: int):
    """(context, pooled) of both towers. Gradients flow to `text_params` only where they are the
    differentiated (trained) weights; frozen weights get none and cost no backward pass."""
    from sdxl_jax.models import encode_text  # model layer: diffusers/transformers Flax
    return encode_text(text_l, text_g, text_params["text_l"], text_params["text_g"],
                       batch["input_ids_l"], batch["input_ids_g"], max_chunks)


def timestep_bins(t, num_steps: int):
    """(B, NUM_T_BINS) one-hot of the timestep range of each sample."""
    bins = jnp.clip(t * NUM_T_BINS // num_steps, 0, NUM_T_BINS - 1)
    return jax.nn.one_hot(bins, NUM_T_BINS, dtype=jnp.float32)


def cast_for_compute(params, dtype, shardings=None):
    """The sharded float32 params cast to the compute dtype BEFORE FSDP gathers them, so the
    all-gathers move and hold half the bytes (the cast runs on each device's shard; the
    constraint keeps XLA from moving it after the gather). No-op for float32 compute."""
    if jnp.dtype(dtype) == jnp.float32:
        return params
    cast = jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
    return cast if shardings is None else jax.lax.with_sharding_constraint(cast, shardings)


def frozen_text_view(params, frozen, ctx):
    """train.trainable="unet": the params are the UNet, the text encoders are frozen."""
    return params, frozen, {}


def intercepted(module, interceptor):
    """`module`, or `module` running under a Flax method interceptor (LoRA branches)."""
    if interceptor is None:
        return module
    from sdxl_jax.adapters import Intercepted
    return Intercepted(module, interceptor)


def unet_grad_fn(unet, text_l, text_g, sc: StepConfig, gather_dtype=jnp.float32, unet_shardings=None,
                 view=frozen_text_view):
    """The UNet task's `grad_fn(params, frozen, micro_batch, ctx) -> (loss, grads, metrics)`
    (train/update.py). `view(params, frozen, ctx) -> (UNet params, {"text_l", "text_g"},
    {model name: interceptor})` says where the weights of this step come from (trained tree,
    frozen trees, LoKr adapters merged) and which models run with a Flax method interceptor
    (the low-rank branches of LoRA, sdxl_jax.adapters.adapt)."""
    from sdxl_jax.models import unet_apply  # model layer: diffusers/transformers Flax
    from sdxl_jax.train.update import per_sample_keys

    def grad_fn(params, frozen, batch, ctx):
        t, eps = draw_t_and_noise(per_sample_keys(ctx), sc, batch["latents"])

        def loss_fn(params):
            unet_params, text_params, branches = view(params, frozen, ctx)
            tl, tg, un = (intercepted(m, branches.get(k)) for k, m in
                          (("text_l", text_l), ("text_g", text_g), ("unet", unet)))
            context, pooled = text_conditioning(tl, tg, text_params, batch, sc.max_chunks)
            p = cast_for_compute(unet_params, gather_dtype, unet_shardings)

            def predict_v(z, tt):
                return unet_apply(un, p, z, tt, context, pooled, batch["time_ids"])
            losses = per_sample_loss(predict_v, sc, batch, t, eps)
            return jnp.mean(losses), losses

        (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        onehot = timestep_bins(t, sc.alphas_cumprod.shape[0])
        metrics = {"loss_bin_sum": jnp.where(jnp.isfinite(losses), losses, 0.0) @ onehot,
                   "loss_bin_count": jnp.sum(onehot, axis=0)}
        if "source_onehot" in batch:  # ≥ 2 data sources (data.sources): the loss of each
            rows = batch["source_onehot"]
            metrics["loss_source_sum"] = jnp.where(jnp.isfinite(losses), losses, 0.0) @ rows
            metrics["loss_source_count"] = jnp.sum(rows, axis=0)
        return loss, grads, metrics

    return grad_fn
