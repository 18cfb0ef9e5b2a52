"""Adapter files against the clients that load them.

- ComfyUI: its SDXL LoRA key mapping (comfy/lora.py model_lora_keys_unet / model_lora_keys_clip
  over comfy/utils.py unet_to_diffusers), re-implemented here from reading it, must map every
  key of a full-size SDXL export (abstract shapes: all default targets, LoCon convs, both text
  encoders) onto the layer we adapted, with that layer's shape.
- diffusers (PyTorch CPU, test-only): `load_lora_weights` of our tiny kohya and PEFT exports
  gives the UNet and text-encoder outputs of the JAX model running with the adapter.
- a zero-initialised adapter leaves the compiled UNet's output bit-identical.
"""
import numpy as np
import pytest

import jax

from sdxl_jax.adapters import (AdapterConfig, apply_adapters, export_lora, init_adapters,
                               kohya_layout, make_plan, merge_params, peft_layout,
                               torch_module_names)
from sdxl_jax.models import (build_text_encoders, build_unet, get_tokenizers, init_params,
                             presets, tokenize, unet_apply)
from sdxl_jax.models.convert import (flat_leaves, flax_to_torch, torch_key_variants, torch_leaves,
                                     torch_shapes)
from sdxl_jax.models.weights import cached_abstract_params

import torch  # noqa: E402  (test-only references, pinned in requirements.txt)
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline,  # noqa
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa

PRESET = "tiny"
TOL = 2e-5
MODELS = ("unet", "text_l", "text_g")


# ---- ComfyUI's SDXL LoRA key map, written from reading comfy/utils.py and comfy/lora.py -------

# comfy/utils.py: SGM resnet inner names -> diffusers (weights only: LoRA keys are modules)
_COMFY_RESNET = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2",
                 "skip_connection": "conv_shortcut", "in_layers.0": "norm1",
                 "out_layers.0": "norm2"}
_COMFY_ATTENTION = ("proj_in", "proj_out", "norm")
_COMFY_BLOCK = ("norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v",
                "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                "ff.net.0.proj", "ff.net.2")
_COMFY_BASIC = {"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
                "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
                "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2"}
# ComfyUI's SDXL unet_config (comfy/supported_models.py SDXL)
_COMFY_SDXL = {"num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
               "transformer_depth": [0, 0, 2, 2, 10, 10],
               "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
               "transformer_depth_middle": 10}
# comfy/lora.py LORA_CLIP_MAP: the only text-encoder modules it maps
_COMFY_CLIP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
               "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
               "self_attn.out_proj": "self_attn_out_proj"}


def comfy_unet_to_diffusers(cfg) -> dict:
    """diffusers module -> SGM module, by ComfyUI's block counting (unet_to_diffusers)."""
    m = {}
    res = list(cfg["num_res_blocks"])
    depth, depth_out = list(cfg["transformer_depth"]), list(cfg["transformer_depth_output"])
    levels = len(cfg["channel_mult"])
    for x in range(levels):
        n = 1 + (res[x] + 1) * x
        for i in range(res[x]):
            for sgm, dif in _COMFY_RESNET.items():
                m[f"down_blocks.{x}.resnets.{i}.{dif}"] = f"input_blocks.{n}.0.{sgm}"
            blocks = depth.pop(0)
            if blocks:
                for b in _COMFY_ATTENTION:
                    m[f"down_blocks.{x}.attentions.{i}.{b}"] = f"input_blocks.{n}.1.{b}"
                for t in range(blocks):
                    for b in _COMFY_BLOCK:
                        m[f"down_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}"] = (
                            f"input_blocks.{n}.1.transformer_blocks.{t}.{b}")
            n += 1
        m[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
    for b in _COMFY_ATTENTION:
        m[f"mid_block.attentions.0.{b}"] = f"middle_block.1.{b}"
    for t in range(cfg["transformer_depth_middle"]):
        for b in _COMFY_BLOCK:
            m[f"mid_block.attentions.0.transformer_blocks.{t}.{b}"] = (
                f"middle_block.1.transformer_blocks.{t}.{b}")
    for i, n in enumerate((0, 2)):
        for sgm, dif in _COMFY_RESNET.items():
            m[f"mid_block.resnets.{i}.{dif}"] = f"middle_block.{n}.{sgm}"
    res = res[::-1]
    for x in range(levels):
        n, per = (res[x] + 1) * x, res[x] + 1
        for i in range(per):
            c = 1
            for sgm, dif in _COMFY_RESNET.items():
                m[f"up_blocks.{x}.resnets.{i}.{dif}"] = f"output_blocks.{n}.0.{sgm}"
            blocks = depth_out.pop()
            if blocks:
                c += 1
                for b in _COMFY_ATTENTION:
                    m[f"up_blocks.{x}.attentions.{i}.{b}"] = f"output_blocks.{n}.1.{b}"
                for t in range(blocks):
                    for b in _COMFY_BLOCK:
                        m[f"up_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}"] = (
                            f"output_blocks.{n}.1.transformer_blocks.{t}.{b}")
            if i == per - 1:
                m[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{c}.conv"
            n += 1
    for sgm, dif in _COMFY_BASIC.items():
        m[dif] = sgm
    return m


def comfy_lora_key_map() -> dict:
    """kohya LoRA module name -> (component, diffusers / transformers module), as ComfyUI
    resolves an SDXL LoRA (its model keys are SGM `diffusion_model.*` and HF `clip_l/clip_g`)."""
    key_map = {}
    for dif, sgm in comfy_unet_to_diffusers(_COMFY_SDXL).items():
        key_map["lora_unet_" + sgm.replace(".", "_")] = ("unet", dif)
        key_map["lora_unet_" + dif.replace(".", "_")] = ("unet", dif)  # diffusers-named kohya
    for prefix, name, layers in (("lora_te1_", "text_l", 12), ("lora_te2_", "text_g", 32)):
        for b in range(layers):
            for module, lora in _COMFY_CLIP.items():
                key_map[f"{prefix}text_model_encoder_layers_{b}_{lora}"] = (
                    name, f"text_model.encoder.layers.{b}.{module}")
    return key_map


@pytest.fixture(scope="module")
def sdxl_abstract():
    return {n: cached_abstract_params(n, "sdxl") for n in MODELS}


def test_every_full_size_kohya_key_is_one_comfyui_maps(sdxl_abstract):
    key_map = comfy_lora_key_map()
    plans = {
        "default": make_plan(sdxl_abstract, AdapterConfig(rank=32, alpha=16.0, models=MODELS)),
        "locon": make_plan(sdxl_abstract, AdapterConfig(rank=32, alpha=16.0, conv=True,
                                                        conv_rank=8, conv_alpha=4.0)),
    }
    # kohya's SDXL LoRA: 722 UNet modules (70 transformer blocks × 10 + 11 × proj_in/out),
    # 72 CLIP-L + 192 bigG modules (12 / 32 layers × 6)
    assert {n: len(t) for n, t in plans["default"].items()} == {"unet": 722, "text_l": 72,
                                                                "text_g": 192}
    for label, plan in plans.items():
        layout = kohya_layout(None, plan, "sdxl")
        shapes = {n: torch_shapes(n, sdxl_abstract[n]) for n in plan}
        mapped = 0
        for spec, _ in layout:
            module, _, leaf = spec.key.partition(".")
            assert module in key_map, f"{label}: ComfyUI does not map {spec.key}"
            name, dif = key_map[module]
            weight = shapes[name][dif + ".weight"]  # the layer ComfyUI patches, PyTorch layout
            if leaf == "alpha":
                assert spec.shape == ()
                continue
            if leaf == "lora_down.weight":  # (r, in[, kh, kw])
                assert spec.shape[1:] == weight[1:], (spec.key, spec.shape, weight)
            else:  # lora_up (out, r[, 1, 1])
                assert spec.shape[0] == weight[0] and spec.shape[2:] == (1, 1)[:len(weight) - 2]
            mapped += 1
        # and the module we adapted is the one ComfyUI patches
        for name, targets in plan.items():
            ours = torch_module_names(name, {p: t.shape for p, t in targets.items()})
            kohya = {s.key.partition(".")[0] for s, _ in layout}
            theirs = {key_map[k] for k in kohya if key_map[k][0] == name}
            assert theirs == {(name, m) for m in ours.values()}, label
        assert mapped == 2 * sum(len(t) for t in plan.values())
    locon = {s.key.partition(".")[0] for s, _ in kohya_layout(None, plans["locon"], "sdxl")}
    assert "lora_unet_input_blocks_3_0_op" in locon  # downsampler, SGM name
    assert "lora_unet_output_blocks_2_2_conv" in locon  # upsampler after an attention block


# ---- tiny model: JAX with the adapter vs PyTorch diffusers with the loaded file ----------------

@pytest.fixture(scope="module")
def base():
    """Tiny params with every leaf perturbed (init leaves conv_out at 0 and biases at 0)."""
    rng = np.random.default_rng(0)
    params = {n: init_params(n, PRESET, 0) for n in MODELS}
    return jax.tree.map(lambda x: np.asarray(x) + 0.02 * rng.standard_normal(x.shape
                                                                              ).astype(np.float32),
                        params)


@pytest.fixture(scope="module")
def plan(base):
    unet = make_plan(base, AdapterConfig(rank=4, alpha=2.0, conv=True, conv_rank=3,
                                         conv_alpha=6.0))
    text = make_plan(base, AdapterConfig(rank=2, alpha=8.0, models=("text_l", "text_g")))
    return {**unet, **text}


@pytest.fixture(scope="module")
def adapters(plan):
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda x: (0.1 * rng.standard_normal(x.shape)).astype(np.float32),
                        init_adapters(plan, seed=0))


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(2)
    cfg = presets.unet_config(PRESET)
    tok_l, tok_g = get_tokenizers(PRESET)
    caps = ["a red circle, white background", "blue"]
    return {"z": rng.standard_normal((2, 16, 16, 4)).astype(np.float32),
            "t": np.array([10.0, 900.0], np.float32),
            "context": rng.standard_normal((2, 77, cfg["cross_attention_dim"])).astype(np.float32),
            "pooled": rng.standard_normal((2, presets.text_g_config(PRESET)["projection_dim"])
                                          ).astype(np.float32),
            "time_ids": np.array([[256, 256, 0, 0, 256, 256], [128, 192, 16, 8, 128, 192]],
                                 np.float32),
            "ids_l": tokenize(tok_l, caps, 1), "ids_g": tokenize(tok_g, caps, 1)}


@pytest.fixture(scope="module")
def jax_unet():
    """(plain UNet fn, UNet-with-adapters fn), each compiled once for the module."""
    unet = build_unet(PRESET, "float32")
    plain = jax.jit(lambda p, x: unet_apply(unet, p, x["z"], x["t"], x["context"], x["pooled"],
                                            x["time_ids"]))
    adapted = jax.jit(lambda p, ad, plan_unet, x: unet_apply(
        unet, apply_adapters({"unet": p}, ad, plan_unet)["unet"], x["z"], x["t"],
        x["context"], x["pooled"], x["time_ids"]), static_argnums=2)
    return plain, adapted


class _Static(dict):
    """A plan usable as a jit static argument (hashable by identity)."""
    __hash__ = object.__hash__


@pytest.fixture(scope="module")
def jax_out(base, plan, adapters, inputs, jax_unet):
    plain, adapted = jax_unet
    unet_plan = _Static(unet=plan["unet"])
    out = {"unet": np.asarray(adapted(base["unet"], {"unet": adapters["unet"]}, unet_plan,
                                      inputs)),
           "unet_base": np.asarray(plain(base["unet"], inputs)),
           "unet_zero": np.asarray(adapted(base["unet"], {"unet": init_adapters(
               {"unet": plan["unet"]}, seed=9)["unet"]}, unet_plan, inputs))}
    merged = merge_params(base, adapters, plan)
    text_l, text_g = build_text_encoders(PRESET, "float32")
    positions = np.broadcast_to(np.arange(77), inputs["ids_l"].shape)
    for name, module, ids in (("text_l", text_l, inputs["ids_l"]),
                              ("text_g", text_g, inputs["ids_g"])):
        hidden = module.apply({"params": merged[name]}, ids, np.ones_like(ids),
                              positions).hidden_states
        out[name] = np.asarray(hidden[-2])
    return out


def test_zero_adapter_leaves_the_compiled_unet_bit_identical(jax_out):
    assert np.array_equal(jax_out["unet_zero"], jax_out["unet_base"])
    assert float(np.std(jax_out["unet_base"])) > 0.05
    # the random adapter of the other tests really changes the output
    assert float(np.max(np.abs(jax_out["unet"] - jax_out["unet_base"]))) > 1000 * TOL


def _torch_model(cls, config, name, params):
    model = cls(config) if not isinstance(config, dict) else cls(**config)
    keys = model.state_dict().keys()  # transformers 5's CLIPTextModel drops `text_model.`

    def key(lf):
        return next((k for k in torch_key_variants(name, lf.key) if k in keys), lf.key)
    state = {key(lf): torch.from_numpy(flax_to_torch(lf.kind, np.asarray(x)))
             for lf, (_, x) in zip(torch_leaves(name, params), flat_leaves(params))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return model.eval()


@pytest.fixture(scope="module")
def pipe(base, tmp_path_factory):
    from transformers import CLIPTokenizer
    folder = tmp_path_factory.mktemp("tokenizers")
    for tok, sub in zip(get_tokenizers(PRESET), ("tokenizer", "tokenizer_2")):
        tok.save_pretrained(str(folder / sub))
    tok_l, tok_g = (CLIPTokenizer.from_pretrained(str(folder / sub))
                    for sub in ("tokenizer", "tokenizer_2"))
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**presets.vae_config(PRESET)),
        text_encoder=_torch_model(CLIPTextModel, CLIPTextConfig(**presets.text_l_config(PRESET)),
                                  "text_l", base["text_l"]),
        text_encoder_2=_torch_model(CLIPTextModelWithProjection,
                                    CLIPTextConfig(**presets.text_g_config(PRESET)), "text_g",
                                    base["text_g"]),
        tokenizer=tok_l, tokenizer_2=tok_g,
        unet=_torch_model(UNet2DConditionModel, presets.unet_config(PRESET), "unet", base["unet"]),
        scheduler=EulerDiscreteScheduler())


def torch_out(pipe, x) -> dict:
    t = lambda a: torch.from_numpy(np.asarray(a))
    with torch.no_grad():
        unet = pipe.unet(t(x["z"]).permute(0, 3, 1, 2), t(x["t"]),
                         encoder_hidden_states=t(x["context"]),
                         added_cond_kwargs={"text_embeds": t(x["pooled"]),
                                            "time_ids": t(x["time_ids"])}).sample
        out_l = pipe.text_encoder(t(x["ids_l"]).long(), output_hidden_states=True)
        out_g = pipe.text_encoder_2(t(x["ids_g"]).long(), output_hidden_states=True)
    return {"unet": unet.permute(0, 2, 3, 1).numpy(), "text_l": out_l.hidden_states[-2].numpy(),
            "text_g": out_g.hidden_states[-2].numpy()}


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_diffusers_load_lora_weights_matches_jax(pipe, plan, adapters, inputs, jax_out, fmt,
                                                 tmp_path):
    before = torch_out(pipe, inputs)
    np.testing.assert_allclose(before["unet"], jax_out["unet_base"], atol=TOL)  # same base
    path = export_lora(str(tmp_path / f"{fmt}.safetensors"), adapters, plan, PRESET, fmt,
                       np.float32, {"title": "interop"})
    pipe.load_lora_weights(str(tmp_path), weight_name=f"{fmt}.safetensors", adapter_name=fmt)
    try:
        after = torch_out(pipe, inputs)
    finally:
        pipe.unload_lora_weights()
    for name in MODELS:
        diff = float(np.max(np.abs(after[name] - jax_out[name])))
        moved = float(np.max(np.abs(after[name] - before[name])))
        print(f"{fmt} {name}: max |torch - jax| {diff:.2e}, LoRA effect {moved:.2e}")
        assert diff <= TOL, (fmt, name, diff)
        assert moved > 100 * TOL, (fmt, name, moved)  # the file was really applied
    # every tensor of the file was consumed by a layer (a silently skipped layer would show
    # above only if it mattered enough): the key count equals what the layout enumerates
    layout = kohya_layout if fmt == "kohya" else (lambda a, p, _: peft_layout(a, p))
    assert len(layout(adapters, plan, PRESET)) == (3 if fmt == "kohya" else 2) * sum(
        len(t) for t in plan.values())
    assert path.endswith(".safetensors")
