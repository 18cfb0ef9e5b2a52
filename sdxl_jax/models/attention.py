"""Fused attention kernels for the UNet's attention layers, with diffusers' parameter tree.

`model.attention` values handled here (the diffusers-native "standard" / "memory_efficient"
stay diffusers' own code):
- "dot_product": `jax.nn.dot_product_attention`. On an NVIDIA GPU with bf16/fp16 inputs it asks
  for cuDNN's fused flash attention (`implementation="cudnn"`): in JAX 0.10.2 the default
  `implementation=None` always takes the XLA path, so the kernel has to be requested. Shapes
  or dtypes cuDNN rejects (fp32, head dim > 256 …) fall back to the XLA path, logged once.
  Elsewhere it is the XLA path: logits and softmax in float32, no attention matrix in bf16.
- "splash": JAX's Pallas TPU splash-attention kernel (`jax.experimental.pallas.ops.tpu.
  splash_attention`), flash-style blocks in VMEM, never the L×L matrix in HBM. TPU only.
- "auto": the best of these for the backend (`resolve`): gpu → dot_product (cuDNN),
  tpu → splash, cpu → dot_product.

`kernel_class(FlaxAttention, name)` subclasses diffusers' FlaxAttention with the same fields and
the same setup (to_q / to_k / to_v / to_out_0), replacing only the product in `__call__`, so a
checkpoint of the plain model loads unchanged. `split_head_dim` has no effect on these kernels
(they always take (batch, length, heads, head_dim)).
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

log = logging.getLogger("sdxl_jax.models")

# the modes diffusers computes itself (FlaxAttention's use_memory_efficient_attention flag)
DIFFUSERS_MODES = ("standard", "memory_efficient")
KERNEL_MODES = ("dot_product", "splash")
ATTENTION_MODES = DIFFUSERS_MODES + KERNEL_MODES + ("auto",)
_AUTO = {"gpu": "dot_product", "tpu": "splash", "cpu": "dot_product"}
# Pallas TPU kernels tile sequences in blocks of 128 lanes; the largest block dividing the
# padded length is taken, up to 512 (larger q/kv blocks amortise the per-block overhead).
_LANES = 128
_MAX_BLOCK = 512


def resolve(mode: str, backend: str | None = None) -> str:
    """The attention mode a `model.attention` value means on `backend` (default: JAX's).

    "auto" becomes the backend's kernel; "splash" off a TPU is refused here, at build time, with
    the fix, instead of failing inside Mosaic lowering at the first compile."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"model.attention={mode!r}: must be one of {ATTENTION_MODES}")
    backend = backend or jax.default_backend()
    if mode == "auto":
        return _AUTO.get(backend, "dot_product")
    if mode == "splash" and backend != "tpu":
        raise ValueError(f"model.attention='splash' is JAX's Pallas TPU kernel and this process "
                         f"runs on {backend!r}; use model.attention='auto' (picks "
                         f"{_AUTO.get(backend, 'dot_product')!r} here) or 'dot_product'")
    return mode


# ---- the kernels: (batch, length, heads, head_dim) in and out ------------------------------------
@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:  # once per distinct message (shape), not per layer
    log.warning(message)


def dot_product(q, k, v, scale: float):
    """softmax(q·kᵀ·scale)·v by jax.nn.dot_product_attention; cuDNN flash on NVIDIA bf16/fp16."""
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError) as e:  # cuDNN's own shape checks
            _log_once(f"attention {q.shape} × {k.shape}: cuDNN flash attention declined "
                      f"({e}); using the XLA attention")
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")


def _block(length: int) -> int:
    return next(b for b in (_MAX_BLOCK, 256, _LANES) if length % b == 0)


def _pad_to_lanes(x, axis: int):
    n = x.shape[axis]
    pad = -n % _LANES
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _splash_local(q, k, v, scale: float, interpret: bool):
    """Splash attention of one shard: q (B, L, H, D), k/v (B, S, H, D) → (B, L, H, D).

    Lengths are padded to multiples of 128 (SDXL's 77-token text chunks, non-square buckets);
    padded keys get segment id 1 and every real query id 0, so no query attends a padded key and
    padded queries (sliced off) attend the real keys, so no row is fully masked. The head dim
    (64 in SDXL) is zero-padded to the 128 lanes as well: zeros add nothing to q·k, and the
    padded output columns are sliced off (the MXU is 128 wide, so this costs no extra time)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    _, length, heads, head_dim = q.shape
    keys = k.shape[1]

    def layout(x):  # (B, L, H, D) → (B, H, L padded, D padded): splash's per-example layout
        return _pad_to_lanes(_pad_to_lanes(x.transpose(0, 2, 1, 3), 2), 3)
    # splash applies no scale of its own
    qh = layout((q.astype(jnp.float32) * scale).astype(q.dtype))
    kh, vh = layout(k), layout(v)
    lp, sp = qh.shape[2], kh.shape[2]
    bq, bkv = _block(lp), _block(sp)
    blocks = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                           block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                           block_kv_dq=bkv)
    mask = sa.MultiHeadMask([sa.FullMask((lp, sp))] * heads)
    kernel = sa.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                interpret=interpret)
    segments = sa.SegmentIds(q=jnp.zeros((lp,), jnp.int32),
                             kv=(jnp.arange(sp) >= keys).astype(jnp.int32))
    out = jax.vmap(lambda a, b, c: kernel(a, b, c, segment_ids=segments))(qh, kh, vh)
    return out[:, :, :length, :head_dim].transpose(0, 2, 1, 3)


def splash(q, k, v, scale: float, *, interpret: bool = False):
    """Pallas TPU splash attention. A pallas_call has no SPMD partitioning rule (XLA would
    gather it whole onto every device), so under a mesh set with `jax.set_mesh` the batch is
    split over every mesh axis by shard_map, as the train step's batch sharding splits it.
    `interpret=True` runs the kernel in the Pallas interpreter (CPU tests)."""
    mesh = jax.sharding.get_abstract_mesh()
    local = functools.partial(_splash_local, scale=scale, interpret=interpret)
    if mesh.empty or q.shape[0] % mesh.size:
        return local(q, k, v)
    spec = jax.sharding.PartitionSpec(tuple(mesh.axis_names))
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(q, k, v)


KERNELS = {
    "dot_product": dot_product,
    "splash": splash,
    # the splash kernel through the Pallas interpreter: tests on CPU only, not a config value
    "splash_interpret": functools.partial(splash, interpret=True),
}


# ---- the module ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def kernel_class(base: type, kernel: str) -> type:
    """A subclass of diffusers' FlaxAttention `base` computing the product with KERNELS[kernel].

    Same dataclass fields, same setup, so the same submodules and parameter names; only the
    q·k / softmax / ·v part of `__call__` differs (diffusers' einsum or chunked scan)."""
    fn = KERNELS[kernel]

    def __call__(self, hidden_states, context=None, deterministic=True):  # noqa: N807
        context = hidden_states if context is None else context
        b = hidden_states.shape[0]

        def heads(x):
            return x.reshape(b, -1, self.heads, self.dim_head)
        out = fn(heads(self.query(hidden_states)), heads(self.key(context)),
                 heads(self.value(context)), self.scale)
        out = self.proj_attn(out.reshape(b, -1, self.heads * self.dim_head))
        return self.dropout_layer(out, deterministic=deterministic)

    return type(f"{kernel.title().replace('_', '')}{base.__name__}", (base,), {
        "__call__": __call__,
        "__doc__": f"{base.__name__} with the {kernel!r} attention kernel; same parameters."})
