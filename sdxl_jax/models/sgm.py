"""The original (Stability "SGM" / generative-models) single-file SDXL layout.

One .safetensors holds the four models under fixed prefixes (what ComfyUI, A1111 and Forge
load): `model.diffusion_model.` (UNet, LDM block numbering), `first_stage_model.` (VAE, LDM
names), `conditioner.embedders.0.transformer.` (CLIP-L: the transformers CLIPTextModel state
dict as is) and `conditioner.embedders.1.model.` (OpenCLIP bigG: fused q/k/v `in_proj_*`,
`text_projection` stored as the (width, proj) matrix that multiplies from the right, i.e. the
transpose of a Linear weight).

Here the mapping is stated against the PyTorch diffusers / transformers state dict (see
convert.py for the Flax side), generated from the model configs so it holds for every preset:
- UNet: diffusers `down_blocks.i.resnets.j` is LDM `input_blocks.k.0` with k counting
  1 + (layers + downsampler) per level; attentions sit at `.1`; downsamplers at
  `input_blocks.k.0.op`; up blocks likewise on `output_blocks` with layers+1 entries per level
  and the upsampler after the last one's attention. Resnet inner names differ (norm1 ->
  in_layers.0, conv1 -> in_layers.2, time_emb_proj -> emb_layers.1, norm2 -> out_layers.0,
  conv2 -> out_layers.3, conv_shortcut -> skip_connection); transformer blocks are identical.
- VAE: `down_blocks.i.resnets.j` -> `down.i.block.j`, decoder `up_blocks.i` -> `up.(n-1-i)`
  (LDM counts decoder levels from the bottom), mid `resnets.0/1` -> `mid.block_1/2`,
  `attentions.0` -> `mid.attn_1` whose q/k/v/proj_out are 1x1 convolutions, not Linears.
Real SDXL files also carry two buffers that no model here reads: CLIP-L's `position_ids`
(int64 arange, the transformers <4.31 persistent buffer) and bigG's `logit_scale`; they are
written for fidelity (SDXL base has 2515 tensors) and tolerated but not required on load.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from sdxl_jax.models import presets
from sdxl_jax.models.safetensors_io import WeightsError

PREFIX = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_l": "conditioner.embedders.0.transformer.",
    "text_g": "conditioner.embedders.1.model.",
}
# Buffers of the original checkpoint that carry no parameters of our models.
POSITION_IDS = PREFIX["text_l"] + "text_model.embeddings.position_ids"
LOGIT_SCALE = PREFIX["text_g"] + "logit_scale"
OPTIONAL_KEYS = {"text_l": (POSITION_IDS,), "text_g": (LOGIT_SCALE,)}
# Marker tensors ComfyUI / Forge test for by name: v-prediction and zero terminal SNR.
V_PRED_KEY, ZTSNR_KEY = "v_pred", "ztsnr"

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3",
                "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                  "to_out.0": "proj_out"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                   "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}


class SgmTensor(NamedTuple):
    """One tensor of the single file, made of one or more PyTorch diffusers tensors."""
    key: str  # full single-file key
    sources: tuple  # PyTorch keys (3 for fused q/k/v, concatenated on axis 0)
    kind: str  # "same" | "conv1x1" (Linear <-> 1x1 conv) | "transpose" | "fused"


# ---- block tables ----------------------------------------------------------------------------

def _unet_blocks(cfg: dict) -> dict:
    """diffusers module prefix -> (LDM prefix, inner-name table)."""
    lpb, n = cfg["layers_per_block"], len(cfg["block_out_channels"])
    m = {"conv_in": ("input_blocks.0.0", {}), "time_embedding.linear_1": ("time_embed.0", {}),
         "time_embedding.linear_2": ("time_embed.2", {}),
         "add_embedding.linear_1": ("label_emb.0.0", {}),
         "add_embedding.linear_2": ("label_emb.0.2", {}),
         "conv_norm_out": ("out.0", {}), "conv_out": ("out.2", {}),
         "mid_block.resnets.0": ("middle_block.0", _UNET_RESNET),
         "mid_block.attentions.0": ("middle_block.1", {}),
         "mid_block.resnets.1": ("middle_block.2", _UNET_RESNET)}
    k = 1
    for i, kind in enumerate(cfg["down_block_types"]):
        for j in range(lpb):
            m[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{k}.0", _UNET_RESNET)
            if kind.startswith("CrossAttn"):
                m[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{k}.1", {})
            k += 1
        if i < n - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{k}.0.op", {})
            k += 1
    k = 0
    for i, kind in enumerate(cfg["up_block_types"]):
        attn = kind.startswith("CrossAttn")
        for j in range(lpb + 1):
            m[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{k}.0", _UNET_RESNET)
            if attn:
                m[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{k}.1", {})
            if j == lpb and i < n - 1:
                upsampler = f"output_blocks.{k}.{2 if attn else 1}.conv"
                m[f"up_blocks.{i}.upsamplers.0.conv"] = (upsampler, {})
            k += 1
    return m


def _vae_blocks(cfg: dict) -> dict:
    n, lpb = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    m = {}
    for part in ("encoder", "decoder"):
        for name in ("conv_in", "conv_out"):
            m[f"{part}.{name}"] = (f"{part}.{name}", {})
        m[f"{part}.conv_norm_out"] = (f"{part}.norm_out", {})
        m[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", _VAE_RESNET)
        m[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", _VAE_RESNET)
        m[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", _VAE_ATTENTION)
    for i in range(n):
        for j in range(lpb):
            m[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", _VAE_RESNET)
        for j in range(lpb + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{n - 1 - i}.block.{j}",
                                                       _VAE_RESNET)
        if i < n - 1:
            m[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (
                f"encoder.down.{i}.downsample.conv", {})
            m[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (
                f"decoder.up.{n - 1 - i}.upsample.conv", {})
    m["quant_conv"] = ("quant_conv", {})
    m["post_quant_conv"] = ("post_quant_conv", {})
    return m


def _rename_by_blocks(key: str, blocks: dict) -> str:
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # longest module prefix first
        hit = blocks.get(".".join(parts[:cut]))
        if hit is not None:
            prefix, inner = hit
            rest = ".".join(parts[cut:])
            for old, new in inner.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            return f"{prefix}.{rest}"
    raise WeightsError(f"no single-file name for PyTorch key {key!r}")


def _openclip_key(key: str) -> str:
    fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias",
             "text_projection.weight": "text_projection"}
    if key in fixed:
        return fixed[key]
    head = "text_model.encoder.layers."
    if not key.startswith(head):
        raise WeightsError(f"no single-file name for bigG key {key!r}")
    layer, rest = key[len(head):].split(".", 1)
    for old, new in _OPENCLIP_LAYER.items():
        if rest.startswith(old + "."):
            return f"transformer.resblocks.{layer}.{new}{rest[len(old):]}"
    raise WeightsError(f"no single-file name for bigG key {key!r}")


# ---- the plan --------------------------------------------------------------------------------

def sgm_tensors(name: str, preset: str, torch_keys) -> list[SgmTensor]:
    """Single-file tensors of component `name`, built from its PyTorch keys (in order); the
    UNet / VAE block numbering follows the preset's config."""
    prefix = PREFIX[name]
    out: list[SgmTensor] = []
    if name in ("unet", "vae"):
        blocks = (_unet_blocks(presets.unet_config(preset)) if name == "unet"
                  else _vae_blocks(presets.vae_config(preset)))
        for key in torch_keys:
            new = _rename_by_blocks(key, blocks)
            conv1x1 = name == "vae" and ".mid.attn_1." in new and new.endswith(".weight") and (
                not new.endswith("norm.weight"))
            out.append(SgmTensor(prefix + new, (key,), "conv1x1" if conv1x1 else "same"))
    elif name == "text_l":
        out = [SgmTensor(prefix + key, (key,), "same") for key in torch_keys]
    elif name == "text_g":
        fused: dict[str, list] = {}
        for key in torch_keys:
            parts = key.split(".")
            if len(parts) == 7 and parts[4] == "self_attn" and parts[5] in ("q_proj", "k_proj",
                                                                            "v_proj"):
                group = f"{prefix}transformer.resblocks.{parts[3]}.attn.in_proj_{parts[6]}"
                if group not in fused:
                    fused[group] = []
                    out.append(SgmTensor(group, (), "fused"))  # sources filled below
                fused[group].append((parts[5], key))
            else:
                kind = "transpose" if key == "text_projection.weight" else "same"
                out.append(SgmTensor(prefix + _openclip_key(key), (key,), kind))
        order = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
        for i, t in enumerate(out):
            if t.kind == "fused":
                members = sorted(fused[t.key], key=lambda pk: order[pk[0]])
                if [p for p, _ in members] != ["q_proj", "k_proj", "v_proj"]:
                    raise WeightsError(f"{t.key}: incomplete q/k/v set {[p for p, _ in members]}")
                out[i] = t._replace(sources=tuple(k for _, k in members))
    else:
        raise ValueError(f"unknown model name {name!r}")
    return out


def sgm_shape(t: SgmTensor, torch_shapes: dict) -> tuple:
    shapes = [tuple(torch_shapes[k]) for k in t.sources]
    if t.kind == "fused":
        return (sum(s[0] for s in shapes),) + shapes[0][1:]
    if t.kind == "conv1x1":
        return shapes[0] + (1, 1)
    if t.kind == "transpose":
        return shapes[0][::-1]
    return shapes[0]


def accepted_shapes(t: SgmTensor, torch_shapes: dict) -> tuple:
    """Shapes a file may store for `t`: VAE attention also as plain Linear (some converters)."""
    shape = sgm_shape(t, torch_shapes)
    return (shape, shape[:2]) if t.kind == "conv1x1" else (shape,)


def to_sgm(t: SgmTensor, arrays: list) -> np.ndarray:
    """PyTorch-layout source arrays -> the single-file tensor."""
    if t.kind == "fused":
        return np.concatenate(arrays, axis=0)
    (x,) = arrays
    if t.kind == "conv1x1":
        return x.reshape(x.shape + (1, 1))
    if t.kind == "transpose":
        return np.ascontiguousarray(x.T)
    return x


def from_sgm(t: SgmTensor, x: np.ndarray, source_index: int) -> np.ndarray:
    """The single-file tensor -> PyTorch-layout array of `t.sources[source_index]`."""
    if t.kind == "fused":
        rows = x.shape[0] // len(t.sources)
        return x[source_index * rows:(source_index + 1) * rows]
    if t.kind == "conv1x1":
        return x.reshape(x.shape[:2])
    if t.kind == "transpose":
        return np.ascontiguousarray(x.T)
    return x


def optional_tensors(name: str, torch_shapes: dict, dtype) -> dict:
    """The buffers real SDXL files carry besides parameters (see module docstring)."""
    if name == "text_l":
        positions = torch_shapes["text_model.embeddings.position_embedding.weight"][0]
        return {POSITION_IDS: np.arange(positions, dtype=np.int64)[None]}
    if name == "text_g":
        return {LOGIT_SCALE: np.asarray(math.log(100.0), dtype=dtype)}  # CLIP's clamped max
    return {}
