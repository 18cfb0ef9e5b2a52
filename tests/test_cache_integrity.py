"""Cache integrity: a truncated, deleted or corrupted shard is named
with the fix when the cache is opened or read, a build_cache rerun rebuilds exactly the damaged
shard, and a build that caches nothing is an error pointing at skipped.jsonl.

The latents come from data_tools.bench_loader.pool_encode (8×8 average pooling, no VAE to
compile): integrity does not depend on the encoder.
"""
import shutil

import numpy as np
import pytest
from helpers import tiny_config

from data_tools.bench_loader import fake_tokenize, pool_encode
from sdxl_jax.data import cache as C
from sdxl_jax.data import make_train_iterator
from sdxl_jax.data.build import build_cache
from sdxl_jax.data.demo import make_demo_dataset

N, SHARD, BATCH = 16, 4, 4  # 4 shards of 4 images, one encoder call per shard


def config():
    cfg = tiny_config()
    cfg.data.shard_size, cfg.data.build_batch_size, cfg.data.decode_workers = SHARD, BATCH, 2
    return cfg


def build(images, out, calls=None, **kw):
    def encode(x):
        if calls is not None:
            calls.append(len(x))
        return pool_encode(x)
    return build_cache(config(), images_dir=str(images), out=str(out), encode_fn=encode,
                       encoder_fingerprint="pool8", process_index=0, process_count=1,
                       progress=False, **kw)


def latents(cache_dir) -> dict:
    """{key: latent} of every record, read through the loader's RecordSource."""
    index = C.read_index(str(cache_dir))
    src = C.RecordSource(index.files, index.counts)
    out = {}
    for i in range(len(src)):
        rec = C.decode_record(src[i])
        out[rec["key"]] = np.array(rec["latent"])
    src.close()
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    images = tmp_path_factory.mktemp("images")
    make_demo_dataset(str(images), n=N)
    out = tmp_path_factory.mktemp("ref") / "cache"
    manifest = build(images, out)
    assert [s["count"] for s in manifest["shards"]] == [SHARD] * (N // SHARD)
    return images, out, manifest, latents(out)


@pytest.fixture
def copy(reference, tmp_path):
    """A fresh copy of the reference cache and the path of its second shard."""
    images, ref, manifest, _ = reference
    out = tmp_path / "cache"
    shutil.copytree(ref, out)
    return out, out / (manifest["shards"][1]["name"] + C.SHARD_EXT)


@pytest.mark.parametrize("damage, reason", [("truncate", r"\d+ bytes, \d+ when written"),
                                            ("delete", "file missing")])
def test_damaged_shard_is_named_on_open_and_rebuilt_by_a_rerun(reference, copy, damage, reason):
    images, _, manifest, ref_latents = reference
    out, shard = copy
    if damage == "truncate":
        data = shard.read_bytes()
        shard.write_bytes(data[:len(data) // 2])
    else:
        shard.unlink()
    want = f"cache shard {shard}: {reason}.*rerun build_cache .*--images {images} --out {out}"
    with pytest.raises(C.CacheError, match=want):
        C.read_index(str(out))
    with pytest.raises(C.CacheError, match=want):  # what the trainer's loader sees
        make_train_iterator(config(), str(out), fake_tokenize(1), global_batch_size=8)
    calls = []
    again = build(images, out, calls)
    assert calls == [BATCH]  # exactly the damaged shard's 4 images were encoded again
    assert again["shards"] == manifest["shards"] and again["num_records"] == N
    got = latents(out)
    assert got.keys() == ref_latents.keys()
    assert all(np.array_equal(got[k], ref_latents[k]) for k in ref_latents)


def test_corrupted_bytes_are_named_on_read_and_rebuilt_with_verify(reference, copy):
    images, _, _, ref_latents = reference
    out, shard = copy
    data = bytearray(shard.read_bytes())
    data[1000:1016] = b"\xff" * 16  # inside the first record (~2 KiB): same size, same count
    shard.write_bytes(bytes(data))
    index = C.read_index(str(out))  # size and count still match: opening cannot tell
    src = C.RecordSource(index.files, index.counts)
    with pytest.raises(C.CacheError, match=rf"cache shard {shard}: record 0 is unreadable "
                                           r"\(.*hash mismatch.*rerun build_cache .*--verify"):
        src[SHARD]  # the first record of the second shard
    src.close()
    calls = []
    build(images, out, calls)
    assert calls == []  # a plain rerun checks sizes and counts only (cheap on a large cache)
    build(images, out, calls, verify=True)
    assert calls == [BATCH]
    got = latents(out)
    assert all(np.array_equal(got[k], ref_latents[k]) for k in ref_latents)


def test_a_cache_of_zero_records_is_an_error_naming_skipped_jsonl(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.png").write_bytes(b"not a png")
        (images / f"{i}.txt").write_text("red circle")
    out = tmp_path / "cache"
    with pytest.raises(C.CacheError, match=rf"0 images cached in {out}: all 3 inputs were "
                                           rf"skipped; .* in {out / C.SKIPPED}"):
        build(images, out)
    assert len((out / C.SKIPPED).read_text().splitlines()) == 3
    # the manifest exists (the build finished); opening it says the same, not "lower the batch"
    with pytest.raises(C.CacheError, match=rf"holds 0 records.*{out / C.SKIPPED}"):
        make_train_iterator(config(), str(out), fake_tokenize(1), global_batch_size=8)


def test_disk_full_is_one_line_and_the_partial_shard_is_removed(reference, copy):
    """A real ENOSPC from the kernel: the shard a resumed build writes goes to /dev/full (its
    temporary name is a link there), so the writer fails as on a full disk. One line naming the
    folder, no partial shard left; after "freeing space" the rerun completes identically."""
    from sdxl_jax import cli
    images, _, manifest, ref_latents = reference
    out, shard = copy
    (out / (shard.name[:-len(C.SHARD_EXT)] + ".json")).unlink()  # the shard is not finished yet
    shard.unlink()
    tmp = out / (shard.name + ".tmp")
    tmp.symlink_to("/dev/full")
    with pytest.raises(SystemExit) as e:
        cli.run(lambda argv: build(images, out), [])
    assert e.value.code == (f"error: no space left on {out}; the shard being written was removed, "
                            "the finished ones are kept: free space and rerun the same command "
                            "to continue")
    assert not tmp.is_symlink() and not tmp.exists() and not shard.exists()
    calls = []
    again = build(images, out, calls)
    assert calls == [BATCH] and again["shards"] == manifest["shards"]
    got = latents(out)
    assert got.keys() == ref_latents.keys()
    assert all(np.array_equal(got[k], ref_latents[k]) for k in ref_latents)


def test_a_second_build_on_the_same_folder_exits_naming_the_first(reference, tmp_path):
    """Two build_cache on one --out raced on the same *.array_record.tmp; the second now stops
    at once, naming the first (another process holding the folder's lock)."""
    import os
    import subprocess
    import sys
    from sdxl_jax.workdir_lock import WorkdirLockedError
    images = reference[0]
    out = tmp_path / "cache"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from sdxl_jax.data.build import CacheLock; "
         "lock = CacheLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)",
         str(out)], cwd=repo, env={**os.environ, "PYTHONPATH": repo}, stdout=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirLockedError,
                           match=rf"cache folder {out} is being built by another build_cache "
                                 rf"\(pid {holder.pid} on host .*build_cache\.0\.lock\): wait"):
            build(images, out)
        assert sorted(p.name for p in out.iterdir()) == ["build_cache.0.lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    assert build(images, out)["num_records"] == N  # the lock dies with its holder


def test_masks_added_after_a_build_are_named_with_rebuild(tmp_path, caplog):
    """A resumed build keeps finished shards: a mask file added since is not cached (num_masked
    stays 0), and the build says so, naming --rebuild; the rebuild caches it."""
    from PIL import Image
    images = tmp_path / "images"
    make_demo_dataset(str(images), n=4)
    out = tmp_path / "cache"
    assert build(images, out)["num_masked"] == 0
    first = sorted(images.glob("*.png"))[0]
    mask = first.with_name(first.stem + ".mask.png")
    Image.new("L", Image.open(first).size, 255).save(mask)
    with caplog.at_level("WARNING", logger="sdxl_jax.data.build"):
        assert build(images, out)["num_masked"] == 0
    warned = [r.getMessage() for r in caplog.records if "mask" in r.getMessage()]
    assert warned == [f"build_cache: mask files added after {out} was built are not in it (1, "
                      f"e.g. {mask}): a resumed build keeps finished shards as they are; rerun "
                      "with --rebuild to cache them"]
    assert build(images, out, rebuild=True)["num_masked"] == 1
