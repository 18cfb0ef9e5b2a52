"""The NAI-v3 train step: ZTSNR v-prediction loss with MinSNR and tag weights (METHODS §2–§9).

Pure function of (state, frozen text-encoder params, batch); `jit_train_step` adds shardings
and donation. Everything numerically delicate is in VP form and float32; only the UNet and
text encoders run in the compute dtype (bfloat16 by default).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sdxl_jax import diffusion, parallel
from sdxl_jax.train.optim import ema_update
from sdxl_jax.train.state import TrainState

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
    ema: Any  # ConfigDict section (static numbers)
    ema_enabled: bool

    @classmethod
    def from_config(cls, cfg, latent_mean=None, latent_std=None):
        sched = diffusion.schedule_from_config(cfg.schedule)
        return cls(alphas_cumprod=sched.alphas_cumprod, weighting=cfg.loss.weighting,
                   snr_gamma=float(cfg.loss.snr_gamma), terminal_prob=float(cfg.schedule.terminal_prob),
                   normalization=cfg.latents.normalization, scale_factor=float(cfg.latents.scale_factor),
                   latent_mean=None if latent_mean is None else tuple(latent_mean),
                   latent_std=None if latent_std is None else tuple(latent_std),
                   max_chunks=int(cfg.text.max_chunks), tag_weighting=bool(cfg.loss.tag_weighting),
                   ema=cfg.ema, ema_enabled=bool(cfg.ema.enabled))


def sample_timesteps(rng, batch: int, num_steps: int, terminal_prob: float):
    """Uniform over the T indices, with optional extra mass on the terminal (pure-noise) step."""
    k_t, k_term = jax.random.split(rng)
    t = jax.random.randint(k_t, (batch,), 0, num_steps)
    if terminal_prob > 0:
        t = jnp.where(jax.random.uniform(k_term, (batch,)) < terminal_prob, num_steps - 1, t)
    return t


def draw_t_and_noise(rng, sc: StepConfig, latents):
    k_t, k_eps = jax.random.split(rng)
    t = sample_timesteps(k_t, latents.shape[0], sc.alphas_cumprod.shape[0], sc.terminal_prob)
    return t, jax.random.normal(k_eps, latents.shape, jnp.float32)


def per_sample_loss(predict_v: Callable, sc: StepConfig, batch, t, eps):
    """(B,) weighted losses at timesteps t with noise eps. `predict_v(z_NHWC, t) -> v̂_NHWC`."""
    x0 = diffusion.normalize_latents(batch["latents"].astype(jnp.float32), sc.normalization,
                                     sc.scale_factor, sc.latent_mean, sc.latent_std)
    a, s = diffusion.vp_coefficients(sc.alphas_cumprod, t)
    z, v = diffusion.add_noise(x0, eps, a, s), diffusion.v_target(x0, eps, a, s)
    w_snr = diffusion.snr_loss_weight(diffusion.snr(a, s), sc.weighting, sc.snr_gamma)
    w_tag = batch["loss_weight"] if sc.tag_weighting else None
    return diffusion.weighted_v_loss(predict_v(z, t), v, w_snr, w_tag)


def text_conditioning(text_l, text_g, frozen, batch, max_chunks: int):
    from sdxl_jax.models import encode_text  # model layer: diffusers/transformers Flax
    context, pooled = encode_text(text_l, text_g, frozen["text_l"], frozen["text_g"],
                                  batch["input_ids_l"], batch["input_ids_g"], max_chunks)
    return jax.lax.stop_gradient(context), jax.lax.stop_gradient(pooled)


def timestep_bins(t, num_steps: int):
    """(B, NUM_T_BINS) one-hot of the timestep range of each sample."""
    bins = jnp.clip(t * NUM_T_BINS // num_steps, 0, NUM_T_BINS - 1)
    return jax.nn.one_hot(bins, NUM_T_BINS, dtype=jnp.float32)


def make_train_step(unet, text_l, text_g, tx: optax.GradientTransformation, sc: StepConfig,
                    grad_shardings=None):
    """Returns `train_step(state, frozen, batch) -> (state, metrics)`; frozen = {"text_l", "text_g"}.

    `grad_shardings` (the params' shardings) pins each gradient to its parameter's FSDP shards,
    so XLA reduce-scatters it as soon as it exists instead of keeping a full fp32 copy."""
    from sdxl_jax.models import unet_apply  # model layer: diffusers/transformers Flax

    def train_step(state: TrainState, frozen, batch):
        rng, step_rng = jax.random.split(state.rng)
        context, pooled = text_conditioning(text_l, text_g, frozen, batch, sc.max_chunks)
        t, eps = draw_t_and_noise(step_rng, sc, batch["latents"])

        def loss_fn(params):
            def predict_v(z, tt):
                return unet_apply(unet, params, z, tt, context, pooled, batch["time_ids"])
            losses = per_sample_loss(predict_v, sc, batch, t, eps)
            return jnp.mean(losses), losses

        (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        if grad_shardings is not None:
            grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        step = state.step + 1
        ema = ema_update(state.ema_params, params, step, sc.ema) if sc.ema_enabled else state.ema_params

        # Non-finite guard: a NaN/Inf loss or gradient leaves params, EMA and optimizer state
        # untouched (the RNG still advances so the next step draws fresh noise).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = TrainState(
            step=jnp.where(finite, step, state.step),
            params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
            ema_params=keep(ema, state.ema_params), rng=rng,
            nonfinite=jnp.where(finite, 0, state.nonfinite + 1).astype(jnp.int32))

        onehot = timestep_bins(t, sc.alphas_cumprod.shape[0])
        metrics = {
            "loss": loss, "grad_norm": grad_norm, "finite": finite,
            "loss_bin_sum": jnp.where(jnp.isfinite(losses), losses, 0.0) @ onehot,
            "loss_bin_count": jnp.sum(onehot, axis=0),
        }
        return new_state, metrics

    return train_step


class CompiledStep:
    """AOT-compiles the step once per batch-shape signature (one per bucket) and counts it.

    Shardings are explicit and the state is donated. The cache key is the batch's shapes, so
    a new bucket compiles exactly once and nothing else can trigger a recompile.
    """

    def __init__(self, step_fn, state_shardings, frozen_shardings, mesh):
        self._mesh = mesh
        self._jitted = jax.jit(
            step_fn,
            in_shardings=(state_shardings, frozen_shardings, parallel.batch_sharding(mesh)),
            out_shardings=(state_shardings, parallel.replicated(mesh)),
            donate_argnums=(0,))
        self._compiled: dict = {}

    @staticmethod
    def signature(batch) -> tuple:
        return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))

    @property
    def compile_count(self) -> int:
        return len(self._compiled)

    def lower(self, state, frozen, batch):
        return self._jitted.lower(state, frozen, batch)

    def __call__(self, state, frozen, batch):
        key = self.signature(batch)
        fn = self._compiled.get(key)
        if fn is None:
            fn = self._compiled[key] = _compile_once(self.lower(state, frozen, batch), self._mesh)
            parallel.host_barrier(f"compiled_step_{len(self._compiled)}")
        return fn(state, frozen, batch)


# Executables compiled in this process, by (program text, devices): a second `train()` in the
# same process (a new stage list, an in-process restart, the test suite) re-lowers its step but
# neither recompiles it nor reloads it from the persistent cache (which on XLA:CPU costs about
# half a compile). One entry per distinct step program, so a handful in any process.
_EXECUTABLES: dict = {}


def _compile_once(lowered, mesh):
    import hashlib
    key = (hashlib.sha256(lowered.as_text().encode()).hexdigest(),
           tuple(int(d.id) for d in mesh.devices.flat))
    compiled = _EXECUTABLES.get(key)
    if compiled is None:
        compiled = _EXECUTABLES[key] = lowered.compile()
    return compiled
