"""TFDS datasets as a cache-builder source: the cache of a TFDS ArrayRecord dataset
equals the folder-source cache of the same images, bit for bit.

The dataset is written here, without TensorFlow, by a GeneratorBasedBuilder in the ArrayRecord
format from the generated demo images: each record holds the image file's bytes (an Image
feature), the same pixels decoded (a uint8 array feature), the .txt caption (Text, read back as
bytes) and the tag list (a nested Sequence of Text).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image, ImageOps

from data_tools.bench_loader import pool_encode
from data_tools.make_demo_dataset import make_demo_dataset
from sdxl_jax.data import cache as C
from sdxl_jax.data.build import build_cache
from sdxl_jax.data.buckets import fit_cover
from sdxl_jax.data.images import BadInput, load_pixels, probe_size
from sdxl_jax.data.tags import normalize_tags
from sdxl_jax.data.tfds_source import TfdsInput, caption_text, parse_tfds_spec, tfds_from_config
from tests.helpers import tiny_config


N = 12  # demo images; with the EXIF-rotated JPEG added, the split holds N + 1 records
ROTATED_FROM = "00005.png"  # a 4:3 demo image (170×128), shapes on a background
NAME = "sdxl_demo_images"  # the snake-case name of the builder class below


def config():
    # center crops: a random crop is seeded by the record key, and a TFDS record is keyed by
    # its index ("train/00000003") where the folder source uses the file name ("00003.webp")
    return tiny_config(**{"data.buckets.crop": "center", "data.shard_size": 8,
                          "data.build_batch_size": 4, "data.decode_workers": 2})


def build(out, **kw):
    return build_cache(config(), out=str(out), encode_fn=pool_encode, encoder_fingerprint="pool8",
                       process_index=0, process_count=1, progress=False, **kw)


def read_all(cache_dir) -> dict:
    """{key: record} over every shard, through the trainer's own reader."""
    index = C.read_index(str(cache_dir))
    source = C.RecordSource(index.files, index.counts)
    return {r["key"]: r for r in (C.decode_record(source[i]) for i in range(len(source)))}


def write_tfds(images: Path, data_dir: Path) -> None:
    """The demo images as a TFDS dataset "sdxl_demo_images" (splits train and odd)."""
    files = sorted(p for p in images.iterdir() if p.suffix in (".png", ".jpg", ".webp"))
    train = [(p.name, {"file_name": p.name, "image": p.read_bytes(),  # the file, undecoded
                       "pixels": np.asarray(ImageOps.exif_transpose(Image.open(p)).convert("RGB")),
                       "caption": p.with_suffix(".txt").read_text(encoding="utf-8"),
                       "meta": {"tags": normalize_tags(p.with_suffix(".txt").read_text())}})
             for p in files]
    good = dict(train[1][1], file_name="good")
    odd = [("0", good),
           ("1", dict(good, file_name="garbage", image=b"this is not an image")),
           ("2", dict(good, file_name="latin1", caption=b"caf\xe9"))]  # not UTF-8
    features = tfds.features.FeaturesDict({
        "file_name": tfds.features.Text(),
        "image": tfds.features.Image(),
        "pixels": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="zlib"),
        "caption": tfds.features.Text(),
        "meta": {"tags": tfds.features.Sequence(tfds.features.Text())},
    })

    class SdxlDemoImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {"train": iter(train), "odd": iter(odd)}

        def _generate_examples(self):
            raise NotImplementedError  # the splits are given whole above

    SdxlDemoImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(images, TFDS data dir, {TFDS key: file name}, folder cache records, TFDS cache, root)."""
    root = tmp_path_factory.mktemp("tfds")
    images, data_dir = root / "images", root / "tfds_data"
    make_demo_dataset(str(images), N, 0, 128)
    # displayed rotated by 90°: the EXIF tag only takes effect when Pillow decodes the file bytes
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(images / ROTATED_FROM).convert("RGB").save(images / "rotated.jpg", quality=95, exif=exif)
    (images / "rotated.txt").write_text("rotated, red circle\n")
    write_tfds(images, data_dir)
    ds = tfds.data_source(NAME, split="train", data_dir=str(data_dir), download=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
    names = {f"train/{i:08d}": ds[i]["file_name"].decode() for i in range(len(ds))}
    folder = build(root / "folder", images_dir=str(images))
    assert folder["num_records"] == N + 1 and folder["num_skipped"] == 0
    cached = build(root / "a", tfds=TfdsInput(NAME, "train", str(data_dir)))
    return images, data_dir, names, read_all(root / "folder"), cached, root


def assert_same_images(recs: dict, ref: dict, names: dict) -> None:
    """Latents bitwise, tags and time_ids equal to the folder cache's record of the same file."""
    assert sorted(recs) == sorted(names) and sorted(names.values()) == sorted(ref)
    for key, rec in recs.items():
        want = ref[names[key]]
        assert rec["latent"].dtype == want["latent"].dtype
        assert rec["latent"].tobytes() == want["latent"].tobytes(), key
        assert rec["tags"] == want["tags"]
        np.testing.assert_array_equal(rec["time_ids"], want["time_ids"])


def test_image_bytes_cache_equals_folder_cache(demo):
    images, data_dir, names, ref, m, root = demo
    assert m["num_records"] == N + 1 and m["num_skipped"] == 0
    assert m["bucket_counts"] == C.load_manifest(str(root / "folder"))["bucket_counts"]
    assert m["settings"]["source"] == f"tfds:{NAME}/1.0.0:train@{data_dir} image=image caption=caption"
    recs = read_all(root / "a")
    assert sorted(recs) == [f"train/{i:08d}" for i in range(N + 1)]
    assert_same_images(recs, ref, names)
    (rotated,) = [recs[k] for k, n in names.items() if n == "rotated.jpg"]
    with Image.open(images / ROTATED_FROM) as img:  # original (h, w) = the unrotated (w, h)
        assert rotated["time_ids"][:2].tolist() == [img.width, img.height] != [img.height, img.width]
    for key, rec in recs.items():  # Text features come back as bytes: decoded to the same str
        txt = (images / names[key]).with_suffix(".txt").read_text(encoding="utf-8")
        assert rec["caption"] == ref[names[key]]["caption"] == txt
    assert {Path(n).suffix for n in names.values()} == {".png", ".jpg", ".webp"}


def test_reading_imports_no_tensorflow(demo):
    """Opening the split and reading a record leaves TensorFlow unimported (a fresh process,
    so that no other test's imports count)."""
    _, data_dir, _, _, _, _ = demo
    code = ("import sys; from sdxl_jax.data.tfds_source import open_tfds, TfdsInput; "
            f"srcs, _ = open_tfds(TfdsInput({NAME!r}, 'train', {str(data_dir)!r})).sources(); "
            "image, caption = srcs[0].read(); "
            "print(type(image).__name__, len(image), 'tensorflow' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    first = sorted((data_dir.parent / "images").glob("0*.*"))[0]  # record 0 is 00000.png
    assert run.stdout.split() == ["bytes", str(first.stat().st_size), "False"]


def test_pixel_array_and_tag_list_features(demo, monkeypatch):
    images, data_dir, names, ref, _, root = demo
    monkeypatch.setenv("TFDS_DATA_DIR", str(data_dir))  # TFDS's default data dir
    inp = tfds_from_config({"tfds": NAME}, image_key="pixels", caption_key="meta/tags")
    m = build(root / "b", tfds=inp)
    assert m["num_records"] == N + 1 and m["num_skipped"] == 0
    assert m["settings"]["source"] == f"tfds:{NAME}/1.0.0:train@{data_dir} image=pixels caption=meta/tags"
    recs = read_all(root / "b")
    assert_same_images(recs, ref, names)
    for key, rec in recs.items():  # the tag list joined into one caption
        tags = normalize_tags((images / names[key]).with_suffix(".txt").read_text())
        assert rec["caption"] == ", ".join(tags)


def test_resume_and_settings_guard(demo):
    _, data_dir, _, _, m, root = demo
    calls = []

    def counting(x):
        calls.append(len(x))
        return pool_encode(x)

    again = build_cache(config(), out=str(root / "a"), tfds=TfdsInput(NAME, "train", str(data_dir)),
                        encode_fn=counting, encoder_fingerprint="pool8", process_index=0,
                        process_count=1, progress=False)
    assert calls == [] and again["shards"] == m["shards"]  # every shard kept, nothing re-encoded
    with pytest.raises(ValueError, match=r"different settings \(source\)"):
        build(root / "a", tfds=TfdsInput(NAME, "train", str(data_dir), caption_key="meta/tags"))


def test_bad_records_are_skipped_with_reasons(demo):
    _, data_dir, names, ref, _, root = demo
    out = root / "odd"
    m = build(out, tfds=TfdsInput(NAME, "odd", str(data_dir)))
    assert m["num_records"] == 1 and m["num_skipped"] == 2
    skipped = [json.loads(line) for line in (out / C.SKIPPED).read_text().splitlines()]
    assert skipped == [
        {"key": "odd/00000001", "path": f"tfds:{NAME}/1.0.0:odd[1]",
         "reason": "not an image (unrecognised format)"},
        {"key": "odd/00000002", "path": f"tfds:{NAME}/1.0.0:odd[2]",
         "reason": "caption not UTF-8 (unexpected end of data at byte 3)"}]
    (rec,) = read_all(out).values()  # record 0 holds train record 1's image
    assert rec["key"] == "odd/00000000"
    assert rec["latent"].tobytes() == ref[names["train/00000001"]]["latent"].tobytes()


@pytest.mark.parametrize("name", [NAME, "mnist"])  # unknown to TFDS; registered but not prepared
def test_not_prepared_error_names_dataset_dir_and_command(tmp_path, name):
    nodata = tmp_path / "nodata"
    with pytest.raises(FileNotFoundError) as e:
        build(tmp_path / "c", tfds=TfdsInput(name, data_dir=str(nodata)))
    msg = str(e.value)
    assert f"TFDS dataset '{name}' is not prepared in {nodata} (" in msg and "\n" not in msg
    assert f"`tfds build {name} --data_dir {nodata} --file_format array_record`" in msg
    assert not (tmp_path / "c").exists()  # refused before any work


def test_unusable_dataset_errors(demo, tmp_path):
    _, data_dir, _, _, _, _ = demo
    with pytest.raises(ValueError, match=r"no feature 'text' for the caption \(features: caption, file_name, "
                                         r"image, meta, meta/tags, pixels\); pass --caption-key"):
        build(tmp_path / "c", tfds=TfdsInput(NAME, data_dir=str(data_dir), caption_key="text"))
    with pytest.raises(ValueError, match=r"split 'validation'.*Unknown split"):
        build(tmp_path / "c", tfds=TfdsInput(NAME, "validation", str(data_dir)))
    # the same dataset declared as TFRecord files: no random access without TensorFlow
    copy = tmp_path / "tfrecord"
    shutil.copytree(data_dir, copy)
    info = copy / NAME / "1.0.0" / "dataset_info.json"
    info.write_text(info.read_text().replace('"fileFormat": "array_record"', '"fileFormat": "tfrecord"'))
    with pytest.raises(ValueError, match=r"stored as tfrecord.*`tfds convert_format --dataset_dir "):
        build(tmp_path / "c", tfds=TfdsInput(NAME, data_dir=str(copy)))
    with pytest.raises(ValueError, match="give exactly one input"):
        build(tmp_path / "c", images_dir=str(tmp_path), tfds=NAME)
    assert not (tmp_path / "c").exists()


def test_cli_flags_reach_the_tfds_reader(demo, tmp_path):
    """--tfds, --tfds-data-dir and --caption-key arrive: the dataset is found there, and the
    missing caption feature is reported in one line (exit 1, no traceback)."""
    _, data_dir, _, _, _, _ = demo
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-m", "data_tools.build_cache", f"--tfds={NAME}:train",
         f"--tfds-data-dir={data_dir}", "--caption-key=text", f"--out={tmp_path / 'c'}",
         "--config=configs/ztsnr.py:tiny"],
        cwd=root, capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k != "SDXL_JAX_DEBUG"})
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        f"error: TFDS dataset '{NAME}/1.0.0' has no feature 'text' for the caption (features: "
        "caption, file_name, image, meta, meta/tags, pixels); pass --caption-key")
    assert "Traceback" not in run.stderr and not (tmp_path / "c").exists()


@pytest.mark.parametrize("spec, name, split", [
    ("ds", "ds", "train"),
    ("ds:test", "ds", "test"),
    ("ds/cfg:1.2.0", "ds/cfg:1.2.0", "train"),
    ("ds/cfg:1.2.0:train[:10%]", "ds/cfg:1.2.0", "train[:10%]"),
    ("ds:train[10:20]+test", "ds", "train[10:20]+test"),
])
def test_parse_tfds_spec(spec, name, split):
    assert parse_tfds_spec(spec) == TfdsInput(name, split)


def test_parse_tfds_spec_rejects_and_config_defaults():
    for bad in ("", ":train", "my ds"):
        with pytest.raises(ValueError, match="expected NAME\\[:SPLIT\\]"):
            parse_tfds_spec(bad)
    assert tfds_from_config({}) is None and tfds_from_config({"tfds": ""}) is None
    assert tfds_from_config({"tfds": "ds:test", "tfds_data_dir": "/d", "tfds_caption_key": "text"}) == \
        TfdsInput("ds", "test", "/d", "image", "text")
    assert tfds_from_config({"tfds": "x"}, "ds", "/e", "img", "cap") == TfdsInput("ds", "train", "/e", "img", "cap")


def test_caption_values():
    assert caption_text("red circle, 1 shape") == "red circle, 1 shape"
    assert caption_text(b"caf\xc3\xa9") == "café"
    assert caption_text([b"red circle", "1 shape"]) == "red circle, 1 shape"
    assert caption_text(np.array([b"a", b"b"], dtype=object)) == "a, b"
    assert caption_text(np.array(b"one", dtype=object)) == "one"
    with pytest.raises(BadInput, match="caption of type int"):
        caption_text(3)
    with pytest.raises(BadInput, match="caption not UTF-8"):
        caption_text([b"\xff"])


def test_pixel_arrays_and_bytes_load_like_the_same_image_file(tmp_path):
    """Grey (h, w) and (h, w, 1), RGB and RGBA (composited over white) arrays, and a file's
    bytes, give the pixels that the file on disk gives."""
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (40, 50, 4), dtype=np.uint8)
    fit = fit_cover(50, 40, (64, 64), "center")
    for arr in (rgba[:, :, 0], rgba[:, :, :1], rgba[:, :, :3], rgba):
        path = tmp_path / f"x{arr.ndim}_{arr.shape[-1]}.png"
        Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr).save(path)
        want = load_pixels(str(path), 10**6, fit, (64, 64))
        for image in (arr, path.read_bytes()):
            assert probe_size(image, 10**6) == (50, 40)
            np.testing.assert_array_equal(load_pixels(image, 10**6, fit, (64, 64)), want)
    with pytest.raises(BadInput, match=r"dtype float32: expected uint8 \(h, w\) or \(h, w, 1\|3\|4\)"):
        probe_size(np.zeros((4, 4, 3), np.float32), 10**6)
    with pytest.raises(BadInput, match="too many pixels: 50x40 = 2000 > data.max_image_pixels = 100"):
        probe_size(rgba, 100)
    with pytest.raises(BadInput, match=r"empty image \(0 bytes\)"):
        probe_size(b"", 10**6)
