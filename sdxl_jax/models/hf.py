"""The one place that imports the diffusers / transformers Flax classes.

Why a module of its own:
- diffusers 0.39 and transformers 4.57 log a deprecation notice from every Flax module `setup`
  (hundreds of lines per UNet build). We drop exactly those records with a logging filter on the
  emitting loggers, leaving every other message of those libraries alone.
- Two numerical differences between the Flax ports and the PyTorch models SDXL was trained with
  are patched here, once, before any module is built (see `_apply_parity_patches`).
- `block_torch()` keeps the training CLIs from paying for a `torch` import they never use.

Checked against PyTorch (diffusers 0.39 / transformers 4.57.6 sources), beyond the two patches:
- UNet resnets GroupNorm eps 1e-5, conv_norm_out 1e-5, VAE GroupNorms 1e-6, transformer-block
  LayerNorms 1e-5: equal. Sinusoidal timestep embedding (flip_sin_to_cos, freq_shift 0): equal.
  `attention_head_dim` means "number of heads" in both (the known diffusers naming quirk).
- CLIP: activations match (Flax ACT2FN "gelu" is exact erf GELU, "quick_gelu" is x·σ(1.702x)),
  LayerNorm eps comes from the config, causal mask and pooled-EOS rule (argmax of ids when
  eos_token_id == 2, as in SDXL's configs) are the same. One remaining difference, not patched:
  with a bf16 compute dtype Flax CLIP takes the attention softmax in bf16, PyTorch's eager path
  upcasts it to fp32; this only matters at bf16 rounding level.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import types
import warnings

import flax.linen as nn
import jax.numpy as jnp
from flax.linen.module import wrap_method_once

_DEPRECATION_MARKERS = (
    "Flax classes are deprecated",
    "TensorFlow and JAX classes are deprecated",
)

# Loggers that emit the notices (module loggers: a logger's filter only sees its own records,
# not those propagated from children, so each emitting module is listed).
_NOISY_LOGGERS = (
    "diffusers",
    "diffusers.models.attention_flax",
    "diffusers.models.embeddings_flax",
    "diffusers.models.resnet_flax",
    "diffusers.models.vae_flax",
    "diffusers.models.modeling_flax_utils",
    "diffusers.models.unets.unet_2d_blocks_flax",
    "diffusers.models.unets.unet_2d_condition_flax",
    "transformers",
    "transformers.modeling_flax_utils",
    "transformers.tokenization_utils_base",
)


class DeprecationNoticeFilter(logging.Filter):
    """Drops only the Flax/JAX deprecation notices of diffusers and transformers."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(marker in message for marker in _DEPRECATION_MARKERS)


_FILTER = DeprecationNoticeFilter()


def _install_filters() -> None:
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    for package in ("diffusers", "transformers"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=package)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=package)


def _install_handler_filters() -> None:
    """Also filter on the libraries' own stderr handlers, which see every module's records."""
    for name in ("diffusers", "transformers"):
        for handler in logging.getLogger(name).handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)


def block_torch() -> None:
    """Make `import torch` fail so diffusers treats torch as unavailable (CLI entry points only).

    diffusers 0.39's `utils/distributed_utils.py` imports torch unconditionally, which costs
    seconds and GBs of RAM in a JAX-only process. Setting `sys.modules["torch"] = None` makes
    the import raise ImportError and `importlib.util.find_spec("torch")` return None. No-op if
    torch is already imported or SDXL_JAX_ALLOW_TORCH=1. Cheap: this module loads diffusers only
    when one of its model classes is first used, so call it first thing in a CLI `main`.
    """
    if os.environ.get("SDXL_JAX_ALLOW_TORCH") == "1" or "torch" in sys.modules:
        return  # allowed, already imported, or already blocked
    sys.modules["torch"] = None


_install_filters()

# PyTorch's Transformer2DModel normalises with GroupNorm(32, eps=1e-6); the Flax port uses 1e-5.
TRANSFORMER_GROUPNORM_EPS = 1e-6


def _geglu_call(self, hidden_states, deterministic=True):
    # PyTorch GEGLU: proj → split → linear * F.gelu(gate) with the EXACT erf GELU. diffusers'
    # Flax port calls nn.gelu, whose default is the tanh approximation. SDXL was trained with
    # the exact form, so use it (the tanh form shifts every transformer block's FFN slightly).
    hidden_states = self.proj(hidden_states)
    hidden_linear, hidden_gelu = jnp.split(hidden_states, 2, axis=-1)
    out = hidden_linear * nn.gelu(hidden_gelu, approximate=False)
    return self.dropout_layer(out, deterministic=deterministic)


_geglu_call.__name__ = "__call__"  # flax's method wrapper keys on the name
_geglu_call.__qualname__ = "FlaxGEGLU.__call__"


class _LinenWithTorchTransformerNorm(types.ModuleType):
    """`flax.linen` as seen from diffusers' attention_flax.py, with PyTorch's GroupNorm eps."""

    def __init__(self):
        super().__init__("flax.linen")

    def __getattr__(self, name):
        return getattr(nn, name)

    @staticmethod
    def GroupNorm(*args, **kwargs):  # noqa: N802 (mirrors the flax.linen name)
        kwargs["epsilon"] = TRANSFORMER_GROUPNORM_EPS
        return nn.GroupNorm(*args, **kwargs)


def _apply_parity_patches(attention_flax) -> None:
    """Patch the two PyTorch-parity differences of diffusers 0.39's Flax attention blocks.

    Applied once, when diffusers is first loaded through this module and before any module is
    built, so every UNet built by sdxl_jax computes what the PyTorch SDXL UNet computes
    (weights trained in PyTorch load and behave identically).
    """
    attention_flax.FlaxGEGLU.__call__ = wrap_method_once(_geglu_call)
    # FlaxTransformer2DModel.setup builds `nn.GroupNorm(num_groups=32, epsilon=1e-5)`; Flax
    # cannot re-register the "norm" submodule after the original setup, so instead the module's
    # `nn` namespace is given a GroupNorm factory that forces PyTorch's eps. In diffusers 0.39
    # that setup is the only GroupNorm in attention_flax.py, so nothing else is affected.
    attention_flax.nn = _LinenWithTorchTransformerNorm()


# Names served lazily (PEP 562), so `from sdxl_jax.models.hf import block_torch` stays cheap
# and can run before diffusers/transformers (and through them torch) are imported.
_LAZY_NAMES = (
    "CLIPTextConfig", "CLIPTokenizer", "FlaxAutoencoderKL", "FlaxCLIPTextModel",
    "FlaxCLIPTextModelWithProjection", "FlaxDiagonalGaussianDistribution",
    "FlaxUNet2DConditionModel", "attention_flax",
)
_load_lock = threading.Lock()


def load() -> None:
    """Import the diffusers/transformers Flax classes and apply the parity patches (once)."""
    if "FlaxUNet2DConditionModel" in globals():
        return
    with _load_lock:
        if "FlaxUNet2DConditionModel" in globals():
            return
        from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel
        from diffusers.models import attention_flax
        from diffusers.models.vae_flax import FlaxDiagonalGaussianDistribution
        from transformers import (CLIPTextConfig, CLIPTokenizer, FlaxCLIPTextModel,
                                  FlaxCLIPTextModelWithProjection)

        _install_handler_filters()
        _apply_parity_patches(attention_flax)
        globals().update(
            CLIPTextConfig=CLIPTextConfig, CLIPTokenizer=CLIPTokenizer,
            FlaxAutoencoderKL=FlaxAutoencoderKL, FlaxCLIPTextModel=FlaxCLIPTextModel,
            FlaxCLIPTextModelWithProjection=FlaxCLIPTextModelWithProjection,
            FlaxDiagonalGaussianDistribution=FlaxDiagonalGaussianDistribution,
            attention_flax=attention_flax,
            FlaxUNet2DConditionModel=FlaxUNet2DConditionModel)  # last: load()'s done-marker


def __getattr__(name: str):
    if name in _LAZY_NAMES:
        load()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*_LAZY_NAMES, "DeprecationNoticeFilter", "TRANSFORMER_GROUPNORM_EPS", "block_torch",
           "load"]
