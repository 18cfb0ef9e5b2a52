"""The UNet's spatial transformer: Transformer2D → BasicTransformerBlock → attention and GEGLU.

Channels-last (B, H, W, C) in and out; tokens are the H·W positions. Submodule names are the
parameter names SDXL checkpoints use (diffusers' PyTorch module names with "." → "_"), so
`convert.py` and the LoRA formats map them one to one:

    Transformer2D          norm, proj_in, transformer_blocks_{i}, proj_out
    BasicTransformerBlock  norm1, attn1 (self), norm2, attn2 (cross), norm3, ff
    Attention              to_q, to_k, to_v (no bias), to_out_0
    FeedForward            net_0 (GEGLU: proj), net_2

Dropout is not modelled: SDXL (and every config here) trains with dropout 0.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from sdxl_jax.models import attention as attention_kernels

# PyTorch diffusers' Transformer2DModel normalises its input with GroupNorm(eps=1e-6) whatever
# the UNet's norm_eps; its BasicTransformerBlock LayerNorms use eps=1e-5.
TRANSFORMER_GROUPNORM_EPS = 1e-6
LAYERNORM_EPS = 1e-5


class Attention(nn.Module):
    """Multi-head attention: self (context None) or cross. `kernel` names the product in
    `attention.KERNELS` (a resolved `model.attention` value)."""
    query_dim: int
    heads: int
    dim_head: int
    kernel: str = "standard"
    split_head_dim: bool = False
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        inner = self.heads * self.dim_head
        self.to_q = nn.Dense(inner, use_bias=False, dtype=self.dtype)
        self.to_k = nn.Dense(inner, use_bias=False, dtype=self.dtype)
        self.to_v = nn.Dense(inner, use_bias=False, dtype=self.dtype)
        self.to_out_0 = nn.Dense(self.query_dim, dtype=self.dtype)

    def __call__(self, x, context=None):
        context = x if context is None else context
        b = x.shape[0]

        def heads(y):
            return y.reshape(b, -1, self.heads, self.dim_head)
        fn = attention_kernels.KERNELS[self.kernel]
        kwargs = {"split_head_dim": self.split_head_dim} if self.kernel == "standard" else {}
        out = fn(heads(self.to_q(x)), heads(self.to_k(context)), heads(self.to_v(context)),
                 self.dim_head ** -0.5, **kwargs)
        return self.to_out_0(out.reshape(b, -1, self.heads * self.dim_head))


class GEGLU(nn.Module):
    """proj to 2·inner, then linear half × GELU(gate half) with the exact (erf) GELU, as
    PyTorch's GEGLU computes it."""
    inner_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(2 * self.inner_dim, dtype=self.dtype, name="proj")(x)
        linear, gate = jnp.split(h, 2, axis=-1)
        return linear * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """GEGLU(4·dim) then Dense(dim). With `chunks` > 1 (`model.ff_chunks`) the tokens go through
    in that many chunks: an `nn.scan` (parameters broadcast, so the same tree) over a
    checkpointed body, so the backward holds one chunk's 8·dim-wide intermediates at a time
    instead of the whole layer's. Tokens are independent here, so the result is the unchunked
    one up to summation order; a token count the chunks do not divide runs unchunked."""
    dim: int
    chunks: int = 1
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.net_0 = GEGLU(4 * self.dim, dtype=self.dtype)
        self.net_2 = nn.Dense(self.dim, dtype=self.dtype)

    def _apply(self, x):
        return self.net_2(self.net_0(x))

    def __call__(self, x):
        b, length, d = x.shape
        if self.chunks <= 1 or length % self.chunks:
            return self._apply(x)
        xs = x.reshape(b, self.chunks, length // self.chunks, d).swapaxes(0, 1)

        def body(module, carry, chunk):
            return carry, module._apply(chunk)
        scan = nn.scan(nn.remat(body), variable_broadcast="params",
                       split_rngs={"params": False}, length=self.chunks)
        _, ys = scan(self, None, xs)
        return ys.swapaxes(0, 1).reshape(b, length, d)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the text context, GEGLU feed-forward; each
    with a residual."""
    dim: int
    heads: int
    dim_head: int
    kernel: str = "standard"
    split_head_dim: bool = False
    ff_chunks: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        def attn(name):
            return Attention(self.dim, self.heads, self.dim_head, kernel=self.kernel,
                             split_head_dim=self.split_head_dim, dtype=self.dtype, name=name)

        def norm(name):
            return nn.LayerNorm(epsilon=LAYERNORM_EPS, dtype=self.dtype, name=name)
        x = attn("attn1")(norm("norm1")(x)) + x
        x = attn("attn2")(norm("norm2")(x), context) + x
        return FeedForward(self.dim, chunks=self.ff_chunks, dtype=self.dtype,
                           name="ff")(norm("norm3")(x)) + x


class Transformer2D(nn.Module):
    """GroupNorm, proj_in (a Dense with `use_linear_projection`, else a 1×1 conv), `depth`
    transformer layers over the H·W tokens, proj_out, plus the input. `remat_layers` runs each
    layer under `nn.remat` (`model.remat="blocks"`)."""
    channels: int
    heads: int
    depth: int = 1
    norm_num_groups: int = 32
    use_linear_projection: bool = True
    kernel: str = "standard"
    split_head_dim: bool = False
    ff_chunks: int = 1
    remat_layers: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        b, h, w, c = x.shape
        residual = x
        x = nn.GroupNorm(num_groups=self.norm_num_groups, epsilon=TRANSFORMER_GROUPNORM_EPS,
                         name="norm")(x)

        def proj(name):
            if self.use_linear_projection:
                return nn.Dense(self.channels, dtype=self.dtype, name=name)
            return nn.Conv(self.channels, (1, 1), dtype=self.dtype, name=name)
        if self.use_linear_projection:
            x = proj("proj_in")(x.reshape(b, h * w, c))
        else:
            x = proj("proj_in")(x).reshape(b, h * w, self.channels)
        layer = nn.remat(BasicTransformerBlock) if self.remat_layers else BasicTransformerBlock
        for i in range(self.depth):
            x = layer(self.channels, self.heads, self.channels // self.heads, kernel=self.kernel,
                      split_head_dim=self.split_head_dim, ff_chunks=self.ff_chunks,
                      dtype=self.dtype, name=f"transformer_blocks_{i}")(x, context)
        if self.use_linear_projection:
            x = proj("proj_out")(x).reshape(b, h, w, self.channels)
        else:
            x = proj("proj_out")(x.reshape(b, h, w, self.channels))
        return x + residual

