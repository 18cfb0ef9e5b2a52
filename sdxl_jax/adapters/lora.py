"""LoRA / LoCon / LoKr adapters as a pure function of (frozen base params, adapter params).

METHODS §14. The base tree is never modified or extended (checkpoints of the base load
unchanged), jax.grad with respect to `adapters` alone gives the adapter gradients, and the
optimizer state and EMA exist only for the adapter tree. Inside the jitted step (`adapt`):
- LoRA / LoCon run factorised, as kohya's modules do: y = layer(x; W) + s·up(down(x)), added
  by a `flax.linen.intercept_methods` interceptor around the model's apply (`lora_interceptor`,
  `Intercepted`) to the `__call__` of each targeted nn.Dense / nn.Conv, found by its module
  path. No merged kernel and no dL/dW exist: the backward pass forms dL/dx through the frozen
  W and the small dL/dA, dL/dB (the merged form held a merged copy and a full dL/dW of every
  targeted kernel across the step; SDXL rank 32 at 1024² on one device went from 23.79 to
  18.88 GiB, README). The branch runs in the layer's compute dtype (bf16 in real runs; the
  adapter params are cast to it), down is the layer itself with r outputs (a k×k LoCon conv
  keeps its strides and padding), up a 1×1 projection. It works in any Flax model (the UNet
  under every model.remat mode, the branch recomputed with its block; the CLIP text towers). A zero-initialised adapter (B = 0) adds an exact 0 to every targeted layer
  (op by op the output is bit-identical to the base model's; compiled, XLA may rewrite the
  neighbouring ops differently: a last-bit difference).
- LoKr keeps the merged form (`apply_adapters`: each targeted kernel replaced by W + s·ΔW,
  cast back to W's dtype, and the unchanged model runs on that tree): its Kronecker product
  has no cheap factorised form, so its backward pass forms dL/dW of each targeted kernel (as
  full fine-tuning of those layers does) before projecting onto the factors.
Previews, validation (`apply_adapters`, merged once per evaluation) and exports
(`merge_params`, on the host) run on merged kernels.

Why not qwix (Google's LoraProvider, which intercepts dot_general / conv): qwix 0.1.8
installs with jax 0.10.2 / flax 0.12.8, but its adapter leaves live inside the base tree
(`kernel_lora_a` next to `kernel`, under an extra path level when the model is wrapped), it
has no LoKr, and the kohya/PEFT files need our own names anyway. Flax's own method
interception gives the same factorised compute with the adapter tree kept apart.

Layout of the adapter params: a nested dict mirroring each model's module path, holding the
tensors exactly as the kohya file stores them (PyTorch orientation), so export is a rename:
  LoRA   {"lora_down": (r, in) | conv (r, in, kh, kw), "lora_up": (out, r) | (out, r, 1, 1)}
  LoKr   {"lokr_w1": (a, b), "lokr_w2_a": (c, r), "lokr_w2_b": (r, d)}, out = a·c, in = b·d
ΔW (PyTorch (out, in[, kh, kw])) = (α/r)·up·down (LoCon: down is the k×k conv to r channels,
up the 1×1 conv), or (α/r)·(w1 ⊗ (w2_a·w2_b)) for LoKr (ComfyUI's and LyCORIS's scale: alpha
over w2_b's rank). α and r are static (the `Plan`), never trained.

Dropout: `rank_dropout` (LyCORIS's rank_dropout) drops whole rank components of ΔW, one
Bernoulli mask per targeted layer per step (`rank_masks`), shared by the batch, rescaled by
1/(1-p): on the r-dim activation in the factorised form, on the factors in the merged one
(the same ΔW). No input or module dropout (the merged LoKr form cannot express them).
"""
from __future__ import annotations

import dataclasses
import math
import re
import zlib
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdxl_jax.models.convert import flat_leaves, unflatten

MODELS = ("unet", "text_l", "text_g")
# METHODS §14 defaults, matched (re.search) against the module path joined by "/", e.g.
# "down_blocks_1/attentions_0/transformer_blocks_0/attn1/to_q".
DEFAULT_TARGETS = {
    "unet": (r"/attn[12]/to_(q|k|v|out_0)$", r"/ff/net_0/proj$", r"/ff/net_2$",
             r"attentions_\d+/proj_(in|out)$"),
    "text_l": (r"/self_attn/(q|k|v|out)_proj$", r"/mlp/fc[12]$"),
    "text_g": (r"/self_attn/(q|k|v|out)_proj$", r"/mlp/fc[12]$"),
}
# LoCon: what kohya's LoRA adds with conv_dim: every Conv2d / Linear of the resnets and the
# down/up samplers (3×3 convs get conv_rank / conv_alpha, 1×1 convs and Linears rank / alpha).
CONV_TARGETS = (r"resnets_\d+/(conv1|conv2|conv_shortcut|time_emb_proj)$",
                r"(down|up)samplers_0/conv$")
ALGOS = ("lora", "lokr")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """What to adapt and how (the `lora.*` config section, see the report / README)."""
    algo: str = "lora"  # "lora" (incl. LoCon convs) | "lokr"
    rank: int = 16
    alpha: float = 16.0
    conv: bool = False  # LoCon: also the resnet / sampler convs (UNet only)
    conv_rank: int = 8  # for the k×k convs (1×1 convs and resnet Linears use rank)
    conv_alpha: float = 8.0
    models: tuple = ("unet",)  # any of MODELS
    targets: tuple = ()  # extra patterns, added to DEFAULT_TARGETS of each model
    lokr_factor: int = -1  # LoKr: w1 side; -1 = the most square split
    rank_dropout: float = 0.0

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ValueError(f"lora.algo={self.algo!r}: choose one of {ALGOS}")
        bad = [m for m in self.models if m not in MODELS]
        if bad:
            raise ValueError(f"lora.models: unknown {bad}; choose from {MODELS}")
        if self.rank < 1 or self.conv_rank < 1:
            raise ValueError(f"lora.rank={self.rank}, lora.conv_rank={self.conv_rank}: need >= 1")
        if not 0.0 <= self.rank_dropout < 1.0:
            raise ValueError(f"lora.rank_dropout={self.rank_dropout}: need 0 <= p < 1")
        if self.algo == "lokr" and self.conv:
            raise ValueError("lora.algo=lokr adapts Linear layers only; set lora.conv=False or "
                             "use lora.algo=lora for LoCon convolutions")


class Target(NamedTuple):
    """One adapted kernel. Static: hashable, part of the plan, never traced."""
    algo: str  # "lora" | "lokr"
    kind: str  # "linear" | "conv"
    shape: tuple  # Flax kernel shape: (in, out) or (kh, kw, in, out)
    rank: int
    alpha: float
    factors: tuple = ()  # LoKr: (a, b, c, d) with out = a·c, in = b·d

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


# Plan: {model name: {module path tuple: Target}}, sorted by path.
Plan = dict


def _factor(dim: int, factor: int) -> tuple[int, int]:
    """(m, n), m·n = dim, m <= n: m = factor when it divides dim, else the most square split
    (LyCORIS's factorization)."""
    if factor > 0 and dim % factor == 0:
        return tuple(sorted((factor, dim // factor)))
    m = max(d for d in range(1, int(math.isqrt(dim)) + 1) if dim % d == 0)
    return m, dim // m


def _target(cfg: AdapterConfig, shape: tuple) -> Target:
    if len(shape) == 2:
        kind, (cin, cout) = "linear", shape
        rank, alpha = cfg.rank, cfg.alpha
    else:
        kind, (kh, kw, cin, cout) = "conv", shape
        big = kh * kw > 1
        rank, alpha = (cfg.conv_rank, cfg.conv_alpha) if big else (cfg.rank, cfg.alpha)
    if cfg.algo == "lokr":
        a, c = _factor(cout, cfg.lokr_factor)
        b, d = _factor(cin, cfg.lokr_factor)
        rank = min(rank, c, d)
        return Target("lokr", kind, tuple(shape), rank, float(alpha), (a, b, c, d))
    fan_in = int(np.prod(shape[:-1]))
    return Target("lora", kind, tuple(shape), min(rank, fan_in, cout), float(alpha))


def make_plan(abstract_params: dict, cfg: AdapterConfig) -> Plan:
    """Targets of every model in `cfg.models`, from {name: (abstract) param tree}.

    A pattern that matches no kernel of a model it applies to is an error (a typo would
    otherwise train nothing)."""
    plan: Plan = {}
    extra_hits = {p: 0 for p in cfg.targets}
    for name in cfg.models:
        if name not in abstract_params:
            raise ValueError(f"lora.models has {name!r} but no {name} params were given")
        patterns = list(DEFAULT_TARGETS[name]) + list(cfg.targets)
        if cfg.conv and name == "unet":
            patterns += list(CONV_TARGETS)
        compiled = [re.compile(p) for p in patterns]
        targets = {}
        for path, leaf in flat_leaves(abstract_params[name]):
            if path[-1] != "kernel":
                continue
            module = "/".join(path[:-1])
            matched = [p.pattern for p in compiled if p.search(module)]
            for p in matched:
                if p in extra_hits:
                    extra_hits[p] += 1
            if matched:
                targets[path[:-1]] = _target(cfg, tuple(leaf.shape))
        if not targets:
            raise ValueError(f"lora: no kernel of {name} matches {patterns}")
        _refuse_lokr_kxk(name, targets)
        plan[name] = dict(sorted(targets.items()))
    unused = [p for p, n in extra_hits.items() if n == 0]
    if unused:
        raise ValueError(f"lora.targets {unused} match no kernel of {list(cfg.models)}; module "
                         "paths look like down_blocks_1/attentions_0/proj_in or "
                         "text_model/encoder/layers/0/mlp/fc1")
    return plan


def _refuse_lokr_kxk(name: str, targets: dict) -> None:
    """LyCORIS's conv LoKr keeps the kernel's k×k positions in its factors; ours is the 2-D
    Kronecker product, which would add one ΔW at every position and which other tools refuse
    (ComfyUI: "shape '[320, 4, 3, 3]' is invalid for input of size 1280"). 1×1 convs are fine."""
    kxk = ["/".join(p) for p, t in targets.items()
           if t.algo == "lokr" and t.kind == "conv" and t.shape[0] * t.shape[1] > 1]
    if kxk:
        kh, kw = targets[tuple(kxk[0].split("/"))].shape[:2]
        raise ValueError(f"lora.algo=lokr adapts Linear and 1×1 conv layers, but lora.targets reach "
                         f"{len(kxk)} k×k conv(s) of {name}, e.g. {kxk[0]} ({kh}×{kw}); narrow "
                         "lora.targets or use lora.algo=lora (LoCon) for them")


def adapter_shapes(t: Target) -> dict[str, tuple]:
    """Leaf name -> shape (PyTorch orientation, as stored in the kohya file)."""
    if t.algo == "lokr":
        a, b, c, d = t.factors
        return {"lokr_w1": (a, b), "lokr_w2_a": (c, t.rank), "lokr_w2_b": (t.rank, d)}
    if t.kind == "linear":
        cin, cout = t.shape
        return {"lora_down": (t.rank, cin), "lora_up": (cout, t.rank)}
    kh, kw, cin, cout = t.shape
    return {"lora_down": (t.rank, cin, kh, kw), "lora_up": (cout, t.rank, 1, 1)}


def abstract_adapters(plan: Plan, dtype=jnp.float32) -> dict:
    """Adapter tree of ShapeDtypeStruct (for AOT compiles and the memory report)."""
    return {name: unflatten([(path + (leaf,), jax.ShapeDtypeStruct(shape, dtype))
                             for path, t in targets.items()
                             for leaf, shape in adapter_shapes(t).items()])
            for name, targets in plan.items()}


def _init_leaf(seed: int, name: str, path: tuple, leaf: str, shape: tuple) -> np.ndarray:
    # kaiming-uniform with a=√5 like torch.nn.Linear / kohya: U(±1/√fan_in); "up" factors zero
    if leaf in ("lora_up", "lokr_w2_b"):
        return np.zeros(shape, np.float32)
    fan_in = int(np.prod(shape[1:]))
    gen = np.random.default_rng(np.random.SeedSequence(
        [seed & 0xFFFFFFFF, zlib.crc32("/".join((name,) + path + (leaf,)).encode())]))
    bound = 1.0 / math.sqrt(fan_in)
    return gen.uniform(-bound, bound, shape).astype(np.float32)


def init_adapters(plan: Plan, seed: int = 0, out_shardings=None) -> dict:
    """Float32 adapter params (ΔW = 0 at init), drawn per leaf on the host like
    `models.build.init_params` (seeded by path: independent of the other leaves); placed by
    `out_shardings` (a matching pytree or one sharding) when given."""
    tree = {name: unflatten([(path + (leaf,), _init_leaf(seed, name, path, leaf, shape))
                             for path, t in targets.items()
                             for leaf, shape in adapter_shapes(t).items()])
            for name, targets in plan.items()}
    if out_shardings is None:
        return jax.tree.map(jnp.asarray, tree)
    if isinstance(out_shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.device_put(x, out_shardings), tree)
    return jax.tree.map(jax.device_put, tree, out_shardings)


def _get(tree: dict, path: tuple):
    for p in path:
        tree = tree[p]
    return tree


def delta_torch(t: Target, p: dict, xp=jnp, mask=None):
    """ΔW (without the user's scale) in PyTorch orientation (out, in[, kh, kw]), float32.
    `xp` is jnp (traced, in the step) or np (float64 references, merges on the host); `mask`
    (rank,) multiplies the rank components (rank dropout)."""
    f32 = xp.float64 if xp is np else xp.float32
    if t.algo == "lokr":
        w2_a = p["lokr_w2_a"].astype(f32)
        if mask is not None:
            w2_a = w2_a * mask
        w2 = w2_a @ p["lokr_w2_b"].astype(f32)
        return t.scale * xp.kron(p["lokr_w1"].astype(f32), w2)
    down = p["lora_down"].astype(f32)
    up = p["lora_up"].astype(f32).reshape(p["lora_up"].shape[0], t.rank)
    if mask is not None:
        up = up * mask
    d = t.scale * (up @ down.reshape(t.rank, -1))
    return d.reshape((up.shape[0],) + tuple(down.shape[1:]))


def delta_flax(t: Target, p: dict, xp=jnp, mask=None):
    """ΔW in the Flax kernel layout: Dense (in, out), Conv (kh, kw, in, out)."""
    d = delta_torch(t, p, xp, mask)
    return xp.transpose(d, (2, 3, 1, 0)) if d.ndim == 4 else d.T


def rank_masks(plan: Plan, rng=None, rank_dropout: float = 0.0) -> dict:
    """{name: {path: (rank,) float32 mask or None}}: rank dropout's keep mask of each target,
    rescaled by 1/(1-p), one draw per target per `rng` (None everywhere when p = 0)."""
    if rank_dropout > 0.0 and rng is None:
        raise ValueError("rank_dropout > 0 needs an rng")

    def mask(name, i, t):
        if rank_dropout <= 0.0:
            return None
        key = jax.random.fold_in(jax.random.fold_in(rng, MODELS.index(name)), i)
        keep = jax.random.bernoulli(key, 1.0 - rank_dropout, (t.rank,))
        return keep.astype(jnp.float32) / (1.0 - rank_dropout)
    return {name: {path: mask(name, i, t) for i, (path, t) in enumerate(targets.items())}
            for name, targets in plan.items()}


def _merge(base: dict, adapters: dict, plan: Plan, scale, masks: dict) -> dict:
    out = dict(base)
    for name, targets in plan.items():
        kernels = {path[:-1]: x for path, x in flat_leaves(base[name]) if path[-1] == "kernel"}
        new = {}
        for path, t in targets.items():
            w = kernels[path]
            d = delta_flax(t, _get(adapters[name], path), jnp, masks[name][path])
            new[path + ("kernel",)] = (w.astype(jnp.float32) + scale * d).astype(w.dtype)
        out[name] = unflatten([(path, new.get(path, x)) for path, x in flat_leaves(base[name])])
    return out


def apply_adapters(base: dict, adapters: dict, plan: Plan, scale=1.0, *, rng=None,
                   rank_dropout: float = 0.0) -> dict:
    """{name: params} with each targeted kernel W replaced by (W_f32 + scale·ΔW) cast back to
    W's dtype (what the module would cast it to anyway). Models without adapters pass through.

    Traced (the step's LoKr targets, previews and validation) or eager. `rng` and
    `rank_dropout` > 0: rank dropout (training only).
    """
    return _merge(base, adapters, plan, scale, rank_masks(plan, rng, rank_dropout))


def _down_kernel(t: Target, down):
    """lora_down (r, in) | (r, in, kh, kw) as the Flax kernel of the layer with r outputs."""
    return jnp.transpose(down, (2, 3, 1, 0)) if t.kind == "conv" else down.T


def lora_branch(module, t: Target, p: dict, x, dtype, scale=1.0, mask=None):
    """scale·(α/r)·up(down(x)) for one call of the nn.Dense / nn.Conv `module` on x, in `dtype`
    (the dtype of module(x), its compute dtype; the adapter params are cast to it, as kohya
    runs them).

    down is `module` itself with r outputs, no bias and kernel lora_down (a k×k conv keeps its
    strides, padding and dilation); up is lora_up applied to the r channels (a 1×1 conv). The
    scale and the rank-dropout `mask` multiply the r-dim activation in float32."""
    down = module.clone(parent=None, name=None, features=t.rank, use_bias=False)
    h = down.apply({"params": {"kernel": _down_kernel(t, p["lora_down"]).astype(dtype)}}, x)
    c = jnp.float32(scale * t.scale) if mask is None else scale * t.scale * mask
    h = (h.astype(jnp.float32) * c).astype(dtype)
    up = p["lora_up"].reshape(p["lora_up"].shape[0], t.rank).astype(dtype)
    return h @ up.T


def lora_interceptor(targets: dict, adapters: dict, scale=1.0, masks: dict | None = None):
    """A `flax.linen.intercept_methods` interceptor for one model: every `__call__` of a module
    whose path is a LoRA target of `targets` ({path: Target}, one model of a plan) returns
    module(x) + lora_branch(x), from the (traced) adapter tree `adapters` of that model.
    Works under nn.remat (the branch is recomputed with its block) and in any Flax model:
    the nn.Dense and nn.Conv layers of the UNet and of the CLIP text towers."""
    masks = masks or {}

    def intercept(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        if context.method_name != "__call__":
            return y
        path = context.module.path
        t = targets.get(path)
        if t is None or t.algo != "lora":
            return y
        return y + lora_branch(context.module, t, _get(adapters, path), args[0], y.dtype,
                               scale, masks.get(path))
    return intercept


class Intercepted:
    """`module` (a Flax module) whose `apply` runs under flax.linen.intercept_methods(
    `interceptor`); every other attribute is the module's."""

    def __init__(self, module, interceptor):
        self.module, self.interceptor = module, interceptor

    def apply(self, *args, **kwargs):
        with nn.intercept_methods(self.interceptor):
            return self.module.apply(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.module, name)


def adapt(base: dict, adapters: dict, plan: Plan, scale=1.0, *, rng=None,
          rank_dropout: float = 0.0) -> tuple[dict, dict]:
    """What the train step runs on: (params, {name: interceptor}). LoRA / LoCon targets are
    factorised (`lora_interceptor`: the params keep the frozen kernels), LoKr targets merged
    into the params (`apply_adapters`). Wrap each model with an interceptor in `Intercepted`.
    Both forms draw the same rank-dropout masks (`rank_masks` of the whole plan)."""
    masks = rank_masks(plan, rng, rank_dropout)

    def part(factorised):
        return {name: sub for name, targets in plan.items()
                if (sub := {p: t for p, t in targets.items() if (t.algo == "lora") == factorised})}
    params = _merge(base, adapters, part(False), scale, masks)
    return params, {name: lora_interceptor(targets, adapters[name], scale, masks[name])
                    for name, targets in part(True).items()}


def merge_params(base: dict, adapters: dict, plan: Plan, scale=1.0) -> dict:
    """Host-side merge for exports and sampling: numpy W + scale·ΔW in float32, then cast to
    W's dtype (METHODS §14). Models without adapters are returned as given."""
    out = dict(base)
    for name, targets in plan.items():
        new = {}
        for path, x in flat_leaves(base[name]):
            t = targets.get(path[:-1]) if path[-1] == "kernel" else None
            if t is None:
                new[path] = x
                continue
            host = {k: np.asarray(jax.device_get(v), np.float32)
                    for k, v in _get(adapters[name], path[:-1]).items()}
            w = np.asarray(jax.device_get(x))
            d = delta_flax(t, host, _F32, None)
            new[path] = (w.astype(np.float32) + np.float32(scale) * d).astype(w.dtype)
        out[name] = unflatten(list(new.items()))
    return out


class _NumpyF32:
    """numpy with float32 as the working precision (delta_torch picks float64 for plain np)."""
    float32 = np.float32
    kron = staticmethod(np.kron)
    transpose = staticmethod(np.transpose)


_F32 = _NumpyF32()

