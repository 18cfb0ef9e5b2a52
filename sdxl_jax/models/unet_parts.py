"""The UNet's convolutional parts: resnet block, down/up samplers, timestep embeddings.

Channels-last (B, H, W, C). Submodule names follow diffusers' PyTorch modules (resnets: norm1,
conv1, time_emb_proj, norm2, conv2, conv_shortcut; samplers: conv; embeddings: linear_1,
linear_2), the parameter names of SDXL checkpoints.

GroupNorms take no compute dtype: Flax normalises in float32 and, with float32 scale/bias,
returns float32, which the next conv casts back to the compute dtype (the statistics of a
bf16 activation are not taken in bf16).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

ACTIVATIONS = {"silu": nn.silu, "swish": nn.silu, "gelu": lambda x: nn.gelu(x, approximate=False)}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation act_fn={name!r}; choose one of {tuple(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def sinusoidal_embedding(t, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                         max_period: float = 10000.0):
    """(N,) → (N, dim) float32: [cos | sin] (flip_sin_to_cos) of t·exp(-ln(max_period)·i/(dim/2 -
    freq_shift)), i < dim/2: PyTorch diffusers' get_timestep_embedding."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    parts = (jnp.cos(args), jnp.sin(args)) if flip_sin_to_cos else (jnp.sin(args), jnp.cos(args))
    emb = jnp.concatenate(parts, axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nn.Module):
    """linear_1 → act → linear_2 (the time MLP, and the text_time add-embedding's)."""
    dim: int
    act_fn: str = "silu"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.dim, dtype=self.dtype, name="linear_1")(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="linear_2")(activation(self.act_fn)(x))


def conv3x3(features: int, dtype, name: str, stride: int = 1) -> nn.Conv:
    return nn.Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                   dtype=dtype, name=name)


class Downsample(nn.Module):
    """3×3 conv with stride 2, padding 1 (PyTorch's Downsample2D with use_conv)."""
    channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return conv3x3(self.channels, self.dtype, "conv", stride=2)(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2× (each pixel repeated 2×2), then a 3×3 conv."""
    channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv3x3(self.channels, self.dtype, "conv")(x)


class ResnetBlock(nn.Module):
    """norm1 → act → conv1 (+ time_emb_proj(act(temb)) per channel) → norm2 → act → conv2, plus
    the input (through a 1×1 conv_shortcut when the channel count changes)."""
    out_channels: int
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    act_fn: str = "silu"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb):
        act = activation(self.act_fn)

        def norm(name):
            return nn.GroupNorm(num_groups=self.norm_num_groups, epsilon=self.norm_eps, name=name)
        h = conv3x3(self.out_channels, self.dtype, "conv1")(act(norm("norm1")(x)))
        t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(act(temb))
        h = h + t[:, None, None, :]
        h = conv3x3(self.out_channels, self.dtype, "conv2")(act(norm("norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), padding="VALID", dtype=self.dtype,
                        name="conv_shortcut")(x)
        return h + x
