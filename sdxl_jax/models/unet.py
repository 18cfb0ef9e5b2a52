"""The SDXL UNet (`UNet2DConditionModel`) as this project's Flax modules, channels-last throughout.

Module tree (= parameter tree, = diffusers' PyTorch module names with "." → "_"):

    conv_in                              3×3 conv, in_channels → block_out_channels[0]
    time_embedding/linear_{1,2}          MLP of the sinusoidal timestep embedding
    add_embedding/linear_{1,2}           MLP of pooled bigG ‖ six sinusoidal micro-conditions
    down_blocks_{i}/resnets_{j}          `unet_parts.ResnetBlock`
                   /attentions_{j}       `transformer.Transformer2D` (CrossAttn* blocks)
                   /downsamplers_0/conv  all but the last level
    mid_block/resnets_{0,1}, attentions_0
    up_blocks_{i}/resnets_{j}            layers_per_block + 1, each on [x ‖ skip]
                 /attentions_{j}, upsamplers_0/conv
    conv_norm_out, conv_out

Configured by `presets.unet_config` (diffusers' UNet2DConditionModel config keys:
block_out_channels, layers_per_block, transformer_layers_per_block, attention_head_dim = heads
per level, norm_num_groups, norm_eps, act_fn, …) plus the trainer's options:
- `remat`: "none"; "blocks" runs every resnet and every transformer layer under `nn.remat`
  saving nothing inside (the units of diffusers' PyTorch gradient checkpointing; a whole UNet
  block is too coarse for SDXL, whose first up block holds 30 transformer layers at 1024
  tokens); "dots" runs the whole forward under one `nn.remat` with the policy
  `dots_with_no_batch_dims_saveable` (linear-layer outputs kept; convolutions, norms,
  activations and attention matrices recomputed).
- `attention`: a resolved `model.attention` kernel name (`attention.KERNELS`), `split_head_dim`.
- `ff_chunks`: the transformer feed-forward over that many token chunks (`transformer.FeedForward`).
None of them adds a scope level, so the parameter tree is the same for every choice.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdxl_jax.models.transformer import Transformer2D
from sdxl_jax.models.unet_parts import (Downsample, ResnetBlock, TimestepEmbedding, Upsample,
                                        activation, conv3x3, sinusoidal_embedding)

REMAT_MODES = ("none", "blocks", "dots")
_CROSS, _PLAIN = "CrossAttnDownBlock2D", "DownBlock2D"
_UP_CROSS, _UP_PLAIN = "CrossAttnUpBlock2D", "UpBlock2D"


@dataclasses.dataclass(frozen=True)
class _Options:
    """What every resnet and transformer of one UNet shares (hashable: a module field)."""
    norm_num_groups: int
    norm_eps: float
    act_fn: str
    use_linear_projection: bool
    attention: str
    split_head_dim: bool
    ff_chunks: int
    remat_blocks: bool
    dtype: jnp.dtype

    def resnet(self, channels: int, name: str) -> nn.Module:
        cls = nn.remat(ResnetBlock) if self.remat_blocks else ResnetBlock
        return cls(channels, norm_num_groups=self.norm_num_groups, norm_eps=self.norm_eps,
                   act_fn=self.act_fn, dtype=self.dtype, name=name)

    def transformer(self, channels: int, heads: int, depth: int, name: str) -> nn.Module:
        return Transformer2D(channels, heads, depth=depth, norm_num_groups=self.norm_num_groups,
                             use_linear_projection=self.use_linear_projection,
                             kernel=self.attention, split_head_dim=self.split_head_dim,
                             ff_chunks=self.ff_chunks, remat_layers=self.remat_blocks,
                             dtype=self.dtype, name=name)


class _Level(nn.Module):
    """One down or up level: resnets (each followed by a Transformer2D when `heads` > 0) and
    an optional sampler. Down levels return every output for the skips; up levels take theirs
    (`skips`, in down order) and concatenate them to the channels, last first."""
    out_channels: int
    num_layers: int
    heads: int  # 0: no attention (DownBlock2D / UpBlock2D)
    depth: int
    sampler: str  # "down" | "up" | ""
    up: bool
    opts: _Options

    @nn.compact
    def __call__(self, x, temb, context, skips=()):
        u = self.opts
        outputs = []
        for j in range(self.num_layers):
            if self.up:
                x = jnp.concatenate([x, skips[-1 - j]], axis=-1)
            x = u.resnet(self.out_channels, f"resnets_{j}")(x, temb)
            if self.heads:
                x = u.transformer(self.out_channels, self.heads, self.depth, f"attentions_{j}")(x, context)
            outputs.append(x)
        if self.sampler == "down":
            x = Downsample(self.out_channels, dtype=u.dtype, name="downsamplers_0")(x)
            outputs.append(x)
        elif self.sampler == "up":
            x = Upsample(self.out_channels, dtype=u.dtype, name="upsamplers_0")(x)
        return x, outputs


class _MidBlock(nn.Module):
    channels: int
    heads: int
    depth: int
    opts: _Options

    @nn.compact
    def __call__(self, x, temb, context):
        u = self.opts
        x = u.resnet(self.channels, "resnets_0")(x, temb)
        x = u.transformer(self.channels, self.heads, self.depth, "attentions_0")(x, context)
        return u.resnet(self.channels, "resnets_1")(x, temb)


class UNet2DConditionModel(nn.Module):
    """ε/v-prediction UNet of SDXL. `__call__(sample (B, H, W, C), timesteps (B,), context
    (B, L, cross_attention_dim), text_embeds (B, pooled), time_ids (B, 6))` → (B, H, W, out)."""
    block_out_channels: tuple = (320, 640, 1280)
    layers_per_block: int = 2
    transformer_layers_per_block: tuple = (1, 2, 10)
    attention_head_dim: tuple = (5, 10, 20)  # heads per level (diffusers' naming)
    down_block_types: tuple = (_PLAIN, _CROSS, _CROSS)
    up_block_types: tuple = (_UP_CROSS, _UP_CROSS, _UP_PLAIN)
    in_channels: int = 4
    out_channels: int = 4
    cross_attention_dim: int = 2048
    addition_embed_type: str = "text_time"
    addition_time_embed_dim: int = 256
    projection_class_embeddings_input_dim: int = 2816
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    use_linear_projection: bool = True
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    act_fn: str = "silu"
    sample_size: int = 128  # the export config's default resolution / 8; unused here
    # trainer options (see the module docstring)
    remat: str = "none"
    attention: str = "standard"
    split_head_dim: bool = False
    ff_chunks: int = 1
    dtype: jnp.dtype = jnp.float32

    def __post_init__(self):
        if self.remat not in REMAT_MODES:
            raise ValueError(f"model.remat={self.remat!r}: must be one of {REMAT_MODES}")
        levels = len(self.block_out_channels)
        if (len(self.down_block_types) != levels or len(self.up_block_types) != levels
                or set(self.down_block_types) - {_CROSS, _PLAIN}
                or set(self.up_block_types) - {_UP_CROSS, _UP_PLAIN}):
            raise ValueError(f"UNet block types {self.down_block_types} / {self.up_block_types}: "
                             f"need one per level ({levels}) of {(_PLAIN, _CROSS)} / "
                             f"{(_UP_CROSS, _UP_PLAIN)}")
        if self.addition_embed_type != "text_time":
            raise ValueError(f"addition_embed_type={self.addition_embed_type!r}: only SDXL's "
                             "'text_time' conditioning is implemented")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"UNet width {c} is not a multiple of norm_num_groups="
                                 f"{self.norm_num_groups}; pick a group count dividing every width")
        super().__post_init__()

    def __call__(self, sample, timesteps, context, text_embeds, time_ids):
        if self.remat == "dots":
            forward = nn.remat(UNet2DConditionModel._forward,
                               policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
            return forward(self, sample, timesteps, context, text_embeds, time_ids)
        return self._forward(sample, timesteps, context, text_embeds, time_ids)

    @nn.compact
    def _forward(self, sample, timesteps, context, text_embeds, time_ids):
        channels = self.block_out_channels
        levels = len(channels)
        opts = _Options(self.norm_num_groups, self.norm_eps, self.act_fn,
                        self.use_linear_projection, self.attention, self.split_head_dim,
                        self.ff_chunks, self.remat == "blocks", self.dtype)
        time_dim = 4 * channels[0]
        heads = tuple(self.attention_head_dim) if not isinstance(self.attention_head_dim, int) \
            else (self.attention_head_dim,) * levels
        depths = tuple(self.transformer_layers_per_block) \
            if not isinstance(self.transformer_layers_per_block, int) \
            else (self.transformer_layers_per_block,) * levels

        def sinusoid(t, dim):
            return sinusoidal_embedding(t, dim, flip_sin_to_cos=self.flip_sin_to_cos,
                                        freq_shift=self.freq_shift)
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (sample.shape[0],))
        temb = TimestepEmbedding(time_dim, self.act_fn, self.dtype, name="time_embedding")(
            sinusoid(t, channels[0]))
        micro = sinusoid(time_ids.reshape(-1), self.addition_time_embed_dim)
        added = jnp.concatenate([text_embeds.astype(jnp.float32),
                                 micro.reshape(sample.shape[0], -1)], axis=-1)
        temb = temb + TimestepEmbedding(time_dim, self.act_fn, self.dtype, name="add_embedding")(added)

        x = conv3x3(channels[0], self.dtype, "conv_in")(sample)
        skips = [x]
        for i, kind in enumerate(self.down_block_types):
            x, outs = _Level(channels[i], self.layers_per_block, heads[i] if kind == _CROSS else 0,
                             depths[i], "down" if i < levels - 1 else "", False, opts,
                             name=f"down_blocks_{i}")(x, temb, context)
            skips += outs
        x = _MidBlock(channels[-1], heads[-1], depths[-1], opts, name="mid_block")(x, temb, context)
        for i, kind in enumerate(self.up_block_types):
            level, n = levels - 1 - i, self.layers_per_block + 1
            skips, taken = skips[:-n], tuple(skips[-n:])
            x, _ = _Level(channels[level], n, heads[level] if kind == _UP_CROSS else 0,
                          depths[level], "up" if i < levels - 1 else "", True, opts,
                          name=f"up_blocks_{i}")(x, temb, context, taken)
        x = nn.GroupNorm(num_groups=self.norm_num_groups, epsilon=self.norm_eps,
                         name="conv_norm_out")(x)
        return conv3x3(self.out_channels, self.dtype, "conv_out")(activation(self.act_fn)(x))


def dummy_inputs(cfg: dict, batch: int = 1, size: int = 8) -> tuple:
    """Zero inputs of the right shapes for `UNet2DConditionModel(**cfg).init` (the parameter
    shapes do not depend on the latent size or text length)."""
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    return (jnp.zeros((batch, size, size, cfg["in_channels"])), jnp.zeros((batch,)),
            jnp.zeros((batch, 1, cfg["cross_attention_dim"])), jnp.zeros((batch, pooled)),
            jnp.zeros((batch, 6)))


def unet_apply(unet, params, z_NHWC, t, context, pooled, time_ids, *, train: bool = False):
    """Model output (B, H, W, out) float32 for latents z (B, H, W, in), timesteps t (B,) or a
    scalar, text context (B, L, cross_attention_dim), pooled bigG (B, proj_dim_g) and
    time_ids (B, 6) = (orig_h, orig_w, crop_top, crop_left, target_h, target_w). `train` is
    accepted for the callers' symmetry: the UNet has no dropout, so it changes nothing."""
    del train
    dt = unet.dtype
    out = unet.apply({"params": params}, z_NHWC.astype(dt), t, context.astype(dt),
                     pooled.astype(dt), time_ids.astype(jnp.float32))
    return out.astype(jnp.float32)
