"""Latent caches and datasets on gs:// (a real GCS server on loopback, conftest.gcs_server): a
cache built from gs:// images into gs:// holds the local cache's shards byte for byte and feeds
the reference run's batches and losses; a rerun resumes it; a missing shard object is one error
naming it; the loader's local shard copies feed the same batches; a JSONL manifest, a TFDS data
dir and a two-process build on gs://."""
import json
import time

import pytest

from conftest import GCS_BUCKET, REFERENCE_STEPS
from data_tools.bench_loader import fake_tokenize
from helpers import tiny_config
from sdxl_jax import paths
from sdxl_jax.data import cache as C
from sdxl_jax.data import make_train_iterator
from sdxl_jax.data.build import build_cache
from sdxl_jax.data.images import list_manifest, read_caption


def _records(cache_dir):
    """{key: record bytes} of every record of a cache (read through ArrayRecord, local or gs://)."""
    index = C.read_index(cache_dir)
    source = C.RecordSource(index.files, index.counts)
    try:
        return {key: source[i] for i, key in enumerate(index.keys)}
    finally:
        source.close()


def _objects(server, url):
    prefix = url.split(f"gs://{GCS_BUCKET}/", 1)[1] + "/"
    return sorted(n[len(prefix):] for n in server.objects(GCS_BUCKET, prefix))


def test_cache_built_from_and_to_gs_trains_as_the_local_one(demo_images, demo_cache, reference_run,
                                                            gcs_server, gcs_dir, tmp_path, caplog,
                                                            monkeypatch):
    from sdxl_jax.config import validate
    from sdxl_jax.run_inputs import resolve_weights
    from sdxl_jax.train.loop import train
    monkeypatch.setenv("SDXL_JAX_CACHE_DIR", str(tmp_path / "user_cache"))  # the shard copies
    images, cache = gcs_dir + "/images", gcs_dir + "/cache"
    paths.upload_tree(demo_images, images)
    vae = resolve_weights(tiny_config()).load(("vae",))["vae"]
    m = build_cache(tiny_config(), images_dir=images, out=cache, progress=False, vae_params=vae,
                    process_index=0, process_count=1)
    assert C.load_manifest(cache) == m
    local = C.load_manifest(demo_cache)
    assert m["num_records"] == local["num_records"] == 48
    assert m["settings"]["source"] == f"images:{images}"
    assert [s["name"] for s in m["shards"]] == [s["name"] for s in local["shards"]]
    for shard in m["shards"]:  # the same latents, captions and keys: the local build's files
        name = shard["name"] + C.SHARD_EXT
        with open(f"{demo_cache}/{name}", "rb") as f:
            assert paths.read_bytes(f"{cache}/{name}") == f.read()
    objects = _objects(gcs_server, cache)
    assert "manifest.json" in objects and not [n for n in objects if n.endswith(".tmp")]
    assert not [n for n in objects if n.startswith("build_cache.")]  # the lock object released
    # a rerun (also reading every record back) keeps every shard: nothing is rewritten
    before = {n: paths.epath(f"{cache}/{n}").stat().mtime for n in objects if n.endswith(C.SHARD_EXT)}
    caplog.set_level("INFO")
    build_cache(tiny_config(), images_dir=images, out=cache, progress=False, verify=True,
                vae_params=vae, process_index=0, process_count=1)
    assert "resuming, 48 of 48 images already cached" in caplog.text
    assert {n: paths.epath(f"{cache}/{n}").stat().mtime for n in before} == before
    # trained from the gs:// cache: the batches and losses of the local reference run, bitwise
    _, _, ref, ref_log = reference_run
    steps = 3
    cfg = tiny_config(**{"data.cache_dir": cache, "train.steps": steps})
    assert cfg.train.lr_schedule == "constant" and steps < REFERENCE_STEPS
    validate(cfg, num_devices=8)  # a gs:// cache_dir is one the trainer accepts
    log = []
    out = train(cfg, str(tmp_path / "run"), batch_log=log)
    assert log == ref_log[:steps] and out["losses"] == ref["losses"][:steps]


def test_missing_shard_object_is_one_error_naming_it(demo_cache, gcs_server, gcs_dir):
    cache = gcs_dir + "/cache"
    paths.upload_tree(demo_cache, cache)
    shard = f"{cache}/{C.load_manifest(cache)['shards'][0]['name']}{C.SHARD_EXT}"
    assert len(_records(cache)) == 48  # complete, it reads from gs://
    paths.remove(shard)
    t = time.time()
    with pytest.raises(C.CacheError) as e:
        make_train_iterator(tiny_config(), cache, fake_tokenize(1))
    assert time.time() - t < 30  # refused up front, no retrying reader
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"cache shard {shard}: file missing; rerun build_cache")


def test_loader_copies_gs_shards_locally_and_feeds_the_same_batches(demo_cache, gcs_server, gcs_dir,
                                                                   tmp_path, monkeypatch):
    """The loader reads from gs:// at once and switches to the local copies of the shards once
    the background download has made them; the batches are those of the local cache throughout.
    With data.local_shard_cache_gb = 0 nothing is copied."""
    import numpy as np
    from sdxl_jax.data import shard_mirror
    monkeypatch.setenv("SDXL_JAX_CACHE_DIR", str(tmp_path / "user_cache"))
    cache = gcs_dir + "/cache"
    paths.upload_tree(demo_cache, cache)
    shards = [s["name"] + C.SHARD_EXT for s in C.load_manifest(cache)["shards"]]
    copies = [str(tmp_path / "user_cache" / "shards" / cache.replace("://", "/", 1) / n) for n in shards]

    def batches(cache_dir, gb, n=6):
        cfg = tiny_config(**{"data.local_shard_cache_gb": gb})
        it = make_train_iterator(cfg, cache_dir, fake_tokenize(1))
        try:
            return [next(it) for _ in range(n)]
        finally:
            it.close()
    local = batches(demo_cache, 50.0)
    direct = batches(cache, 0.0)
    assert not (tmp_path / "user_cache").exists()
    mirrored = batches(cache, 50.0)
    for a, b, c in zip(local, direct, mirrored):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
            np.testing.assert_array_equal(a[k], c[k])
    t = time.time()
    while not all(shard_mirror._READY.get(f"{cache}/{n}") for n in shards) and time.time() - t < 60:
        time.sleep(0.2)
    assert [shard_mirror._READY.get(f"{cache}/{n}") for n in shards] == copies
    for n, copy in zip(shards, copies):
        with open(f"{demo_cache}/{n}", "rb") as f, open(copy, "rb") as g:
            assert f.read() == g.read()


def test_manifest_on_gs_with_relative_and_absolute_entries(demo_images, gcs_server, gcs_dir):
    folder = gcs_dir + "/data"
    paths.upload_tree(demo_images, folder)
    names = sorted(n for n in paths.walk_files(folder) if n.endswith(".png"))[:3]
    lines = [{"path": names[0], "caption": "a, b"},  # relative to the manifest's folder
             {"path": f"{folder}/{names[1]}", "caption": "c"},  # a URL
             {"path": names[2]}]  # no caption: skipped, named
    paths.write_text(f"{folder}/list.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    sources, skipped = list_manifest(f"{folder}/list.jsonl")
    assert [(s.path, s.key, read_caption(s)) for s in sources] == [
        (f"{folder}/{names[0]}", names[0], "a, b"), (f"{folder}/{names[1]}", f"{folder}/{names[1]}", "c")]
    assert skipped == [(names[2], f'missing caption ({folder}/list.jsonl:3 has no "caption")')]
    with open(f"{demo_images}/{names[0]}", "rb") as f:
        assert paths.read_bytes(sources[0].path) == f.read()


def test_two_process_build_writes_one_gs_cache(demo_images, gcs_server, gcs_dir, tmp_path, monkeypatch):
    """Two builder processes (threads here, meeting at a shared barrier) write their shards into
    the same gs:// cache; it holds the records of a one-process local build."""
    import threading

    from data_tools.bench_loader import pool_encode
    from sdxl_jax.data import build as build_module
    barrier = threading.Barrier(2, timeout=60)
    monkeypatch.setattr(build_module, "_barrier", lambda name, count: barrier.wait())
    cfg = tiny_config(**{"data.shard_size": 16})
    kw = dict(encode_fn=pool_encode, encoder_fingerprint="pool8", progress=False)
    cache, results = gcs_dir + "/cache", {}

    def run(p):
        results[p] = build_cache(cfg, images_dir=demo_images, out=cache, process_index=p,
                                 process_count=2, **kw)
    threads = [threading.Thread(target=run, args=(p,)) for p in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == results[1] and results[0]["num_records"] == 48
    assert {s["name"].split("-")[1] for s in results[0]["shards"]} == {"p0000of0002", "p0001of0002"}
    objects = _objects(gcs_server, cache)
    assert {"parts/part-0000of0002.json", "parts/part-0001of0002.json", "manifest.json"} <= set(objects)
    monkeypatch.undo()  # the real (no-op) barrier of one process
    build_cache(cfg, images_dir=demo_images, out=str(tmp_path / "local"), process_index=0,
                process_count=1, **kw)
    assert _records(cache) == _records(str(tmp_path / "local"))
    # rebuilt by one process with --rebuild: the two-process shards and parts are gone
    m = build_cache(cfg, images_dir=demo_images, out=cache, rebuild=True, process_index=0,
                    process_count=1, **kw)
    shards = {n for n in _objects(gcs_server, cache) if n.endswith(C.SHARD_EXT)}
    assert shards == {s["name"] + C.SHARD_EXT for s in m["shards"]}
    assert {n.split("-")[1] for n in shards} == {"p0000of0001"}
    assert [n for n in _objects(gcs_server, cache) if n.startswith("parts/")] == ["parts/part-0000of0001.json"]


def test_tfds_data_dir_on_gs(tmp_path, gcs_server, gcs_dir):
    """A prepared TFDS dataset copied to gs:// is cached as from its local data dir."""
    from test_tfds import NAME, build, make_demo_dataset, write_tfds
    from sdxl_jax.data.tfds_source import TfdsInput
    images, data_dir = tmp_path / "images", tmp_path / "tfds_data"
    make_demo_dataset(str(images), 6, 0, 128)
    write_tfds(images, data_dir)
    paths.upload_tree(str(data_dir), gcs_dir + "/tfds")
    local = build(tmp_path / "a", tfds=TfdsInput(NAME, "train", str(data_dir)))
    remote = build(gcs_dir + "/cache", tfds=TfdsInput(NAME, "train", gcs_dir + "/tfds"))
    assert remote["settings"]["source"] == local["settings"]["source"].replace(str(data_dir), gcs_dir + "/tfds")
    assert remote["num_records"] == local["num_records"] == 6
    assert _records(gcs_dir + "/cache") == _records(str(tmp_path / "a"))
