"""A latent cache on gs:// (a GCS server on loopback, conftest.gcs_server): the loader reads its
shards there (array_record's own GCS reader) and feeds exactly the batches it feeds from the same
cache on disk; every shard object is checked up front, so a missing one is one error naming it."""
import os

import pytest

from conftest import GCS_BUCKET
from helpers import tiny_config
from sdxl_jax import models, paths
from sdxl_jax.data import make_train_iterator
from sdxl_jax.data.cache import CacheError, load_manifest
from sdxl_jax.train.loop import batch_digest


def _batches(cfg, cache_dir, n):
    tok_l, tok_g = models.get_tokenizers(cfg.model.preset)

    def tokenize(c):
        return models.tokenize(tok_l, c, 1), models.tokenize(tok_g, c, 1)
    it = make_train_iterator(cfg, cache_dir, tokenize, 0, 1, 8, 8)
    try:
        return [batch_digest(next(it)) for _ in range(n)]
    finally:
        it.close()


def test_loader_reads_a_gcs_cache_as_the_local_one_and_names_a_missing_shard(demo_cache, gcs_server, gcs_dir):
    remote = gcs_dir + "/cache"
    paths.upload_tree(demo_cache, remote)
    cfg = tiny_config(**{"data.cache_dir": remote})
    assert _batches(cfg, remote, 3) == _batches(cfg, demo_cache, 3)
    shard = load_manifest(remote)["shards"][-1]["name"] + ".array_record"
    from google.cloud import storage
    storage.Client().bucket(GCS_BUCKET).blob(
        remote.split(f"gs://{GCS_BUCKET}/", 1)[1] + "/" + shard).delete()
    with pytest.raises(CacheError, match=f"cache shard {remote}/{shard}: file missing; rerun build_cache"):
        _batches(cfg, remote, 1)
    assert os.path.exists(os.path.join(demo_cache, shard))  # the local cache is untouched
