"""The SDXL VAE (diffusers' AutoencoderKL architecture), channels-last throughout.

Configured by the `presets.vae_config` dict (diffusers' AutoencoderKL config field names, which
export also writes) plus `norm_eps` (1e-6 in every SD/SDXL VAE). Module names follow diffusers,
so the parameter paths are the ones the converter, checkpoints and the decoder finetune use
(diffusers' `down_blocks.0.resnets.1` is our `down_blocks_0/resnets_1`):

    AutoencoderKL                    diffusers AutoencoderKL
      encoder                          .encoder (Encoder)
        conv_in                          .conv_in
        down_blocks_<i>                  .down_blocks.<i> (DownEncoderBlock2D)
          resnets_<j>                      .resnets.<j> (ResnetBlock2D, no time embedding)
            norm1, conv1, norm2, conv2,      .norm1, .conv1, .norm2, .conv2,
            conv_shortcut (in ≠ out)         .conv_shortcut
          downsamplers_0/conv              .downsamplers.0.conv (Downsample2D, pad (0,1)², stride 2)
        mid_block                        .mid_block (UNetMidBlock2D)
          resnets_0, resnets_1             .resnets.0, .resnets.1
          attentions_0                     .attentions.0 (Attention, one head)
            group_norm, query, key,          .group_norm, .to_q, .to_k,
            value, proj_attn                 .to_v, .to_out.0
        conv_norm_out, conv_out          .conv_norm_out, .conv_out (2·latent channels)
      quant_conv                       .quant_conv (1×1)
      post_quant_conv                  .post_quant_conv (1×1)
      decoder                          .decoder (Decoder): conv_in, mid_block,
        up_blocks_<i>                    .up_blocks.<i> (UpDecoderBlock2D: layers_per_block + 1
          resnets_<j>, upsamplers_0/conv   resnets, Upsample2D = nearest 2× then a 3×3 conv)
        conv_norm_out, conv_out          .conv_norm_out, .conv_out

GroupNorms take no compute dtype: they normalise in float32 whatever `dtype` is, and the next
conv casts, so bf16 activations never lose precision in the statistics.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# diffusers' `get_activation` names
ACTIVATIONS = {"silu": jax.nn.silu, "swish": jax.nn.silu, "gelu": jax.nn.gelu,
               "relu": jax.nn.relu, "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x))}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The AutoencoderKL config fields the modules read."""
    in_channels: int
    out_channels: int
    block_out_channels: tuple
    layers_per_block: int
    norm_num_groups: int
    latent_channels: int
    act_fn: str = "silu"
    norm_eps: float = 1e-6

    @classmethod
    def of(cls, config: dict) -> "VAEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in known}
        values["block_out_channels"] = tuple(values["block_out_channels"])
        return cls(**values)


def _conv(features: int, kernel: int, dtype, name: str | None = None, stride: int = 1,
          pad: int | None = None):
    pad = kernel // 2 if pad is None else pad
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    """norm → act → conv → norm → act → conv, plus the input (1×1-projected when widths differ)."""
    out_channels: int
    cfg: VAEConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        act, c = ACTIVATIONS[self.cfg.act_fn], self.cfg
        norm = lambda name: nn.GroupNorm(c.norm_num_groups, epsilon=c.norm_eps, name=name)  # noqa: E731
        h = _conv(self.out_channels, 3, self.dtype, "conv1")(act(norm("norm1")(x)))
        h = _conv(self.out_channels, 3, self.dtype, "conv2")(act(norm("norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        return h + x


class AttentionBlock(nn.Module):
    """Single-head self-attention over all positions, residual (the VAE mid block's)."""
    cfg: VAEConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        b, h, w, ch = x.shape
        t = nn.GroupNorm(self.cfg.norm_num_groups, epsilon=self.cfg.norm_eps,
                         name="group_norm")(x).reshape(b, h * w, ch)
        dense = lambda name: nn.Dense(ch, dtype=self.dtype, name=name)  # noqa: E731
        # the 1/√ch scale split over q and k keeps the logits' intermediate range small in bf16
        scale = 1.0 / math.sqrt(math.sqrt(ch))
        q, k, v = (dense(n)(t) for n in ("query", "key", "value"))
        weights = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q * scale, k * scale), axis=-1)
        out = dense("proj_attn")(jnp.einsum("bqk,bkc->bqc", weights, v))
        return out.reshape(b, h, w, ch) + x


class MidBlock(nn.Module):
    cfg: VAEConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        ch = x.shape[-1]
        x = ResnetBlock(ch, self.cfg, self.dtype, name="resnets_0")(x)
        x = AttentionBlock(self.cfg, self.dtype, name="attentions_0")(x)
        return ResnetBlock(ch, self.cfg, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
    """Pad right/bottom by one, 3×3 conv with stride 2 (diffusers' Downsample2D, padding 0)."""
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(x.shape[-1], 3, self.dtype, "conv", stride=2, pad=0)(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2× (each pixel repeated), then a 3×3 conv."""
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(x.shape[-1], 3, self.dtype, "conv")(x)


def _out(x, channels: int, c: VAEConfig, dtype):
    """conv_norm_out → act → conv_out, the end of the encoder and of the decoder (call inside a
    compact method: the modules become its children)."""
    x = ACTIVATIONS[c.act_fn](nn.GroupNorm(c.norm_num_groups, epsilon=c.norm_eps,
                                           name="conv_norm_out")(x))
    return _conv(channels, 3, dtype, "conv_out")(x)


class Encoder(nn.Module):
    cfg: VAEConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        x = _conv(c.block_out_channels[0], 3, self.dtype, "conv_in")(x)
        for i, width in enumerate(c.block_out_channels):
            block = _Level(width, c.layers_per_block, i < len(c.block_out_channels) - 1, False,
                           c, self.dtype, name=f"down_blocks_{i}")
            x = block(x)
        x = MidBlock(c, self.dtype, name="mid_block")(x)
        return _out(x, 2 * c.latent_channels, c, self.dtype)


class Decoder(nn.Module):
    cfg: VAEConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, z):
        c = self.cfg
        widths = c.block_out_channels[::-1]
        x = _conv(widths[0], 3, self.dtype, "conv_in")(z)
        x = MidBlock(c, self.dtype, name="mid_block")(x)
        for i, width in enumerate(widths):
            x = _Level(width, c.layers_per_block + 1, i < len(widths) - 1, True, c, self.dtype,
                       name=f"up_blocks_{i}")(x)
        return _out(x, c.out_channels, c, self.dtype)


class _Level(nn.Module):
    """`layers` resnets to `width`, then a 2× down- or upsampler (none on the last level)."""
    width: int
    layers: int
    resample: bool
    up: bool
    cfg: VAEConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        for j in range(self.layers):
            x = ResnetBlock(self.width, self.cfg, self.dtype, name=f"resnets_{j}")(x)
        if self.resample:
            name = "upsamplers_0" if self.up else "downsamplers_0"
            x = (Upsample if self.up else Downsample)(self.dtype, name=name)(x)
        return x


class DiagonalGaussian:
    """The posterior N(mean, std²) of encoder moments (mean ‖ log-variance on the channel axis);
    the log-variance clipped to [-30, 20] as in diffusers."""

    def __init__(self, moments):
        self.mean, logvar = jnp.split(moments, 2, axis=-1)
        self.logvar = jnp.clip(logvar, -30.0, 20.0)
        self.std = jnp.exp(0.5 * self.logvar)

    def sample(self, key):
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)


class AutoencoderKL(nn.Module):
    """images (B, H, W, 3) ⇄ moments / latents (B, H/8, W/8, ·), compute in `dtype`, params float32.

    `encode` gives the encoder moments (mean ‖ log-variance, 2·latent channels), `decode` the
    image of a latent; `__call__` decodes the posterior mean of an image (used to trace init).
    """
    cfg: VAEConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        c = self.cfg
        self.encoder = Encoder(c, self.dtype)
        self.quant_conv = _conv(2 * c.latent_channels, 1, self.dtype)
        self.post_quant_conv = _conv(c.latent_channels, 1, self.dtype)
        self.decoder = Decoder(c, self.dtype)

    def encode(self, images):
        return self.quant_conv(self.encoder(images))

    def decode(self, latents):
        return self.decoder(self.post_quant_conv(latents))

    def __call__(self, images):
        return self.decode(DiagonalGaussian(self.encode(images)).mean)


def autoencoder(config: dict, dtype) -> AutoencoderKL:
    """The VAE of an AutoencoderKL-style config dict (`presets.vae_config`)."""
    return AutoencoderKL(VAEConfig.of(config), dtype=dtype)
