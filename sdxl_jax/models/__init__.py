"""SDXL models as this project's own Flax modules: the UNet (unet.py, unet_parts.py,
transformer.py), the VAE (autoencoder.py), both CLIP text towers (clip.py); their presets,
builders, tokenizers and PyTorch-layout converters.

Names are resolved lazily (PEP 562), so `import sdxl_jax.models` stays cheap until a builder or
model function is first used.
"""
import importlib

_EXPORTS = {
    "sdxl_jax.models.presets": (
        "PRESETS", "text_g_config", "text_l_config", "unet_config", "vae_config"),
    "sdxl_jax.models.build": (
        "MODEL_NAMES", "abstract_params", "build_text_encoders", "build_unet",
        "build_unet_from_config", "build_vae", "count_params", "init_params"),
    "sdxl_jax.models.tokenizer": ("CHUNK_TOKENS", "SEQ_LEN", "get_tokenizers", "tokenize"),
    "sdxl_jax.models.text": ("encode_text",),
    "sdxl_jax.models.vae": ("vae_decode", "vae_encode"),
    "sdxl_jax.models.unet": ("UNet2DConditionModel", "unet_apply"),
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
