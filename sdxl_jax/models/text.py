"""SDXL text conditioning from the two CLIP towers, with long captions in 77-token chunks."""
from __future__ import annotations

import jax.numpy as jnp

from sdxl_jax.models.tokenizer import SEQ_LEN


def _chunks(ids, max_chunks: int):
    batch = ids.shape[0]
    if ids.shape[1] != max_chunks * SEQ_LEN:
        raise ValueError(f"token ids have length {ids.shape[1]}, expected max_chunks·77 = "
                         f"{max_chunks * SEQ_LEN}")
    return ids.reshape(batch * max_chunks, SEQ_LEN).astype(jnp.int32)


def _run(module, params, ids):
    # no padding mask: SDXL's towers attend causally over the padding, as they were trained
    return module.apply({"params": params}, ids)


def encode_text(text_l, text_g, params_l, params_g, ids_l, ids_g, max_chunks: int):
    """(context (B, max_chunks·77, hidden_l+hidden_g), pooled (B, proj_dim_g)), float32. Jittable.

    Every 77-token chunk is encoded on its own (CLIP has 77 positions), giving per chunk
    CLIP-L's penultimate hidden states ‖ bigG's penultimate (no final LayerNorm, as SDXL was
    trained); chunks are concatenated along the sequence. The pooled embedding is bigG's
    text_projection of its final-LayerNorm EOS state of the FIRST chunk (METHODS §8).
    """
    batch = ids_l.shape[0]
    out_l = _run(text_l, params_l, _chunks(ids_l, max_chunks))
    out_g = _run(text_g, params_g, _chunks(ids_g, max_chunks))
    context = jnp.concatenate([out_l.hidden_states[-2], out_g.hidden_states[-2]], axis=-1)
    context = context.reshape(batch, max_chunks * SEQ_LEN, context.shape[-1])
    pooled = out_g.text_embeds.reshape(batch, max_chunks, -1)[:, 0]
    return context.astype(jnp.float32), pooled.astype(jnp.float32)
