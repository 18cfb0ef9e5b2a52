"""The attention product softmax(q·kᵀ·scale)·v of the UNet's attention layers, per `model.attention`.

Every kernel takes and returns (batch, length, heads, head_dim); the layer that calls it
(`transformer.Attention`) owns the projections, so the choice never touches a parameter.
- "standard": two einsums and a softmax in the compute dtype. `split_head_dim=False` folds the
  heads into the batch ((batch·heads, L, d) matrices), True keeps them as an axis; the same
  product, two layouts for XLA (the second is often faster on TPU).
- "memory_efficient": the same product over query chunks (arXiv 2112.05682), each chunk
  checkpointed, so the backward never holds more than one chunk's attention matrix. Keys are
  not chunked: SDXL's longest key sequence (4096 tokens at 1024²) fits one chunk.
- "dot_product": `jax.nn.dot_product_attention`. On an NVIDIA GPU with bf16/fp16 inputs it asks
  for cuDNN's fused flash attention (`implementation="cudnn"`): in JAX 0.10.2 the default
  `implementation=None` always takes the XLA path, so the kernel has to be requested. Shapes
  or dtypes cuDNN rejects (fp32, head dim > 256 …) fall back to the XLA path, logged once.
  Elsewhere it is the XLA path: logits and softmax in float32, no attention matrix in bf16.
- "splash": JAX's Pallas TPU splash-attention kernel (`jax.experimental.pallas.ops.tpu.
  splash_attention`), flash-style blocks in VMEM, never the L×L matrix in HBM. TPU only.
- "auto": the best of these for the backend (`resolve`): gpu → dot_product (cuDNN),
  tpu → splash, cpu → dot_product.
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

log = logging.getLogger("sdxl_jax.models")

ATTENTION_MODES = ("standard", "memory_efficient", "dot_product", "splash", "auto")
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


def standard(q, k, v, scale: float, *, split_head_dim: bool = False):
    """softmax(q·kᵀ·scale)·v with the full (L, S) matrix, in the inputs' dtype."""
    b, length, heads, d = q.shape
    if split_head_dim:
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)

    def fold(x):  # (B, L, H, D) → (B·H, L, D)
        return x.transpose(0, 2, 1, 3).reshape(b * heads, x.shape[1], d)
    scores = jnp.einsum("bqd,bkd->bqk", fold(q), fold(k)) * scale
    out = jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(scores, axis=-1), fold(v))
    return out.reshape(b, heads, length, d).transpose(0, 2, 1, 3)


def _query_chunk(length: int) -> int:
    # 64, 16 or 4 chunks, the first count that divides the length (else one chunk)
    return next((length // n for n in (64, 16, 4) if length % n == 0), length)


def memory_efficient(q, k, v, scale: float):
    """`standard` over query chunks under `lax.map`, each chunk checkpointed (recomputed in the
    backward), so at most one chunk's (chunk, S) attention matrix is alive at a time."""
    b, length, heads, d = q.shape
    chunk = _query_chunk(length)
    qs = q.reshape(b, length // chunk, chunk, heads, d).swapaxes(0, 1)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one(q_chunk):
        return standard(q_chunk, k, v, scale, split_head_dim=True)
    out = jax.lax.map(one, qs)  # (chunks, B, chunk, H, D)
    return out.swapaxes(0, 1).reshape(b, length, heads, d)


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
    "standard": standard,
    "memory_efficient": memory_efficient,
    "dot_product": dot_product,
    "splash": splash,
    # the splash kernel through the Pallas interpreter: tests on CPU only, not a config value
    "splash_interpret": functools.partial(splash, interpret=True),
}
