"""Data: aspect-ratio buckets, tags, the latent cache (build + format) and the Grain loader.

Flow: images + captions ─build_cache─▶ ArrayRecord latent cache + manifest.json
      ─make_train_iterator / make_val_iterator─▶ numpy batches, one bucket per global batch.
"""
from sdxl_jax.data.buckets import (Fit, assign_bucket, batch_sizes, buckets_from_config, fit_cover,
                                   make_buckets, time_ids)
from sdxl_jax.data.cache import LatentStats, decode_record, encode_record, load_manifest, read_index
from sdxl_jax.data.pipeline import DataIterator, make_train_iterator, make_val_iterator
from sdxl_jax.data.tags import augment_caption, normalize_tags, tag_counts, tag_weights


def build_cache(*args, **kwargs):
    """See sdxl_jax.data.build.build_cache (imported lazily: it pulls in image decoding)."""
    from sdxl_jax.data.build import build_cache as _build
    return _build(*args, **kwargs)
