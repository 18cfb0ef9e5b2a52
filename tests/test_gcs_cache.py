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


def test_cache_built_to_gcs_and_trained_from_it(demo_images, demo_cache, reference_run, gcs_server,
                                               gcs_dir, tmp_path, monkeypatch):
    """build_cache --out gs://: built in a local stand-in, uploaded with the manifest last; its
    shards are byte for byte the local build's, and training from it feeds the reference run's
    batches and losses."""
    from sdxl_jax.config import validate
    from sdxl_jax.data import build_cache
    from sdxl_jax.run_inputs import resolve_weights
    from sdxl_jax.train.loop import train
    _, _, ref, ref_log = reference_run
    monkeypatch.setenv("SDXL_JAX_CACHE_DIR", str(tmp_path / "user_cache"))  # the local stand-in
    remote = gcs_dir + "/cache"
    vae = resolve_weights(tiny_config()).load(("vae",))["vae"]  # as conftest.demo_cache encodes
    manifest = build_cache(tiny_config(), images_dir=demo_images, out=remote, progress=False, vae_params=vae)
    assert load_manifest(remote) == manifest
    for shard in manifest["shards"]:
        name = shard["name"] + ".array_record"
        with open(os.path.join(demo_cache, name), "rb") as f:
            assert paths.read_bytes(f"{remote}/{name}") == f.read()
    prefix = remote.split(f"gs://{GCS_BUCKET}/", 1)[1] + "/"
    staged = str(tmp_path / "user_cache" / "caches" / "gs" / remote[len("gs://"):])
    assert sorted(o[len(prefix):] for o in gcs_server.objects(GCS_BUCKET, prefix)) == \
        sorted(paths.walk_files(staged))  # every file of the local build, uploaded
    cfg = tiny_config(**{"data.cache_dir": remote, "train.steps": 2, "checkpoint.every_steps": 2})
    validate(cfg, num_devices=8)  # a gs:// cache_dir is one the trainer accepts
    log = []
    out = train(cfg, str(tmp_path / "run"), batch_log=log)
    assert log == ref_log[:2] and out["losses"] == ref["losses"][:2]


def test_multi_process_build_to_gcs_is_refused_up_front(demo_images, gcs_server, gcs_dir):
    from sdxl_jax.data import build_cache
    with pytest.raises(ValueError, match="a gs:// cache is built by one process"):
        build_cache(tiny_config(), images_dir=demo_images, out=gcs_dir + "/cache", process_index=0,
                    process_count=2, progress=False)
    assert gcs_server.objects(GCS_BUCKET, gcs_dir.split(f"gs://{GCS_BUCKET}/", 1)[1] + "/") == []
