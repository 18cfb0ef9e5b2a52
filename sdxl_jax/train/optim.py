"""Optimizer, learning-rate schedule and EMA (METHODS §12), all from optax pieces."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from sdxl_jax.config import LR_SCHEDULES, OPTIMIZERS  # noqa: F401 (validated there, built here)

# "cosine_tail": constant after the warm-up, then a cosine decay over the last quarter of the
# steps to 5 % of the peak (measured for the demo's from-scratch VAE: 22.4 dB vs 20.3 dB
# for the same steps at a constant rate, and 17.7 dB for a cosine over the whole run)
TAIL_FRACTION, TAIL_FLOOR = 0.25, 0.05


def learning_rate_schedule(train_cfg, total_steps: int | None = None, stop_step: int = 0) -> optax.Schedule:
    """Linear warm-up to `learning_rate`, then constant or cosine decay to 0 at the last step;
    exactly 0 from optimizer step `stop_step` on when it is > 0 (a part that stops training)."""
    base = _schedule(train_cfg, total_steps)
    if stop_step > 0:
        return lambda count: jnp.where(count < stop_step, base(count), 0.0)
    return base


def _schedule(train_cfg, total_steps: int | None) -> optax.Schedule:
    lr, warmup = float(train_cfg.learning_rate), int(train_cfg.warmup_steps)
    total = int(total_steps if total_steps is not None else train_cfg.steps)
    if train_cfg.lr_schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                     optax.constant_schedule(lr)], [warmup])
    if train_cfg.lr_schedule == "cosine":
        if warmup == 0:
            return optax.cosine_decay_schedule(lr, max(total, 1), 0.0)
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total, warmup + 1), 0.0)
    if train_cfg.lr_schedule == "cosine_tail":
        tail_start = max(warmup, int(round(total * (1 - TAIL_FRACTION))))
        parts = [optax.linear_schedule(0.0, lr, warmup)] if warmup else []
        parts += [optax.constant_schedule(lr),
                  optax.cosine_decay_schedule(lr, max(total - tail_start, 1), TAIL_FLOOR)]
        bounds = ([warmup] if warmup else []) + [tail_start]
        return optax.join_schedules(parts, bounds)
    raise ValueError(f"train.lr_schedule must be one of {LR_SCHEDULES}, got {train_cfg.lr_schedule!r}")


def make_optimizer(train_cfg, total_steps: int | None = None, stop_step: int = 0) -> optax.GradientTransformation:
    """Clip → optimizer. Gradient accumulation is not an optimizer wrapper: the update
    (train/update.py) sums the micro-batch gradients inside the step and calls this once per
    optimizer step, so the schedule, weight decay and clipping all count optimizer steps."""
    sched = learning_rate_schedule(train_cfg, total_steps, stop_step)
    name = train_cfg.optimizer
    if name == "adamw":
        opt = optax.adamw(sched, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                          weight_decay=train_cfg.weight_decay)
    elif name == "lion":
        opt = optax.lion(sched, b1=train_cfg.b1, b2=train_cfg.b2, weight_decay=train_cfg.weight_decay)
    elif name == "adafactor":
        opt = optax.adafactor(sched, weight_decay_rate=train_cfg.weight_decay or None)
    else:
        raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got {name!r}")
    chain = [optax.clip_by_global_norm(train_cfg.grad_clip)] if train_cfg.grad_clip > 0 else []
    return optax.chain(*chain, opt)


def ema_decay(step, ema_cfg):
    """d_t = min(d_max, 1 − (1 + t/inv_gamma)^(−power)); t counts EMA updates from 0."""
    t = jnp.asarray(step, jnp.float32)
    warm = 1.0 - jnp.power(1.0 + t / ema_cfg.inv_gamma, -ema_cfg.power)
    return jnp.minimum(jnp.float32(ema_cfg.decay), warm)


def ema_update(ema_params, params, step, ema_cfg):
    """ema ← ema + (1 − d_t)(θ − ema) every `ema.every` steps, in float32.

    `step` is the optimizer step just completed (1-based); the decay uses the number of EMA
    updates done before this one, so the very first update copies θ (d_0 = 0). With every > 1
    the update sits in a `cond`: the other steps neither read θ nor touch the EMA (a select
    with step size 0 would still compute the whole update every step).
    """
    every = int(ema_cfg.every)

    def update(ema):
        d = ema_decay((jnp.asarray(step) - 1) // every, ema_cfg)
        new = optax.incremental_update(params, ema, 1.0 - d)
        return jax.tree.map(lambda x: x.astype(jnp.float32), new)

    if every == 1:
        return update(ema_params)
    return jax.lax.cond(jnp.asarray(step) % every == 0, update, lambda ema: ema, ema_params)
