"""What the UNet task trains (`train.trainable`, METHODS §14), as plain data the task plugs in:

- "unet": the full UNet (the recipe); the text encoders are frozen.
- "unet+text": the UNet and the text encoders chosen in `text_encoders.*`, each encoder with its
  own learning rate and optional stop step; params = {"unet", "text_l"?, "text_g"?}.
- "lora": adapters only (sdxl_jax.adapters: LoRA / LoCon / LoKr on the UNet and optionally the
  text encoders); params = the adapter tree, the base weights frozen in the compute dtype. In the
  step LoRA / LoCon layers run factorised (the frozen layer plus its low-rank branch, added by a
  Flax method interceptor), LoKr kernels are merged on the fly; previews and validation run on
  kernels merged once (the base tree itself is untouched either way).

Optimizer state and EMA exist only for the trained tree. Frozen weights sit in the compute
dtype (bf16 for SDXL: half the bytes), sharded like the trained ones.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from sdxl_jax.train import optim

MODES = ("unet", "unet+text", "lora")
TEXT = ("text_l", "text_g")
_LORA_STREAM = 0x10A  # rank-dropout keys: separate from the per-sample streams


@dataclass(frozen=True)
class Trainable:
    mode: str
    abstract_params: Any  # the trained tree
    abstract_frozen: dict  # what the step reads besides it
    tx: optax.GradientTransformation
    view: Callable  # (params, frozen, ctx) → (UNet params, {"text_l", "text_g"}, {model: interceptor})
    #                 inside the step (step.unet_grad_fn)
    eval_view: Callable  # (params, frozen) → the two params parts, for previews and validation
    unet_of: Callable  # the trained tree's UNet part (for the bf16 gather), or None
    trained_text: tuple = ()
    plan: Any = None  # the adapter plan (lora)
    metadata: dict = dataclasses.field(default_factory=dict)


def lora_settings(cfg):
    from sdxl_jax.adapters import AdapterConfig
    lo = cfg.lora
    return AdapterConfig(algo=lo.algo, rank=int(lo.rank), alpha=float(lo.alpha), conv=bool(lo.conv),
                         conv_rank=int(lo.conv_rank), conv_alpha=float(lo.conv_alpha),
                         models=tuple(lo.models), targets=tuple(lo.targets),
                         lokr_factor=int(lo.lokr_factor), rank_dropout=float(lo.rank_dropout))


def _frozen_dtype(cfg):
    return jnp.dtype(cfg.model.dtype)


def _as(tree, dtype):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating)
                                                       else x.dtype), tree)


def _text_optimizer(cfg, name: str, total_steps: int):
    te, suffix = cfg.text_encoders, name[-1]
    tcfg = ml_collections.ConfigDict(cfg.train.to_dict())
    tcfg.learning_rate = float(te[f"learning_rate_{suffix}"])
    return optim.make_optimizer(tcfg, total_steps, stop_step=int(te[f"stop_step_{suffix}"]))


def describe(cfg, abstract_unet, total_steps: int | None = None) -> Trainable:
    """The trained tree, the frozen trees, the optimizer and the views of `cfg.train.trainable`,
    from the config and abstract shapes only."""
    from sdxl_jax.models.weights import cached_abstract_params  # one eval_shape per tree and process
    mode, preset = cfg.train.trainable, cfg.model.preset
    abstract_text = {k: cached_abstract_params(k, preset) for k in TEXT}
    dtype = _frozen_dtype(cfg)
    if mode == "unet":
        return Trainable(mode, abstract_unet, _as(abstract_text, dtype),
                         optim.make_optimizer(cfg.train, total_steps),
                         view=lambda p, f, ctx: (p, f, {}), eval_view=lambda p, f: (p, f),
                         unet_of=lambda tree: tree, metadata={"trainable": mode})
    if mode == "unet+text":
        trained = tuple(k for k in TEXT if cfg.text_encoders[f"train_{k[-1]}"])
        params = {"unet": abstract_unet, **{k: abstract_text[k] for k in trained}}
        frozen = {k: v for k, v in _as(abstract_text, dtype).items() if k not in trained}
        txs = {"unet": optim.make_optimizer(cfg.train, total_steps),
               **{k: _text_optimizer(cfg, k, total_steps) for k in trained}}
        tx = optax.multi_transform(txs, lambda p: {k: k for k in p})

        def eval_view(p, f):
            return p["unet"], {k: p[k] if k in p else f[k] for k in TEXT}
        return Trainable(mode, params, frozen, tx, lambda p, f, ctx: eval_view(p, f) + ({},), eval_view,
                         unet_of=lambda tree: tree["unet"],
                         trained_text=trained, metadata={"trainable": mode, "trained_text": list(trained)})
    if mode == "lora":
        from sdxl_jax.adapters import abstract_adapters, adapt, apply_adapters, make_plan
        settings = lora_settings(cfg)
        plan = make_plan({"unet": abstract_unet, **abstract_text}, settings)
        frozen = {"unet": _as(abstract_unet, dtype), **_as(abstract_text, dtype)}
        names = ("unet",) + TEXT

        def view(p, f, ctx):
            drop = settings.rank_dropout
            rng = jax.random.fold_in(ctx.rng, _LORA_STREAM) if drop > 0 else None
            out, branches = adapt({k: f[k] for k in names}, p, plan, 1.0, rng=rng, rank_dropout=drop)
            return out["unet"], {k: out[k] for k in TEXT}, branches

        def eval_view(p, f):  # merged once: previews run many denoising steps on it
            out = apply_adapters({k: f[k] for k in names}, p, plan, 1.0)
            return out["unet"], {k: out[k] for k in TEXT}
        return Trainable(mode, abstract_adapters(plan), frozen, optim.make_optimizer(cfg.train, total_steps),
                         view, eval_view, unet_of=lambda tree: None, plan=plan,
                         metadata={"trainable": mode, "lora": dataclasses.asdict(settings)})
    raise ValueError(f"train.trainable={mode!r}: must be one of {MODES}")


def initial_params(tr: Trainable, cfg, sources: dict, shardings, seed_key) -> Any:
    """The trained tree of a fresh run, placed by `shardings`: `sources` holds the run's float32
    starting weights ({"unet", "text_l", "text_g"}, already placed)."""
    if tr.mode == "unet":
        return sources["unet"]
    if tr.mode == "unet+text":
        return {"unet": sources["unet"], **{k: jax.device_put(sources[k], shardings[k]) for k in tr.trained_text}}
    from sdxl_jax.adapters import init_adapters
    if cfg.model.lora_init:
        return jax.device_put(_adapters_from_file(tr, cfg), shardings)
    return init_adapters(tr.plan, int(cfg.train.seed), out_shardings=shardings)


def frozen_values(tr: Trainable, sources: dict, shardings: dict) -> dict:
    """The step's frozen trees, cast to their abstract dtype on the device (no host copy)."""
    return {k: jax.jit(lambda x, a=a: jax.tree.map(lambda v, s: v.astype(s.dtype), x, a),
                       out_shardings=shardings[k])(sources[k])
            for k, a in tr.abstract_frozen.items()}


def _adapters_from_file(tr: Trainable, cfg):
    """model.lora_init: a kohya / PEFT file whose layers and ranks must be this run's plan
    (a layer's alpha may differ: it is read with the same ΔW, adapters.read_lora_init)."""
    from sdxl_jax.adapters import read_lora_init
    return read_lora_init(cfg.model.lora_init, cfg.model.preset, tr.plan)
