"""Grain loader over the cache: batch contract, plan properties, processes, exact resume (§7, §9)."""
import json

import numpy as np
import pytest

from configs.ztsnr import get_config
from data_tools.bench_loader import fake_tokenize, pool_encode
from data_tools.make_demo_dataset import make_demo_dataset
from sdxl_jax.data import cache as C
from sdxl_jax.data import make_train_iterator, make_val_iterator
from sdxl_jax.data.build import build_cache
from sdxl_jax.data.pipeline import split_records
from sdxl_jax.data.tags import tag_weights

N = 64
GB = 4  # global batch


def config(**data):
    cfg = get_config("tiny")
    cfg.train.global_batch_size = GB
    cfg.data.val_fraction = 0.1
    cfg.data.prefetch = 2
    cfg.data.update(data)
    return cfg


TOKENIZE = fake_tokenize(1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    images = tmp_path_factory.mktemp("images")
    make_demo_dataset(str(images), n=N, side=160)
    out = tmp_path_factory.mktemp("cache") / "c"
    build_cache(config(), images_dir=str(images), out=str(out), encode_fn=pool_encode,
                encoder_fingerprint="pool8", process_index=0, process_count=1, progress=False)
    return str(out)


@pytest.fixture(scope="module")
def index(cache):
    return C.read_index(cache)


def take(it, n):
    return [next(it) for _ in range(n)]


def same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if k == "debug":
                assert x[k]["captions"] == y[k]["captions"]
                np.testing.assert_array_equal(x[k]["record_ids"], y[k]["record_ids"])
            else:
                np.testing.assert_array_equal(x[k], y[k])


def test_batch_contract(cache, index):
    cfg = config()
    it = make_train_iterator(cfg, cache, TOKENIZE)
    train_ids, _ = split_records(index, cfg.data.val_fraction)
    counts = np.bincount(index.bucket_ids[train_ids], minlength=len(index.buckets))
    usable = {index.buckets[b] for b in range(len(counts)) if counts[b] >= GB}
    assert set(it.batch_sizes) == set(it.latent_shapes) == usable and len(usable) >= 2
    assert set(it.batch_sizes.values()) == {GB}
    assert {(w, h) for w, h in usable} == {(s[1] * 8, s[0] * 8) for s in it.latent_shapes.values()}
    batches = take(it, it.steps_per_epoch)
    assert {b["latents"].shape[1:] for b in batches} == set(it.latent_shapes.values())
    for batch in batches:
        assert set(batch) == {"latents", "time_ids", "loss_weight", "input_ids_l", "input_ids_g"}
        b, h, w, c = batch["latents"].shape
        assert (b, c) == (GB, 4) and batch["latents"].dtype == np.float32
        assert batch["time_ids"].shape == (GB, 6) and batch["time_ids"].dtype == np.float32
        assert (batch["time_ids"][:, 4:] == [h * 8, w * 8]).all()  # target (h, w) = latent ×8
        assert batch["loss_weight"].shape == (GB,) and batch["loss_weight"].dtype == np.float32
        for k in ("input_ids_l", "input_ids_g"):
            assert batch[k].shape == (GB, 77) and batch[k].dtype == np.int32
    it.close()


def read_record(cache, record_id):
    """Record `record_id` (position in the manifest's shard order) read straight from its file."""
    from array_record.python.array_record_module import ArrayRecordReader
    for shard in C.load_manifest(cache)["shards"]:
        if record_id < shard["count"]:
            reader = ArrayRecordReader(f"{cache}/{shard['name']}{C.SHARD_EXT}")
            rec = C.decode_record(reader.read([record_id])[0])
            reader.close()
            return rec
        record_id -= shard["count"]
    raise IndexError(record_id)


def test_raw_latents_and_weights_match_cache(cache, index):
    cfg = config(caption_dropout=0.0, tag_shuffle=False)
    counts = C.read_json(f"{cache}/{C.TAGS}")
    g = cfg.data.tags
    w = tag_weights(index.tags, counts, g.alpha, g.w_min, g.w_max, tuple(g.meta_patterns))
    assert w.std() > 0.05  # the demo's tags are unevenly frequent, so weights differ
    it = make_train_iterator(cfg, cache, TOKENIZE, debug=True)
    for batch in take(it, 3):
        ids = batch["debug"]["record_ids"]
        np.testing.assert_allclose(batch["loss_weight"], w[ids], rtol=1e-6)
        assert batch["debug"]["captions"] == [", ".join(index.tags[i]) for i in ids]
        for j, i in enumerate(ids):
            rec = read_record(cache, int(i))
            np.testing.assert_array_equal(batch["latents"][j], rec["latent"].astype(np.float32))
            np.testing.assert_array_equal(batch["time_ids"][j], rec["time_ids"])
            assert batch["debug"]["keys"][j] == rec["key"] == index.keys[i]
    it.close()
    cfg.loss.tag_weighting = False
    it = make_train_iterator(cfg, cache, TOKENIZE)
    assert all((b["loss_weight"] == 1.0).all() for b in take(it, 5))
    it.close()


def epoch_batches(cache, cfg, epochs, **kw):
    it = make_train_iterator(cfg, cache, TOKENIZE, debug=True, **kw)
    out = take(it, it.steps_per_epoch * epochs)
    it.close()
    return out, it.steps_per_epoch


def test_plan_properties(cache, index):
    cfg = config()
    batches, steps = epoch_batches(cache, cfg, 3)
    train_ids, val_ids = split_records(index, cfg.data.val_fraction)
    counts = np.bincount(index.bucket_ids[train_ids])
    assert steps == sum(c // GB for c in counts)
    seen_by_epoch = {}
    for batch in batches:
        ids = batch["debug"]["record_ids"]
        assert len(set(index.bucket_ids[ids].tolist())) == 1  # one bucket per global batch
        seen_by_epoch.setdefault(batch["debug"]["epoch"], []).extend(ids.tolist())
    assert sorted(seen_by_epoch) == [0, 1, 2]
    for ids in seen_by_epoch.values():
        assert len(ids) == len(set(ids)) == steps * GB  # at most once per epoch, no ragged batch
        assert not set(ids) & set(val_ids.tolist())  # held-out images never train
    # a record left over in one epoch is used in the next: two epochs cover every usable image
    usable = {i for i in train_ids.tolist() if counts[index.bucket_ids[i]] >= GB}
    assert set(seen_by_epoch[0]) | set(seen_by_epoch[1]) == usable
    assert set(seen_by_epoch[1]) | set(seen_by_epoch[2]) == usable
    # deterministic for a seed, different for another seed
    again, _ = epoch_batches(cache, cfg, 3)
    same(batches, again)
    other, _ = epoch_batches(cache, config(seed=1), 1)
    assert [b["debug"]["record_ids"].tolist() for b in other] != \
        [b["debug"]["record_ids"].tolist() for b in batches[:steps]]


def test_two_processes_split_every_global_batch(cache):
    cfg = config()
    full, steps = epoch_batches(cache, cfg, 2)
    parts = [epoch_batches(cache, cfg, 2, process_index=p, process_count=2)[0] for p in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == len(full) == 2 * steps
    for g, a, b in zip(full, *parts):
        assert a["latents"].shape[0] == b["latents"].shape[0] == GB // 2
        for k in ("latents", "time_ids", "loss_weight", "input_ids_l", "input_ids_g"):
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), g[k])
        assert a["debug"]["captions"] + b["debug"]["captions"] == g["debug"]["captions"]


@pytest.mark.parametrize("stop", [3, "epoch_end"])
def test_exact_resume_from_state(cache, stop):
    cfg = config()
    it = make_train_iterator(cfg, cache, TOKENIZE, debug=True)
    stop = it.steps_per_epoch - 1 if stop == "epoch_end" else stop
    take(it, stop)
    state = json.loads(json.dumps(it.get_state()))  # JSON round trip, as in a checkpoint
    expected = take(it, it.steps_per_epoch + 2)  # crosses into the next epoch
    it.close()
    restored = make_train_iterator(cfg, cache, TOKENIZE, debug=True)
    take(restored, 1)  # a fresh iterator that already moved on; set_state must rewind it
    restored.set_state(state)
    same(take(restored, len(expected)), expected)
    restored.close()


def test_state_from_other_data_is_refused(cache):
    it = make_train_iterator(config(), cache, TOKENIZE)
    state = it.get_state()
    it.close()
    other = make_train_iterator(config(seed=5), cache, TOKENIZE)
    with pytest.raises(ValueError, match="data iterator state"):
        other.set_state(state)
    other.close()


def test_validation_iterator(cache, index):
    cfg = config(caption_dropout=1.0)  # must not apply to validation
    _, val_ids = split_records(index, cfg.data.val_fraction)
    assert len(val_ids) == round(0.1 * N)
    runs = []
    for _ in range(2):
        it = make_val_iterator(cfg, cache, TOKENIZE, debug=True)
        runs.append(list(it))
        assert len(runs[-1]) == it.steps_per_epoch > 0
    same(*runs)
    seen = set()
    for batch in runs[0]:
        ids = batch["debug"]["record_ids"]
        assert len(ids) == GB and len(set(index.bucket_ids[ids].tolist())) == 1
        assert batch["debug"]["captions"] == [", ".join(index.tags[i]) for i in ids]
        seen |= set(ids.tolist())
    assert seen == set(val_ids.tolist())
    halves = [list(make_val_iterator(cfg, cache, TOKENIZE, p, 2)) for p in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == len(runs[0])


def test_bad_tokenizer_output_is_named(cache):
    it = make_train_iterator(config(), cache, lambda caps: (np.zeros((len(caps), 10)), np.zeros((1, 77))))
    with pytest.raises(ValueError, match=r"tokenize_fn returned ids_l of shape \(4, 10\)"):
        next(it)
    it.close()


def test_batch_size_scaled_by_bucket_area(cache):
    cfg = config()
    cfg.data.buckets.scale_batch_by_area = True
    it = make_train_iterator(cfg, cache, TOKENIZE, global_batch_size=8)
    # 8·16384/15360 = 8.53 → 9 for 96x160 and 160x96; 8 for the full-area 128x128
    assert {k: v for k, v in it.batch_sizes.items()} == {(96, 160): 9, (128, 128): 8, (160, 96): 9}
    for batch in take(it, it.steps_per_epoch):
        h, w = batch["latents"].shape[1:3]
        assert batch["latents"].shape[0] == it.batch_sizes[(w * 8, h * 8)]
    it.close()
