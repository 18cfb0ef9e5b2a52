"""Several datasets in one run (data.sources): the epoch mix follows repeats × weight, kohya
folder names become sources, the mixed loader resumes exactly, and a tiny two-source run
interrupted after a checkpoint equals the uninterrupted one bitwise, logging the loss of each
source."""
import json
import os
import shutil
import struct

import jax
import numpy as np
import pytest

from configs.ztsnr import get_config
from data_tools.bench_loader import fake_tokenize, pool_encode
from helpers import tiny_config
from sdxl_jax.config import ConfigError, validate
from sdxl_jax.data import cache as C
from sdxl_jax.data import make_train_iterator
from sdxl_jax.data.build import build_cache
from sdxl_jax.data.demo import make_demo_dataset
from sdxl_jax.data.plan import EpochRecords, plan_epoch
from sdxl_jax.data.sources import DataSource, pooled_latent_stats, resolve_sources

TOKENIZE = fake_tokenize(1)


# ---- the plan (pure numpy) -------------------------------------------------------------------

def test_epoch_mix_follows_repeats_and_weights():
    """Sources of 40 and 30 records, repeats 3 and 1, weights 1 and 0.5: each epoch holds
    exactly M = (120, 15) copies, the batches use all of them but the carried tail (under one
    batch per bucket, ≤ Σ_b(size_b − 1) = 9 here), every batch is one bucket, and a second
    process (fresh objects, same inputs) plans the same batches."""
    n, m, seed, sizes = (40, 30), (3 * 1.0, 1 * 0.5), 7, [4, 4, 4]
    buckets = np.random.default_rng(0).integers(0, 3, sum(n)).astype(np.int32)
    ids = [np.arange(40), np.arange(40, 70)]
    source = (np.arange(70) >= 40).astype(int)
    per_process = [EpochRecords(ids, m, seed), EpochRecords([i.copy() for i in ids], m, seed)]
    carry, extra_copies = np.zeros(0, np.int64), np.zeros(30, int)
    for epoch in range(20):
        records = per_process[0](epoch)
        assert [len(r) for r in per_process[0].per_source(epoch)] == [120, 15]
        assert (np.bincount(records, minlength=70)[:40] == 3).all()
        extra_copies += np.bincount(records, minlength=70)[40:]
        plans = [plan_epoch(buckets, e(epoch), sizes, seed, epoch, carry) for e in per_process]
        for a, b in zip(plans[0].batches, plans[1].batches):
            np.testing.assert_array_equal(a, b)
        plan = plans[0]
        for b, batch in zip(plan.bucket_ids, plan.batches):
            assert len(batch) == 4 and set(buckets[batch].tolist()) == {b}
        used = np.concatenate(plan.batches)
        np.testing.assert_array_equal(np.sort(np.concatenate([used, plan.carry_out])), records)
        assert len(plan.carry_out) <= sum(s - 1 for s in sizes)
        counts = np.bincount(source[used], minlength=2)
        tail = np.bincount(source[plan.carry_out], minlength=2)
        assert counts.tolist() == (np.array([120, 15]) - tail).tolist()
        carry = plan.carry_out
    # weight 0.5: a fresh half of source 2 each epoch, so every record's share is 0.5 on average
    assert extra_copies.sum() == 15 * 20 and extra_copies.min() >= 1 and extra_copies.max() <= 20


def test_pooled_latent_stats_are_those_of_the_mix():
    """per_channel statistics of two sources = numpy's mean/std over the latents an epoch
    holds: the union of the caches, with source 1 twice when its repeats are 2."""
    from sdxl_jax.data.cache import LatentStats
    rng = np.random.default_rng(0)
    x = [rng.normal(1.0, 2.0, (50, 4)), rng.normal(-1.0, 0.5, (20, 4))]
    manifests = []
    for a in x:
        st = LatentStats()
        st.update(a)
        manifests.append({"latent_stats": {"count": st.count, "mean": st.mean.tolist(), "std": st.std.tolist()}})
    for repeats, mix in ((1, np.concatenate(x)), (2, np.concatenate([x[0], x[0], x[1]]))):
        sources = [DataSource("a", "", repeats=repeats), DataSource("b", "")]
        mean, std = pooled_latent_stats(sources, manifests)
        np.testing.assert_allclose(mean, mix.mean(0), rtol=1e-12)
        np.testing.assert_allclose(std, mix.std(0), rtol=1e-12)


# ---- configuration -----------------------------------------------------------------------------

def test_kohya_folders_become_sources(tmp_path):
    root = tmp_path / "train"
    for sub in ("3_red", "1_blue"):
        (root / sub).mkdir(parents=True)
    green = tmp_path / "4_green"
    green.mkdir()
    wd = str(tmp_path / "wd")
    cfg = get_config("tiny")
    cfg.data.images_dir = str(root)  # kohya's train_data_dir layout as the single images_dir
    got = [(s.name, s.repeats, s.weight, s.images_dir, s.cache_dir) for s in resolve_sources(cfg, wd)]
    assert got == [("blue", 1, 1.0, str(root / "1_blue"), os.path.join(wd, "cache", "blue")),
                   ("red", 3, 1.0, str(root / "3_red"), os.path.join(wd, "cache", "red"))]
    cfg.data.images_dir = str(green)  # a lone N_name folder as data.images_dir: unchanged single source
    assert resolve_sources(cfg, wd) == []
    cfg = get_config("tiny")
    cfg.data.sources = [{"images_dir": str(root), "weight": 0.5}, {"images_dir": str(green)},
                        {"images_dir": str(green), "repeats": 1, "name": "green_once"}]
    got = [(s.name, s.repeats, s.weight) for s in resolve_sources(cfg, wd)]
    assert got == [("blue", 1, 0.5), ("red", 3, 0.5), ("green", 4, 1.0), ("green_once", 1, 1.0)]
    (root / "loose.png").write_bytes(b"")
    with pytest.raises(ValueError, match="images directly inside it"):
        resolve_sources(cfg, wd)


def test_kohya_folder_with_a_plain_subfolder_is_refused_naming_it(tmp_path):
    """10_cat/ beside a plain misc/: read as one plain source, the 10 repeats would vanish."""
    root = tmp_path / "train"
    for sub in ("10_cat", "misc"):
        (root / sub).mkdir(parents=True)
    cfg = get_config("tiny")
    cfg.data.images_dir = str(root)
    with pytest.raises(ValueError, match=f"{root} mixes kohya-style N_name subfolders \\(10_cat\\) "
                                         "with plain ones \\(misc\\).* Rename misc to 1_misc"):
        resolve_sources(cfg, str(tmp_path / "wd"))
    (root / "misc").rename(root / "1_misc")  # what the message says to do
    assert [(s.name, s.repeats) for s in resolve_sources(cfg, str(tmp_path / "wd"))] == [
        ("cat", 10), ("misc", 1)]


@pytest.mark.parametrize("entries, message", [
    ([{"images_dir": "."}, {"images_dir": ".", "repeats": 0}],
     r"data\.sources\[1\]\.repeats=0: must be an integer ≥ 1"),
    ([{"images_dir": ".", "weight": 0}], r"data\.sources\[0\]\.weight=0: must be a number > 0"),
    ([{"images_dir": ".", "repeat": 2}], r"data\.sources\[0\]: unknown key\(s\) \['repeat'\]"),
    ([{"repeats": 2}], r"data\.sources\[0\]: needs one of images_dir, manifest or cache_dir"),
    ([{"cache_dir": "/nonexistent"}], r"data\.sources\[0\]\.cache_dir='/nonexistent': no latent cache"),
])
def test_source_validation_names_index_and_key(entries, message):
    cfg = get_config("tiny")
    cfg.data.sources = entries
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_sources_and_single_inputs_exclude_each_other():
    cfg = get_config("tiny")
    cfg.data.sources, cfg.data.images_dir = [{"images_dir": "."}], "."
    with pytest.raises(ConfigError, match="data.sources and data.images_dir are both set"):
        validate(cfg)


# ---- the mixed loader ------------------------------------------------------------------------

def _pool_cache(tmp_path_factory, name, n, seed, fingerprint="pool8"):
    images = tmp_path_factory.mktemp(f"{name}_images")
    make_demo_dataset(str(images), n=n, seed=seed, side=160)
    out = str(tmp_path_factory.mktemp(f"{name}_cache"))
    build_cache(_loader_config(), images_dir=str(images), out=out, encode_fn=pool_encode,
                encoder_fingerprint=fingerprint, process_index=0, process_count=1, progress=False)
    return out


def _loader_config(**data):
    cfg = get_config("tiny")
    cfg.train.global_batch_size = 4
    cfg.data.val_fraction = 0.1
    cfg.data.update(data)
    return cfg


@pytest.fixture(scope="module")
def pool_sources(tmp_path_factory):
    return (_pool_cache(tmp_path_factory, "a", 24, 0), _pool_cache(tmp_path_factory, "b", 16, 1))


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_mixed_loader_resumes_exactly_and_splits_over_processes(pool_sources):
    a, b = pool_sources
    sources = [DataSource("a", a, repeats=2), DataSource("b", b, weight=0.5)]
    cfg = _loader_config()
    it = make_train_iterator(cfg, sources, TOKENIZE, debug=True)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
    expected = _take(it, it.steps_per_epoch + 2)  # crosses into the next epoch (a new draw of b)
    it.close()
    restored = make_train_iterator(cfg, sources, TOKENIZE, debug=True)
    _take(restored, 1)
    restored.set_state(state)
    got = _take(restored, len(expected))
    restored.close()
    n_a = len(C.read_index(a).keys)  # a's records come first in the combined index
    for x, y in zip(expected, got):
        assert x["debug"]["keys"] == y["debug"]["keys"] and x["debug"]["captions"] == y["debug"]["captions"]
        for k in ("latents", "time_ids", "loss_weight", "input_ids_l", "source_onehot"):
            np.testing.assert_array_equal(x[k], y[k])
        ids = x["debug"]["record_ids"]
        np.testing.assert_array_equal(x["source_onehot"], np.eye(2, dtype=np.float32)[(ids >= n_a).astype(int)])
    seen = np.concatenate([x["source_onehot"] for x in expected]).sum(0)
    assert seen[0] > 0 and seen[1] > 0
    # two processes: each its half of every global batch, the same plan
    halves = []
    for p in (0, 1):
        it = make_train_iterator(cfg, sources, TOKENIZE, p, 2, debug=True)
        halves.append(_take(it, 4))
        it.close()
    for g, h0, h1 in zip(expected_from_start(cfg, sources), *halves):
        np.testing.assert_array_equal(np.concatenate([h0["debug"]["record_ids"], h1["debug"]["record_ids"]]),
                                      g["debug"]["record_ids"])
        np.testing.assert_array_equal(np.concatenate([h0["source_onehot"], h1["source_onehot"]]), g["source_onehot"])


def expected_from_start(cfg, sources):
    it = make_train_iterator(cfg, sources, TOKENIZE, debug=True)
    out = _take(it, 4)
    it.close()
    return out


def test_single_source_list_is_the_plain_cache_and_mismatches_are_named(pool_sources, tmp_path_factory):
    a, b = pool_sources
    cfg = _loader_config()
    plain = make_train_iterator(cfg, a, TOKENIZE)
    listed = make_train_iterator(cfg, [DataSource("a", a)], TOKENIZE)
    assert plain.get_state() == listed.get_state()  # same plan id: old checkpoints still resume
    x, y = next(plain), next(listed)
    assert "source_onehot" not in y and x.keys() == y.keys()
    np.testing.assert_array_equal(x["latents"], y["latents"])
    mixed = make_train_iterator(cfg, [DataSource("a", a), DataSource("b", b, repeats=2)], TOKENIZE)
    assert mixed.get_state()["plan_id"] != plain.get_state()["plan_id"]
    for it in (plain, listed, mixed):
        it.close()
    other = _pool_cache(tmp_path_factory, "c", 4, 2, fingerprint="another-vae")
    with pytest.raises(ValueError, match=r"data sources 'a' .* and 'c' .* different latent "
                                         r"settings: VAE pool8 vs another-vae"):
        make_train_iterator(cfg, [DataSource("a", a), DataSource("c", other)], TOKENIZE)


# ---- one tiny training run over two sources -------------------------------------------------

def _scalars(tb_dir):
    """{tag: [(step, value)]} from tensorboardX event files (TFRecord framing, Event protos)."""
    from tensorboardX.proto import event_pb2
    out = {}
    for f in sorted(os.listdir(tb_dir)):
        data = open(os.path.join(tb_dir, f), "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack_from("<Q", data, pos)
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_two_source_run_resumes_bitwise_and_logs_each_source(demo_cache, tmp_path):
    """demo_cache (48 images, repeats 1) and 12 other demo images (repeats 2 from the kohya
    folder name, cache built by the run): 2 steps straight, and a run killed right after its
    step-1 checkpoint (the straight run's checkpoints without step 2) resumed, give the same
    batches, losses and params bitwise; train/loss_<source> is logged to TensorBoard."""
    from sdxl_jax.train.loop import train
    small = tmp_path / "2_small"
    make_demo_dataset(str(small), n=12, seed=1)
    cfg = tiny_config(**{"train.steps": 2, "checkpoint.every_steps": 1, "data.sources": (
        {"cache_dir": demo_cache, "name": "demo"},
        {"images_dir": str(small), "cache_dir": str(tmp_path / "small_cache")})})
    validate(cfg)
    assert [(s.name, s.repeats) for s in resolve_sources(cfg, str(tmp_path))] == [("demo", 1), ("small", 2)]
    log_a, metrics = [], []
    straight = train(cfg, str(tmp_path / "straight"), batch_log=log_a, metrics_log=metrics)
    wd, log_b = str(tmp_path / "killed"), []
    shutil.copytree(tmp_path / "straight" / "checkpoints", os.path.join(wd, "checkpoints"))
    shutil.rmtree(os.path.join(wd, "checkpoints", "2"))
    resumed = train(cfg, wd, batch_log=log_b)
    assert resumed["start_step"] == 1 and resumed["end_step"] == 2
    assert log_b == log_a[1:]
    assert resumed["losses"] == straight["losses"][1:]
    for tree in ("params", "ema_params"):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(getattr(straight["state"], tree)),
                     jax.device_get(getattr(resumed["state"], tree)))
    counts = np.sum([m["loss_source_count"] for _, m in metrics], axis=0)
    assert counts.sum() == 2 * 8 and (counts > 0).all()
    for _, m in metrics:  # the per-source sums split the batch's loss
        np.testing.assert_allclose(m["loss_source_sum"].sum() / 8, m["loss"], rtol=1e-5)
    tags = _scalars(os.path.join(tmp_path, "straight", "tb"))
    assert {"train/loss_demo", "train/loss_small"} <= set(tags), sorted(tags)
    assert all(np.isfinite(v) for _, v in tags["train/loss_demo"] + tags["train/loss_small"])
