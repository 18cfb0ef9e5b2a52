"""Gradient checkpointing (remat) and attention variants of the SDXL UNet, chosen by config.

`model.remat`:
- "none": the plain diffusers FlaxUNet2DConditionModel.
- "blocks": every resnet block and every transformer layer of the UNet runs under `nn.remat`
  with no saved intermediates (the units diffusers' PyTorch gradient checkpointing uses), so
  the backward pass keeps only their inputs and recomputes their insides (~1 extra forward of
  compute; activation memory ≈ one layer's insides plus the layer inputs).
- "dots": the whole UNet forward runs under one `nn.remat` with the policy
  `dots_with_no_batch_dims_saveable`: outputs of the linear layers (q/k/v/out projections, FFN,
  proj_in/out) are kept, convolutions, norms, activations and the attention matrices are
  recomputed.

Either way the parameter tree is IDENTICAL to the plain model (same names, same nesting), so
checkpoints and converted SDXL weights load unchanged: Flax's lifted `nn.remat` adds no scope
level, and the rematerialised classes are subclasses of diffusers' own, built with the same
fields under the same attribute names.

`model.ff_chunks` (N > 1): every transformer layer's feed-forward (GEGLU, 4× the width: the
largest activations of SDXL's 32×32 levels) runs over N token chunks in an `nn.scan` whose body is
checkpointed, so its backward holds one chunk's intermediates instead of the whole layer's
(same parameters; a token count N does not divide runs unchunked). Measured on the SDXL step at
1024², FSDP-8, per-device batch 2: README / docs/memory.md.

`model.attention`: "standard" / "memory_efficient" are passed to diffusers' modules as
`use_memory_efficient_attention` (chunked attention, arXiv 2112.05682), `model.split_head_dim`
as `split_head_dim`; "dot_product" / "splash" / "auto" swap every FlaxAttention of the
transformer layers for a subclass running a fused kernel (`models.attention`), by the same
setup-interception plan as "blocks", so they combine with every remat mode and keep the tree.
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax

from sdxl_jax.models import attention as attention_kernels
from sdxl_jax.models import build, hf, presets

REMAT_MODES = ("none", "blocks", "dots")
ATTENTION_MODES = attention_kernels.ATTENTION_MODES  # diffusers' two, the kernels, "auto"

_POLICIES = {
    "blocks": None,  # jax.checkpoint's default: save nothing inside the checkpointed module
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# What a plan does to the module assigned to one attribute of diffusers' module tree: run it
# under nn.remat (`checkpoint`), swap its FlaxAttention product for a fused kernel (`kernel`),
# and/or apply a nested plan to its own children (`plan`: (attribute, Rule) pairs).
@dataclasses.dataclass(frozen=True)
class Rule:
    checkpoint: bool = False
    kernel: str = ""
    plan: tuple = ()
    ff_chunks: int = 0  # > 1: run a FlaxFeedForward over this many token chunks


# "blocks" checkpoints each resnet and each transformer layer, the units of diffusers' PyTorch
# gradient checkpointing: a whole UNet block is too coarse for SDXL, whose first up block alone
# holds 30 transformer layers at 1024 tokens (checkpointing whole blocks left the peak at
# ~43 GiB per device on 8-way FSDP at 1024²). A kernel replaces attn1 (self) and attn2 (cross)
# of every transformer layer (FlaxBasicTransformerBlock).
def unet_plan(remat: str, kernel: str = "", ff_chunks: int = 1) -> tuple:
    """The plan of the UNet for a remat mode ("dots" is applied to the whole UNet instead), an
    attention kernel ("" = diffusers' own attention) and a feed-forward chunk count; () when
    nothing is swapped."""
    blocks = remat == "blocks"
    layer = tuple((name, Rule(kernel=kernel)) for name in ("attn1", "attn2")) if kernel else ()
    if ff_chunks > 1:
        layer += (("ff", Rule(ff_chunks=ff_chunks)),)
    if not (blocks or layer):
        return ()
    layers = (("transformer_blocks", Rule(checkpoint=blocks, plan=layer)),)  # FlaxTransformer2DModel
    block = ((("resnets", Rule(checkpoint=True)),) if blocks else ()) + (
        ("attentions", Rule(plan=layers)),)  # down / mid / up blocks
    return tuple((name, Rule(plan=block)) for name in ("down_blocks", "mid_block", "up_blocks"))


@functools.lru_cache(maxsize=None)
def chunked_feed_forward_class(base: type, chunks: int) -> type:
    """A subclass of diffusers' FlaxFeedForward `base` that runs over `chunks` token chunks.

    The chunks go through a Flax `nn.scan` (parameters broadcast, not stacked: the same tree)
    whose body is checkpointed, so the backward recomputes one chunk's GEGLU intermediates at a
    time; in the forward they live one chunk at a time as well. Tokens are independent in a
    feed-forward, so the result is the unchunked one up to summation order."""

    def __call__(self, hidden_states, deterministic=True):
        b, length, d = hidden_states.shape
        if length % chunks:
            return base.__call__(self, hidden_states, deterministic)
        xs = hidden_states.reshape(b, chunks, length // chunks, d).swapaxes(0, 1)

        def body(module, carry, x):
            return carry, base.__call__(module, x, deterministic)
        scan = nn.scan(nn.remat(body), variable_broadcast="params",
                       split_rngs={"params": False, "dropout": True}, length=chunks)
        _, ys = scan(self, None, xs)
        return ys.swapaxes(0, 1).reshape(b, length, d)

    return type(f"Chunked{base.__name__}", (base,), {
        "__call__": __call__, "__doc__": f"{base.__name__} over {chunks} token chunks; same parameters."})


def _is_static(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


@functools.lru_cache(maxsize=None)
def checkpointed_class(base: type, mode: str) -> type:
    """A subclass of the Flax module class `base` whose `__call__` runs under `nn.remat`.

    Python-scalar keyword arguments (`deterministic=`, `train=`, `return_dict=`) are passed
    as one static argument: they drive Python control flow inside diffusers' modules and must
    not become tracers. Everything else (arrays and pytrees of arrays) is traced. Cached per
    (base, mode), so every module of one class shares one subclass.
    """
    policy = _POLICIES[mode]

    def call(self, *args, **kwargs):
        static = tuple(sorted((k, v) for k, v in kwargs.items() if _is_static(v)))
        dynamic = {k: v for k, v in kwargs.items() if not _is_static(v)}
        return self._checkpointed_call(static, args, dynamic)

    @functools.partial(nn.remat, static_argnums=(1,), policy=policy)  # 0 is self
    def _checkpointed_call(self, static, args, dynamic):
        return base.__call__(self, *args, **dict(static), **dynamic)

    return type(f"Remat{base.__name__}", (base,), {
        "__call__": call, "_checkpointed_call": _checkpointed_call,
        "__doc__": f"{base.__name__} under nn.remat (mode {mode!r}); same parameters."})


@functools.lru_cache(maxsize=None)
def planned_class(base: type, plan: tuple) -> type:
    """A subclass of `base` whose setup swaps the submodules named in `plan` (see unet_plan).

    diffusers' setups build submodules and assign them (singly or as lists) to attributes;
    Flax names a submodule when it is assigned, so intercepting exactly those assignments
    swaps the class of each submodule while its attribute name, and so every parameter path,
    stays what the plain model has. The swapped classes subclass the originals, so diffusers'
    `isinstance` dispatch (e.g. in the UNet's __call__) is unchanged.
    """
    rules = dict(plan)

    def __setattr__(self, name, value):
        rule = rules.get(name)
        if rule is not None and self._state.in_setup and value is not None:
            value = ([_swap(m, rule) for m in value] if isinstance(value, (list, tuple))
                     else _swap(value, rule))
        base.__setattr__(self, name, value)

    return type(f"Planned{base.__name__}", (base,), {"__setattr__": __setattr__})


def _swap(module: nn.Module, rule: Rule) -> nn.Module:
    """The same module (same fields, same parent) as an instance of the class `rule` names."""
    cls = type(module)
    if rule.kernel:
        cls = attention_kernels.kernel_class(cls, rule.kernel)
    if rule.ff_chunks > 1:
        cls = chunked_feed_forward_class(cls, rule.ff_chunks)
    if rule.plan:
        cls = planned_class(cls, rule.plan)
    if rule.checkpoint:
        cls = checkpointed_class(cls, "blocks")
    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
              if f.init and f.name not in ("parent", "name")}
    return cls(parent=module.parent, **fields)


def _register_config(cls: type) -> type:
    # diffusers' config registration wraps only the decorated class's own __init__; the UNet's
    # setup reads self.config, so every UNet subclass needs it too
    from diffusers.configuration_utils import flax_register_to_config
    return flax_register_to_config(cls)


@functools.lru_cache(maxsize=None)
def unet_class(remat: str, kernel: str = "", ff_chunks: int = 1) -> type:
    """The UNet module class for a `model.remat` value, an attention kernel
    (`attention.KERNELS` name; "" = diffusers' own attention) and `model.ff_chunks`."""
    if remat not in REMAT_MODES:
        raise ValueError(f"model.remat={remat!r}: must be one of {REMAT_MODES}")
    cls = hf.FlaxUNet2DConditionModel
    plan = unet_plan(remat, kernel, ff_chunks)
    if plan:
        cls = planned_class(cls, plan)
    if remat == "dots":
        cls = checkpointed_class(cls, "dots")
    return cls if cls is hf.FlaxUNet2DConditionModel else _register_config(cls)


def build_unet_variant(preset: str | dict, dtype="bfloat16", *, remat: str = "none",
                       attention: str = "standard", split_head_dim: bool = False, ff_chunks: int = 1):
    """The SDXL UNet of `preset` (a preset name, or FlaxUNet2DConditionModel kwargs such as
    `presets.unet_config` returns) with a remat mode and attention options. The parameters are
    those of `build.build_unet(preset, dtype)` for every choice. "auto" attention is resolved
    for the backend of this process (`attention.resolve`)."""
    if remat not in REMAT_MODES:  # before resolving attention: one bad key at a time, this first
        raise ValueError(f"model.remat={remat!r}: must be one of {REMAT_MODES}")
    mode = attention_kernels.resolve(attention)
    if mode == "memory_efficient" and split_head_dim:
        # diffusers' chunked attention transposes 3-D (batch·heads, L, d) states; with
        # split_head_dim they are 4-D and its FlaxAttention fails deep inside tracing.
        raise ValueError("model.attention='memory_efficient' cannot be combined with "
                         "model.split_head_dim=True (diffusers' chunked attention needs the "
                         "heads folded into the batch); set one of them back")
    sizes = presets.unet_config(preset) if isinstance(preset, str) else dict(preset)
    kernel = mode if mode in attention_kernels.KERNEL_MODES else ""
    if not isinstance(ff_chunks, int) or ff_chunks < 1:
        raise ValueError(f"model.ff_chunks={ff_chunks!r}: must be an integer ≥ 1 (1 = unchunked)")
    return unet_class(remat, kernel, ff_chunks)(
        **sizes, dtype=build._dtype(dtype),
        use_memory_efficient_attention=mode == "memory_efficient",
        split_head_dim=bool(split_head_dim))


def build_unet_from_config(cfg):
    """The UNet described by `cfg.model` (preset, dtype, remat, attention, split_head_dim,
    ff_chunks)."""
    m = cfg.model
    return build_unet_variant(m.preset, m.dtype, remat=m.remat, attention=m.attention,
                              split_head_dim=m.split_head_dim, ff_chunks=int(m.get("ff_chunks", 1)))
