"""The two SDXL text towers (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14) as one causal text transformer.

Configured by the `presets.text_l_config` / `text_g_config` dicts (transformers' CLIPTextConfig
field names, which export also writes). Module names follow transformers' CLIP, so the parameter
paths are the ones every converter, adapter file and checkpoint here uses:

    CLIPTextTower                    CLIPTextModel / CLIPTextModelWithProjection
      text_model                       .text_model (CLIPTextTransformer)
        embeddings/token_embedding       .embeddings.token_embedding (nn.Embedding)
        embeddings/position_embedding    .embeddings.position_embedding
        encoder/layers/<i>               .encoder.layers.<i> (CLIPEncoderLayer)
          layer_norm1, layer_norm2         .layer_norm1, .layer_norm2
          self_attn/{q,k,v,out}_proj       .self_attn.{q,k,v,out}_proj
          mlp/fc1, mlp/fc2                 .mlp.fc1, .mlp.fc2
        final_layer_norm                 .final_layer_norm
      text_projection (projection only)  .text_projection (no bias)

Pre-LayerNorm residual layers; the attention is causal (plus an optional key-padding mask),
its softmax taken in float32 whatever the compute dtype (as PyTorch's eager CLIP does). The
residual stream stays float32: embeddings are float32 and every block adds its output to it.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp


def quick_gelu(x):
    """OpenAI CLIP's activation: x·σ(1.702·x)."""
    return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN names; "gelu" there is the exact erf form.
ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}


class TextOutput(NamedTuple):
    """hidden_states: the embeddings, then every layer's output (before the final LayerNorm), so
    [-2] is the penultimate layer SDXL conditions on. pooler_output: the final-LayerNorm state
    at each sequence's EOS. text_embeds: its projection (None without `projection`)."""
    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple
    text_embeds: jax.Array | None


class _Attention(nn.Module):
    heads: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, mask):
        b, n, width = x.shape
        head_dim = width // self.heads

        def dense(name):
            return nn.Dense(width, dtype=self.dtype, name=name)

        def split(t):
            return t.reshape(b, n, self.heads, head_dim)

        q, k, v = (split(dense(f"{p}_proj")(x)) for p in ("q", "k", "v"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * head_dim ** -0.5
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, width)
        return dense("out_proj")(out)


class _MLP(nn.Module):
    hidden: int
    intermediate: int
    act: str
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.intermediate, dtype=self.dtype, name="fc1")(x)
        return nn.Dense(self.hidden, dtype=self.dtype, name="fc2")(ACTIVATIONS[self.act](x))


class _EncoderLayer(nn.Module):
    cfg: "TextConfig"
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, mask):
        c = self.cfg
        norm = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name=name)  # noqa: E731
        attn = _Attention(c.num_attention_heads, self.dtype, name="self_attn")
        x = x + attn(norm("layer_norm1")(x), mask)
        mlp = _MLP(c.hidden_size, c.intermediate_size, c.hidden_act, self.dtype, name="mlp")
        return x + mlp(norm("layer_norm2")(x))


class _Layers(nn.Module):
    """The layer list, as transformers' `encoder.layers` (children named 0, 1, …); returns the
    input and every layer's output."""
    cfg: "TextConfig"
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, mask):
        states = [x]
        for i in range(self.cfg.num_hidden_layers):
            states.append(_EncoderLayer(self.cfg, self.dtype, name=str(i))(states[-1], mask))
        return tuple(states)


class _Encoder(nn.Module):
    cfg: "TextConfig"
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, mask):
        return _Layers(self.cfg, self.dtype, name="layers")(x, mask)


class _Embeddings(nn.Module):
    vocab_size: int
    hidden_size: int
    max_positions: int

    @nn.compact
    def __call__(self, input_ids, position_ids):
        embed = lambda n, name: nn.Embed(n, self.hidden_size, name=name)  # noqa: E731
        return (embed(self.vocab_size, "token_embedding")(input_ids)
                + embed(self.max_positions, "position_embedding")(position_ids))


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The CLIPTextConfig fields a tower reads (the presets also carry bos/pad ids for export)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    hidden_act: str
    layer_norm_eps: float
    projection_dim: int
    eos_token_id: int

    @classmethod
    def of(cls, config: dict) -> "TextConfig":
        return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls)})


class _TextTransformer(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, input_ids, attention_mask, position_ids):
        c = self.cfg
        x = _Embeddings(c.vocab_size, c.hidden_size, c.max_position_embeddings,
                        name="embeddings")(input_ids, position_ids)
        n = input_ids.shape[-1]
        mask = jnp.tril(jnp.ones((n, n), bool))[None, None]
        if attention_mask is not None:  # key padding: keys whose mask is 0 are never attended
            mask = mask & (attention_mask[:, None, None, :] > 0)
        states = _Encoder(c, self.dtype, name="encoder")(x, mask)
        last = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype,
                            name="final_layer_norm")(states[-1])
        # SDXL's configs carry CLIP's legacy eos_token_id 2, with which transformers pools at the
        # highest id (<|endoftext|> is the last token of the vocabulary); else the first EOS.
        eos = (input_ids.argmax(-1) if c.eos_token_id == 2
               else (input_ids == c.eos_token_id).argmax(-1))
        pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
        return last, pooled, states


class CLIPTextTower(nn.Module):
    """A CLIP text tower; `projection=True` adds bigG's bias-free `text_projection`.

    __call__(input_ids (B, L) int, attention_mask (B, L) or None, position_ids (B, L) or None)
    → TextOutput. Compute in `dtype`, parameters float32.
    """
    cfg: TextConfig
    projection: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        if self.cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.cfg.hidden_act!r} is not one of "
                             f"{sorted(ACTIVATIONS)}")
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        last, pooled, states = _TextTransformer(self.cfg, self.dtype, name="text_model")(
            input_ids, attention_mask, jnp.asarray(position_ids, jnp.int32))
        embeds = None
        if self.projection:
            embeds = nn.Dense(self.cfg.projection_dim, use_bias=False, dtype=self.dtype,
                              name="text_projection")(pooled)
        return TextOutput(last, pooled, states, embeds)


def text_tower(config: dict, projection: bool, dtype) -> CLIPTextTower:
    """The tower of a CLIPTextConfig-style dict (`presets.text_l_config` / `text_g_config`)."""
    return CLIPTextTower(TextConfig.of(config), projection=projection, dtype=dtype)
