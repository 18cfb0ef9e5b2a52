"""Low-rank adapters (LoRA, LoCon, LoKr) for the UNet and the text encoders (METHODS §14).

lora.py: targets, init, the in-step forms (LoRA factorised, LoKr merged), host merges.
formats.py: the kohya / A1111 / ComfyUI file layout and the diffusers / PEFT one, both ways.
"""
from sdxl_jax.adapters.lora import (  # noqa: F401
    ALGOS, CONV_TARGETS, DEFAULT_TARGETS, MODELS, AdapterConfig, Intercepted, Plan, Target,
    abstract_adapters, adapt, adapter_shapes, apply_adapters, count_adapter_params, delta_flax,
    delta_torch, init_adapters, lora_branch, lora_interceptor, make_plan, merge_params,
    rank_masks)
from sdxl_jax.adapters.formats import (  # noqa: F401
    detect_layout, export_lora, kohya_layout, kohya_module_names, lora_metadata, peft_layout,
    read_lora, read_lora_init, torch_module_names)
