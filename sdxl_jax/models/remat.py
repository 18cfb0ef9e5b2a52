"""Gradient checkpointing (remat) and attention variants of the SDXL UNet, chosen by config.

`model.remat`:
- "none": the plain diffusers FlaxUNet2DConditionModel.
- "blocks": every down / mid / up block of the UNet runs under `nn.remat` with no saved
  intermediates, so the backward pass keeps only block inputs and recomputes each block's
  insides (~1 extra forward of compute; activation memory ≈ one block instead of the whole net).
- "dots": the whole UNet forward runs under one `nn.remat` with the policy
  `dots_with_no_batch_dims_saveable`: outputs of the linear layers (q/k/v/out projections, FFN,
  proj_in/out) are kept, convolutions, norms, activations and the attention matrices are
  recomputed.

Either way the parameter tree is IDENTICAL to the plain model (same names, same nesting), so
checkpoints and converted SDXL weights load unchanged: Flax's lifted `nn.remat` adds no scope
level, and the rematerialised classes are subclasses of diffusers' own, built with the same
fields under the same attribute names.

`model.attention` / `model.split_head_dim` are passed to diffusers' modules as
`use_memory_efficient_attention` (chunked attention, arXiv 2112.05682) / `split_head_dim`.
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax

from sdxl_jax.models import build, hf, presets

REMAT_MODES = ("none", "blocks", "dots")
ATTENTION_MODES = ("standard", "memory_efficient")

# The UNet attributes holding its blocks (diffusers' FlaxUNet2DConditionModel.setup).
_BLOCK_ATTRS = ("down_blocks", "mid_block", "up_blocks")
_POLICIES = {
    "blocks": None,  # jax.checkpoint default: save nothing inside the block
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _is_static(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


@functools.lru_cache(maxsize=None)
def checkpointed_class(base: type, mode: str) -> type:
    """A subclass of the Flax module class `base` whose `__call__` runs under `nn.remat`.

    Python-scalar keyword arguments (`deterministic=`, `train=`, `return_dict=`) are passed
    as one static argument: they drive Python control flow inside diffusers' modules and must
    not become tracers. Everything else (arrays and pytrees of arrays) is traced. Cached per
    (base, mode), so every block of one class shares one subclass.
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


def _rebuild(module: nn.Module, mode: str) -> nn.Module:
    """The same block (same fields, same parent) as an instance of its checkpointed class."""
    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
              if f.init and f.name not in ("parent", "name")}
    return checkpointed_class(type(module), mode)(parent=module.parent, **fields)


def _block_remat_unet_class() -> type:
    """FlaxUNet2DConditionModel whose blocks are swapped for checkpointed ones during setup.

    diffusers' setup builds the blocks and assigns them to `self.down_blocks` / `mid_block` /
    `up_blocks`; intercepting exactly those assignments (Flax names submodules at assignment)
    swaps the class of each block while its attribute name, and so every parameter path, stays
    what the plain model has. The swapped classes subclass the originals, so the UNet's
    `isinstance` dispatch in `__call__` is unchanged.
    """
    base = hf.FlaxUNet2DConditionModel

    def __setattr__(self, name, value):
        if name in _BLOCK_ATTRS and self._state.in_setup and value is not None:
            value = ([_rebuild(b, "blocks") for b in value] if isinstance(value, (list, tuple))
                     else _rebuild(value, "blocks"))
        base.__setattr__(self, name, value)

    cls = type("BlockRematFlaxUNet2DConditionModel", (base,), {"__setattr__": __setattr__})
    # diffusers' config registration wraps only the decorated class's own __init__
    return _register_config(cls)


def _register_config(cls: type) -> type:
    from diffusers.configuration_utils import flax_register_to_config
    return flax_register_to_config(cls)


@functools.lru_cache(maxsize=None)
def unet_class(remat: str) -> type:
    """The UNet module class for a `model.remat` value."""
    if remat not in REMAT_MODES:
        raise ValueError(f"model.remat={remat!r}: must be one of {REMAT_MODES}")
    if remat == "none":
        return hf.FlaxUNet2DConditionModel
    if remat == "blocks":
        return _block_remat_unet_class()
    return _register_config(checkpointed_class(hf.FlaxUNet2DConditionModel, "dots"))


def build_unet_variant(preset: str | dict, dtype="bfloat16", *, remat: str = "none",
                       attention: str = "standard", split_head_dim: bool = False):
    """The SDXL UNet of `preset` (a preset name, or FlaxUNet2DConditionModel kwargs such as
    `presets.unet_config` returns) with a remat mode and attention options. The parameters are
    those of `build.build_unet(preset, dtype)` for every choice."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"model.attention={attention!r}: must be one of {ATTENTION_MODES}")
    if attention == "memory_efficient" and split_head_dim:
        # diffusers' chunked attention transposes 3-D (batch·heads, L, d) states; with
        # split_head_dim they are 4-D and its FlaxAttention fails deep inside tracing.
        raise ValueError("model.attention='memory_efficient' cannot be combined with "
                         "model.split_head_dim=True (diffusers' chunked attention needs the "
                         "heads folded into the batch); set one of them back")
    sizes = presets.unet_config(preset) if isinstance(preset, str) else dict(preset)
    return unet_class(remat)(
        **sizes, dtype=build._dtype(dtype),
        use_memory_efficient_attention=attention == "memory_efficient",
        split_head_dim=bool(split_head_dim))


def build_unet_from_config(cfg):
    """The UNet described by `cfg.model` (preset, dtype, remat, attention, split_head_dim)."""
    m = cfg.model
    return build_unet_variant(m.preset, m.dtype, remat=m.remat, attention=m.attention,
                              split_head_dim=m.split_head_dim)
