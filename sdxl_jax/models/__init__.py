"""SDXL models: diffusers' Flax UNet / VAE and transformers' Flax CLIP, presets, tokenizers.

Names are resolved lazily (PEP 562): `import sdxl_jax.models` is cheap, diffusers and
transformers are imported (through `sdxl_jax.models.hf`, with its log filters and
PyTorch-parity patches) only when a model class or builder is first used. That lets a CLI call
`block_torch()` before anything imports torch:

    from sdxl_jax.models import block_torch; block_torch()
"""
import importlib

_EXPORTS = {
    "sdxl_jax.models.hf": (
        "CLIPTextConfig", "CLIPTokenizer", "FlaxAutoencoderKL", "FlaxCLIPTextModel",
        "FlaxCLIPTextModelWithProjection", "FlaxUNet2DConditionModel", "block_torch"),
    "sdxl_jax.models.presets": (
        "PRESETS", "text_g_config", "text_l_config", "unet_config", "vae_config"),
    "sdxl_jax.models.build": (
        "MODEL_NAMES", "abstract_params", "build_text_encoders", "build_unet", "build_vae",
        "count_params", "init_params"),
    "sdxl_jax.models.tokenizer": ("CHUNK_TOKENS", "SEQ_LEN", "get_tokenizers", "tokenize"),
    "sdxl_jax.models.text": ("encode_text",),
    "sdxl_jax.models.vae": ("vae_decode", "vae_encode"),
    "sdxl_jax.models.unet": ("unet_apply",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
