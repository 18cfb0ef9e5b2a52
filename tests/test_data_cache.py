"""Latent cache: build, manifest, statistics, resume, settings guard, bad inputs (METHODS §7, §10)."""
import io
import json
import os
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from PIL import Image

from configs.ztsnr import get_config
from data_tools.bench_loader import pool_encode
from data_tools.latent_stats import compute_latent_stats
from data_tools.make_demo_dataset import make_demo_dataset
from sdxl_jax.data import cache as C
from sdxl_jax.data.build import build_cache
from sdxl_jax.data.buckets import Fit, buckets_from_config, fit_cover
from sdxl_jax.data.images import load_pixels
from sdxl_jax.data.tags import normalize_tags

N_DEMO = 40


def tiny_config(**data):
    cfg = get_config("tiny")
    cfg.data.shard_size = 8
    cfg.data.build_batch_size = 4
    cfg.data.decode_workers = 2
    cfg.data.update(data)
    return cfg


def build(cfg, out, fingerprint="pool8", encode=pool_encode, **kw):
    return build_cache(cfg, out=str(out), encode_fn=encode, encoder_fingerprint=fingerprint,
                       process_index=0, process_count=1, progress=False, **kw)


def read_all(cache_dir):
    """{key: record} over every shard, via the plain ArrayRecord reader."""
    out = {}
    for shard in C.load_manifest(cache_dir)["shards"]:
        reader = ArrayRecordReader(str(Path(cache_dir) / (shard["name"] + C.SHARD_EXT)))
        for raw in reader.read(list(range(reader.num_records()))):
            rec = C.decode_record(raw)
            out[rec["key"]] = rec
        reader.close()
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    images = tmp_path_factory.mktemp("demo_images")
    make_demo_dataset(str(images), n=N_DEMO, side=160)
    out = tmp_path_factory.mktemp("cache") / "c"
    manifest = build(tiny_config(), out, images_dir=str(images))
    return images, out, manifest


def test_manifest_contents(demo):
    images, out, m = demo
    assert m == C.load_manifest(str(out))
    assert m["num_records"] == N_DEMO and m["num_skipped"] == 0
    assert (out / C.SKIPPED).read_text() == ""
    assert sum(m["bucket_counts"].values()) == N_DEMO
    assert sum(s["count"] for s in m["shards"]) == N_DEMO
    assert m["vae_fingerprint"] == "pool8" and m["settings"]["crop"] == "random"
    assert m["buckets"] == [[96, 160], [128, 128], [160, 96]]  # the tiny preset's three
    assert m["settings"]["latents_dtype"] == "float16"
    # tag frequencies equal a count over the caption files, done here independently
    expected = Counter()
    for txt in images.glob("*.txt"):
        expected.update(set(normalize_tags(txt.read_text())))
    assert C.read_json(out / C.TAGS) == dict(expected)
    assert m["tag_stats"]["num_tags"] == len(expected)


def test_records_match_images(demo):
    images, out, m = demo
    cfg = tiny_config()
    buckets = buckets_from_config(cfg.data.buckets)
    recs = read_all(str(out))
    assert sorted(recs) == sorted(p.name for p in images.iterdir() if p.suffix not in (".txt", ".json"))
    for key in ("00001.png", "00002.jpg", "00003.webp"):
        rec = recs[key]
        with Image.open(images / key) as img:
            w, h = img.size
        orig_h, orig_w, top, left, th, tw = rec["time_ids"].tolist()
        assert (orig_h, orig_w) == (h, w) and (tw, th) in buckets
        assert rec["tags"] == normalize_tags((images / key).with_suffix(".txt").read_text())
        assert rec["latent"].dtype == np.float16 and rec["latent"].shape == (th // 8, tw // 8, 4)
        resized = fit_cover(w, h, (int(tw), int(th)), "center").resized
        pixels = load_pixels(str(images / key), 10**8, Fit(resized, int(top), int(left)), (int(tw), int(th)))
        expect = pool_encode(pixels[None])[0][0]
        np.testing.assert_allclose(rec["latent"], expect, atol=2e-3)


def test_latent_stats_equal_numpy(demo):
    _, out, m = demo
    lat = np.concatenate([r["latent"].astype(np.float64).reshape(-1, 4) for r in read_all(str(out)).values()])
    np.testing.assert_allclose(m["latent_stats"]["mean"], lat.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(m["latent_stats"]["std"], lat.std(0), rtol=1e-10)
    assert m["latent_stats"]["count"] == len(lat)
    again = compute_latent_stats(str(out))
    np.testing.assert_allclose(again.mean, lat.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(again.std, lat.std(0), rtol=1e-10)


class Interrupt(Exception):
    pass


def test_resume_after_interruption(demo, tmp_path):
    images, ref_out, ref = demo
    calls = {"n": 0}

    def dying(x):
        calls["n"] += 1
        if calls["n"] == 5:  # shard_size 8, batch 4: two shards are complete by then
            raise Interrupt("simulated crash")
        return pool_encode(x)

    out = tmp_path / "c"
    with pytest.raises(Interrupt):
        build(tiny_config(), out, encode=dying, images_dir=str(images))
    assert not (out / C.MANIFEST).exists()
    done = list(out.glob("b*.json"))  # shard summaries
    assert 1 <= len(done) < len(ref["shards"])
    encoded = []

    def counting(x):
        encoded.append(len(x))
        return pool_encode(x)

    m = build(tiny_config(), out, encode=counting, images_dir=str(images))
    shard_counts = {s["name"]: s["count"] for s in ref["shards"]}
    resumed = N_DEMO - sum(shard_counts[p.stem] for p in done)
    # re-encoded exactly the unfinished shards (batches padded to 4)
    assert len(encoded) == sum(-(-c // 4) for n, c in shard_counts.items()
                               if n not in {p.stem for p in done})
    assert resumed < N_DEMO
    assert m["num_records"] == N_DEMO and m["shards"] == ref["shards"]
    a, b = read_all(str(out)), read_all(str(ref_out))
    assert all(np.array_equal(a[k]["latent"], b[k]["latent"]) for k in b)


def test_refuses_other_settings_unless_rebuild(demo, tmp_path):
    images, _, _ = demo
    out = tmp_path / "c"
    build(tiny_config(), out, images_dir=str(images))
    with pytest.raises(ValueError, match=r"different settings \(vae\).*--rebuild"):
        build(tiny_config(), out, fingerprint="another-vae", images_dir=str(images))
    cfg = tiny_config()
    cfg.data.buckets.max_ar_error = 0.3
    with pytest.raises(ValueError, match="max_ar_error"):
        build(cfg, out, images_dir=str(images))
    m = build(tiny_config(), out, fingerprint="another-vae", rebuild=True, images_dir=str(images))
    assert m["vae_fingerprint"] == "another-vae" and m["num_records"] == N_DEMO


# ---- bad inputs --------------------------------------------------------------------------------

def _png_header_bomb(w, h):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (w + 1)))
            + chunk(b"IEND", b""))


def _noise(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


GOOD_CAPTION = "good, test image"


def make_bad_folder(root: Path) -> tuple[dict[str, str], set[str]]:
    """Broken and unusual files; returns ({bad name: reason substring}, good names)."""
    root.mkdir(parents=True, exist_ok=True)
    sub = root / "nested" / "deeper"
    sub.mkdir(parents=True)
    bad, good = {}, set()

    def caption(name, text=GOOD_CAPTION):
        (root / name).with_suffix(".txt").write_text(text)

    def add_good(name, img, **save):
        img.save(root / name, **save)
        caption(name)
        good.add(name)

    add_good("rgb.png", Image.new("RGB", (200, 160), (255, 0, 0)))
    add_good("cmyk.jpg", Image.new("CMYK", (200, 160), (0, 255, 255, 0)), quality=95)
    pal = Image.new("P", (200, 200), 0)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (0, 0, 200, 100))  # top half colour 1 (blue), bottom half index 0 (transparent)
    add_good("palette.png", pal, transparency=0)
    add_good("alpha.png", Image.new("RGBA", (200, 200), (0, 0, 0, 0)))
    add_good("la.png", Image.new("LA", (200, 200), (0, 255)))
    add_good("gray16.png", Image.fromarray(np.full((160, 200), 0x8080, np.uint16)))
    add_good("bilevel.png", Image.new("1", (200, 160), 1))
    rot = Image.new("RGB", (100, 200), (0, 0, 0))
    rot.paste((255, 255, 255), (50, 0, 100, 200))  # stored: left black, right white
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90° clockwise: left half becomes the top
    add_good("exif_rotated.jpg", rot, exif=exif, quality=95)
    add_good("photo.webp", _noise(180, 180), quality=90)
    (sub / "nested.png").parent.mkdir(exist_ok=True)
    Image.new("RGB", (200, 200), (0, 255, 0)).save(sub / "nested.png")
    (sub / "nested.txt").write_text(GOOD_CAPTION)
    good.add("nested/deeper/nested.png")
    (root / "utf8bom.png").write_bytes((root / "rgb.png").read_bytes())
    (root / "utf8bom.txt").write_bytes("\ufeffbom, caption".encode("utf-8"))
    good.add("utf8bom.png")

    buf = io.BytesIO()
    _noise(200, 160).save(buf, "JPEG", quality=90)
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    caption("truncated.jpg")
    bad["truncated.jpg"] = "cannot decode image"
    buf = io.BytesIO()
    _noise(200, 160, 1).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    start = data.index(b"IDAT") + 40
    data[start:start + 2000] = np.random.default_rng(2).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    (root / "corrupt.png").write_bytes(bytes(data))
    caption("corrupt.png")
    bad["corrupt.png"] = "cannot decode image"
    (root / "empty.jpg").write_bytes(b"")
    caption("empty.jpg")
    bad["empty.jpg"] = "empty file"
    (root / "notimage.png").write_bytes(b"this is a text file pretending to be a PNG\n" * 20)
    caption("notimage.png")
    bad["notimage.png"] = "not an image"
    (root / "bomb.png").write_bytes(_png_header_bomb(60000, 60000))
    caption("bomb.png")
    bad["bomb.png"] = "too many pixels"
    Image.new("RGB", (400, 400)).save(root / "large.png")  # over the test's 300·300 limit
    caption("large.png")
    bad["large.png"] = "too many pixels: 400x400"
    Image.new("RGB", (40, 40)).save(root / "small.png")
    caption("small.png")
    bad["small.png"] = "too small"
    Image.new("RGB", (600, 30)).save(root / "extreme.png")
    caption("extreme.png")
    bad["extreme.png"] = "too extreme"
    Image.new("RGB", (200, 200)).save(root / "nocaption.png")
    bad["nocaption.png"] = "missing caption"
    Image.new("RGB", (200, 200)).save(root / "badutf8.png")
    (root / "badutf8.txt").write_bytes(b"\xff\xfe\xfa not utf-8 \xc3\x28")
    bad["badutf8.png"] = "not UTF-8"
    (root / "notes.txt").write_text("a caption file without an image is not an input")
    raw_name = os.path.join(os.fsencode(root), b"latin1-\xe9.png")  # not a UTF-8 file name
    with open(raw_name, "wb") as f:
        f.write((root / "rgb.png").read_bytes())
    bad[ascii(os.fsdecode(b"latin1-\xe9.png"))] = "file name is not valid UTF-8"
    (sub / "loop").symlink_to(root, target_is_directory=True)  # a symlink cycle must not hang
    return bad, good


@pytest.fixture(scope="module")
def bad_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad") / "images"
    bad, good = make_bad_folder(root)
    out = root.parent / "cache"
    cfg = tiny_config(max_image_pixels=300 * 300)
    m = build(cfg, out, images_dir=str(root))
    return root, out, m, bad, good


def test_bad_inputs_are_listed_with_reasons(bad_build):
    root, out, m, bad, good = bad_build
    skipped = [json.loads(line) for line in (out / C.SKIPPED).read_text().splitlines()]
    reasons = {s["key"]: s["reason"] for s in skipped}
    assert set(reasons) == set(bad)
    for name, expect in bad.items():
        assert expect in reasons[name], (name, reasons[name])
    assert m["num_skipped"] == len(bad)
    assert set(read_all(str(out))) == good
    assert m["num_records"] == len(good)


def test_unusual_images_are_converted(bad_build):
    _, out, _, _, _ = bad_build
    recs = read_all(str(out))
    mean = {k: r["latent"].astype(np.float32).reshape(-1, 4).mean(0) for k, r in recs.items()}
    np.testing.assert_allclose(mean["cmyk.jpg"][:3], [1, -1, -1], atol=0.03)  # CMYK red → RGB red
    np.testing.assert_allclose(mean["alpha.png"][:3], [1, 1, 1], atol=1e-3)  # transparent → white
    np.testing.assert_allclose(mean["la.png"][:3], [-1, -1, -1], atol=1e-3)  # opaque black
    np.testing.assert_allclose(mean["gray16.png"][:3], [128 / 127.5 - 1] * 3, atol=1e-3)  # not clipped
    np.testing.assert_allclose(mean["bilevel.png"][:3], [1, 1, 1], atol=1e-3)
    pal = recs["palette.png"]["latent"].astype(np.float32)  # 128x128 bucket → 16x16 latents
    np.testing.assert_allclose(pal[:7, :, :3].mean((0, 1)), [-1, -1, 1], atol=1e-2)  # blue top
    np.testing.assert_allclose(pal[-7:, :, :3].mean((0, 1)), [1, 1, 1], atol=1e-2)  # white bottom
    rot = recs["exif_rotated.jpg"]
    assert rot["time_ids"][:2].tolist() == [100, 200]  # displayed (h, w) after the EXIF rotation
    lat = rot["latent"].astype(np.float32)[..., 3]
    h = lat.shape[0]
    assert lat[: h // 2 - 2].mean() < -0.9 and lat[h // 2 + 2:].mean() > 0.9  # black top, white bottom
    assert recs["utf8bom.png"]["tags"] == ["bom", "caption"]


def test_jsonl_manifest_input(bad_build, tmp_path):
    root, _, _, _, _ = bad_build
    lines = [json.dumps({"path": "rgb.png", "caption": "Red_Square, red square"}),
             json.dumps({"path": str(root / "cmyk.jpg"), "caption": "cmyk"}),
             "{not json",
             json.dumps({"caption": "no path"}),
             json.dumps({"path": "alpha.png"}),
             json.dumps({"path": "missing.png", "caption": "gone"}),
             json.dumps({"path": "empty.jpg", "caption": "empty"})]
    listing = root / "list.jsonl"
    listing.write_text("\n".join(lines) + "\n")
    out = tmp_path / "c"
    m = build(tiny_config(), out, manifest=str(listing))
    recs = read_all(str(out))
    assert set(recs) == {"rgb.png", str(root / "cmyk.jpg")}
    assert recs["rgb.png"]["tags"] == ["red square"]
    reasons = [json.loads(x) for x in (out / C.SKIPPED).read_text().splitlines()]
    text = " | ".join(f"{r['key']}: {r['reason']}" for r in reasons)
    assert len(reasons) == 5 == m["num_skipped"]
    for expect in ("list.jsonl:3: bad manifest line", "list.jsonl:4: bad manifest line",
                   "alpha.png: missing caption", "missing.png: file not found", "empty.jpg: empty file"):
        assert expect in text, text


def test_two_process_build_shares_the_work(demo, tmp_path, monkeypatch):
    """Two builder processes (threads here, meeting at a shared barrier) write one cache."""
    import threading

    from sdxl_jax.data import build as build_module
    images, ref_out, ref = demo
    barrier = threading.Barrier(2, timeout=60)
    monkeypatch.setattr(build_module, "_barrier", lambda name, count: barrier.wait())
    out, results, encoded = tmp_path / "c", {}, {0: 0, 1: 0}

    def run(p):
        def enc(x):
            encoded[p] += 1
            return pool_encode(x)
        results[p] = build_cache(tiny_config(), images_dir=str(images), out=str(out), encode_fn=enc,
                                 encoder_fingerprint="pool8", process_index=p, process_count=2,
                                 progress=False)
    threads = [threading.Thread(target=run, args=(p,)) for p in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == results[1] and results[0]["num_records"] == N_DEMO
    assert encoded[0] > 0 and encoded[1] > 0
    assert {s["name"].split("-")[1] for s in results[0]["shards"]} == {"p0000of0002", "p0001of0002"}
    a, b = read_all(str(out)), read_all(str(ref_out))
    assert sorted(a) == sorted(b)
    assert all(np.array_equal(a[k]["latent"], b[k]["latent"]) for k in b)
    assert results[0]["latent_stats"]["mean"] == pytest.approx(ref["latent_stats"]["mean"], rel=1e-12)


def test_non_finite_latents_are_skipped_not_stored(demo, tmp_path):
    images, _, _ = demo

    def overflowing(x):  # plain white images blow past float16's range
        mean, std = pool_encode(x)
        white = x.reshape(len(x), -1).min(axis=1) > 0.99
        return np.where(white[:, None, None, None], mean * 1e6, mean), std

    m = build(tiny_config(), tmp_path / "c", encode=overflowing, images_dir=str(images))
    white = {p.with_suffix("").name for p in images.glob("*.txt") if "no shapes" in p.read_text()}
    skipped = [json.loads(x) for x in (tmp_path / "c" / C.SKIPPED).read_text().splitlines()]
    assert len(white) >= 2 and {s["key"].split(".")[0] for s in skipped} == white
    assert all("non-finite latent" in s["reason"] for s in skipped)
    assert m["num_records"] == N_DEMO - len(white)
    assert np.isfinite(m["latent_stats"]["mean"]).all()


def test_record_format_round_trip_and_std(demo, tmp_path):
    latent = np.arange(2 * 3 * 4, dtype=np.float16).reshape(2, 3, 4)
    raw = C.encode_record(latent, latent / 10, "Cap, x", ["cap", "x"], np.arange(6), "a/b.png")
    assert b"pickle" not in raw and raw[:4] == b"SXL1"
    rec = C.decode_record(raw)
    np.testing.assert_array_equal(rec["latent"], latent)
    np.testing.assert_array_equal(rec["std"], (latent / 10).astype(np.float16))
    assert (rec["caption"], rec["tags"], rec["key"]) == ("Cap, x", ["cap", "x"], "a/b.png")
    np.testing.assert_array_equal(rec["time_ids"], np.arange(6, dtype=np.float32))
    with pytest.raises(ValueError, match="bad magic"):
        C.decode_record(b"\x80\x04junk")
    images, _, _ = demo
    m = build(tiny_config(store_std=True), tmp_path / "c", images_dir=str(images))
    recs = read_all(str(tmp_path / "c"))
    assert m["settings"]["store_std"] and all(np.all(r["std"] == np.float16(0.1)) for r in recs.values())


def test_rebuild_deletes_only_cache_files(demo, tmp_path):
    images, _, _ = demo
    out = tmp_path / "shared"
    out.mkdir()
    (out / "notes.md").write_text("not part of the cache")
    build(tiny_config(), out, images_dir=str(images))
    (out / C.STATS).write_text("{}")
    m = build(tiny_config(), out, fingerprint="other", rebuild=True, images_dir=str(images))
    assert (out / "notes.md").read_text() == "not part of the cache"
    assert not (out / C.STATS).exists() and m["vae_fingerprint"] == "other"
