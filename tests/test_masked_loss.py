"""Masked loss (METHODS §15): literal masks through the loss, the cache and the loader."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs.ztsnr import get_config
from data_tools.bench_loader import fake_tokenize, pool_encode
from sdxl_jax.data import cache as C
from sdxl_jax.data import make_train_iterator
from sdxl_jax.data.build import build_cache
from sdxl_jax.data.images import list_folder, list_manifest
from sdxl_jax.diffusion import weighted_v_loss

SIDE = 128  # the tiny 128² bucket: no resize, no crop, so the expected masks are literal
LAT = SIDE // 8


# ---- the loss on a literal mask ----------------------------------------------------------------

def test_masked_loss_literal_masks():
    rng = np.random.default_rng(0)
    pred = rng.standard_normal((4, 2, 2, 3)).astype(np.float32)
    tgt = rng.standard_normal((4, 2, 2, 3)).astype(np.float32)
    masks = np.array([[[1, 0], [0, 0]], [[1, 1], [1, 1]], [[0, 0], [0, 0]], [[0.5, 0], [0, 0.25]]],
                     np.float32)[..., None]
    w_snr, w_tag = np.array([0.5, 1.0, 2.0, 1.5], np.float32), np.array([2.0, 1.0, 1.0, 0.5], np.float32)
    loss = jax.jit(functools.partial(weighted_v_loss, loss_type="mse"))
    got = np.asarray(loss(pred, tgt, w_snr, w_tag, mask=masks))
    e = (pred.astype(np.float64) - tgt) ** 2  # float64 reference
    np.testing.assert_allclose(got[0], e[0, 0, 0].mean() * 0.5 * 2.0, rtol=1e-6)  # the one position
    np.testing.assert_allclose(got[1], e[1].mean(), rtol=1e-6)  # all ones: the plain mean
    assert got[2] == 0.0  # nothing counts: 0, not NaN
    np.testing.assert_allclose(got[3], (0.5 * e[3, 0, 0].mean() + 0.25 * e[3, 1, 1].mean()) / 0.75
                               * 1.5 * 0.5, rtol=1e-6)
    # an all-ones mask is the unmasked loss, for the squared error and pseudo-Huber alike
    ones = np.ones_like(masks)
    np.testing.assert_allclose(np.asarray(loss(pred, tgt, w_snr, w_tag, mask=ones)),
                               np.asarray(loss(pred, tgt, w_snr, w_tag)), rtol=1e-6)
    huber = jax.jit(functools.partial(weighted_v_loss, loss_type="huber"))
    c = np.full(4, 0.3, np.float32)
    np.testing.assert_allclose(np.asarray(huber(pred, tgt, w_snr, huber_c=c, mask=ones)),
                               np.asarray(huber(pred, tgt, w_snr, huber_c=c)), rtol=1e-6)
    d = pred[0, 0, 0].astype(np.float64) - tgt[0, 0, 0]
    np.testing.assert_allclose(float(huber(pred, tgt, w_snr, huber_c=c, mask=masks)[0]),
                               (2 * 0.3 * (np.sqrt(d**2 + 0.09) - 0.3)).mean() * 0.5, rtol=1e-5)
    # gradients: finite everywhere, exactly zero where the mask is
    g = np.asarray(jax.jit(jax.grad(lambda p: loss(p, tgt, w_snr, w_tag, mask=masks).sum()))(pred))
    assert np.isfinite(g).all() and (g[2] == 0).all() and (g[0][masks[0, ..., 0] == 0] == 0).all()
    assert (g[0, 0, 0] != 0).all()


def test_masked_loss_step_wiring():
    """per_sample_loss reads batch["loss_mask"] only under loss.masked (StepConfig.masked)."""
    from sdxl_jax.train.step import StepConfig, per_sample_loss
    cfg = get_config("tiny")
    cfg.loss.masked = True
    sc = StepConfig.from_config(cfg)
    assert sc.masked and not StepConfig.from_config(get_config("tiny")).masked
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    eps = rng.standard_normal(latents.shape).astype(np.float32)
    t = np.array([10, 500], np.int32)
    mask = np.zeros((2, 4, 4, 1), np.float32)
    mask[:, :2] = 1.0  # top half counts
    batch = {"latents": latents, "loss_weight": np.array([1.0, 3.0], np.float32), "loss_mask": mask}

    def run(sc, batch, predict):
        return np.asarray(jax.jit(lambda b: per_sample_loss(predict, sc, b, t, eps))(batch))
    # a prediction that is wrong only in the masked-out bottom half: zero masked loss
    from sdxl_jax import diffusion
    x0 = diffusion.normalize_latents(latents, "scale", sc.scale_factor)
    a, s = diffusion.vp_coefficients(sc.alphas_cumprod, t)
    v = np.asarray(diffusion.v_target(x0, eps, a, s))

    def wrong_below(z, tt):
        return jnp.asarray(v).at[:, 2:].add(1.0)
    np.testing.assert_allclose(run(sc, batch, wrong_below), 0.0, atol=1e-12)
    # unmasked, half of the elements are off by 1: 0.5 × the SNR weight × the tag weight
    w = np.asarray(diffusion.snr_loss_weight(diffusion.snr(a, s), sc.weighting, sc.snr_gamma)) * [1, 3]
    unmasked = run(StepConfig.from_config(get_config("tiny")), batch, wrong_below)
    np.testing.assert_allclose(unmasked, 0.5 * w, rtol=1e-5)


# ---- the cache: alpha, x.mask.png, and none ----------------------------------------------------

def _write_images(root):
    """Five inputs with known masks (and one whose mask does not fit); returns the expected
    latent-resolution masks (None: none stored)."""
    root.mkdir(parents=True)
    expect = {}

    def save(name, img, caption="a, b"):
        img.save(root / name)
        (root / name).with_suffix(".txt").write_text(caption)

    # alpha: transparent for x < 124, opaque from there: latent columns 0-14 → 0, 15 (the last) → 4/8
    rgba = np.full((SIDE, SIDE, 4), 40, np.uint8)
    rgba[..., 3] = 255
    rgba[:, :124, 3] = 0
    save("rgba.png", Image.fromarray(rgba, "RGBA"))
    m = np.ones((LAT, LAT), np.float32)
    m[:, :15], m[:, 15] = 0.0, 0.5
    expect["rgba.png"] = m
    # a mask file next to a JPEG: white top-left 64×64 square plus rows 64-67 of columns 0-7
    save("masked.jpg", Image.new("RGB", (SIDE, SIDE), (200, 30, 30)))
    mf = np.zeros((SIDE, SIDE), np.uint8)
    mf[:64, :64] = 255
    mf[64:68, :8] = 255
    Image.fromarray(mf, "L").save(root / "masked.mask.png")
    m = np.zeros((LAT, LAT), np.float32)
    m[:8, :8], m[8, 0] = 1.0, 0.5
    expect["masked.jpg"] = m
    # alpha and a mask file: the file wins (fully transparent image, right half white in the file)
    save("both.png", Image.new("RGBA", (SIDE, SIDE), (0, 0, 0, 0)))
    mf = np.zeros((SIDE, SIDE), np.uint8)
    mf[:, SIDE // 2:] = 255
    Image.fromarray(mf, "L").save(root / "both.mask.png")
    m = np.zeros((LAT, LAT), np.float32)
    m[:, LAT // 2:] = 1.0
    expect["both.png"] = m
    save("plain.png", Image.new("RGB", (SIDE, SIDE), (0, 90, 0)))  # no alpha, no mask file
    expect["plain.png"] = None
    save("opaque.png", Image.new("RGBA", (SIDE, SIDE), (9, 9, 9, 255)))  # alpha, all opaque
    expect["opaque.png"] = None
    save("wrong.png", Image.new("RGB", (SIDE, SIDE)))
    Image.new("L", (SIDE, SIDE // 2), 255).save(root / "wrong.mask.png")  # 2:1, the image 1:1
    return expect


def _config(masked=False):
    cfg = get_config("tiny")
    cfg.data.buckets.crop = "center"
    cfg.data.decode_workers = 1
    cfg.data.build_batch_size = 2
    cfg.data.val_fraction = 0.0
    cfg.data.prefetch = 1
    cfg.data.read_threads = 1
    cfg.loss.masked = masked
    return cfg


def _build(out, **inputs):
    return build_cache(_config(), out=str(out), encode_fn=pool_encode, encoder_fingerprint="pool8",
                       process_index=0, process_count=1, progress=False, **inputs)


def _records(cache_dir):
    index = C.read_index(str(cache_dir))
    source = C.RecordSource(index.files, index.counts)
    try:
        return {rec["key"]: rec for rec in (C.decode_record(source[i]) for i in range(len(source)))}
    finally:
        source.close()


@pytest.fixture(scope="module")
def masked_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("masked") / "images"
    expect = _write_images(root)
    out = root.parent / "cache"
    manifest = _build(out, images_dir=str(root))
    return root, out, manifest, expect


def test_masked_cache_stores_latent_masks(masked_cache):
    root, out, manifest, expect = masked_cache
    keys = {s.key for s in list_folder(str(root))[0]}
    assert keys == set(expect) | {"wrong.png"}  # no x.mask.png among the inputs
    recs = _records(out)
    assert set(recs) == set(expect) and manifest["num_masked"] == 3
    for key, want in expect.items():
        got = recs[key]["mask"]
        if want is None:
            assert got is None, key
        else:
            assert got.shape == (LAT, LAT, 1) and got.dtype == np.float16, key
            np.testing.assert_array_equal(got[..., 0].astype(np.float32), want, err_msg=key)
    lat = recs["rgba.png"]["latent"].astype(np.float32)  # RGB pixels: still composited over white
    np.testing.assert_allclose(lat[:, :15, :3], 1.0, atol=1e-3)
    np.testing.assert_allclose(lat[:, 16:, :3], 40 / 127.5 - 1, atol=1e-3)
    skipped = [json.loads(x) for x in (out / C.SKIPPED).read_text().splitlines()]
    assert [(s["key"], s["reason"]) for s in skipped] == [
        ("wrong.png", "mask file wrong.mask.png: 128x64, the image is 128x128 (not the same aspect ratio)")]
    # a record without a mask is the format of before (no header key), and round-trips as None
    raw = C.encode_record(np.zeros((2, 3, 4), np.float16), None, "c", ["c"], np.zeros(6), "k")
    assert b"mask" not in raw and C.decode_record(raw)["mask"] is None
    m = np.array([[0, 0.25, 1], [0.5, 1, 0]], np.float32)
    rec = C.decode_record(C.encode_record(np.ones((2, 3, 4), np.float16), np.ones((2, 3, 4)), "c", ["c"],
                                          np.zeros(6), "k", m[..., None]))
    np.testing.assert_array_equal(rec["mask"][..., 0], m)
    np.testing.assert_array_equal(rec["std"], np.ones((2, 3, 4), np.float16))


def test_masked_manifest_input(masked_cache, tmp_path):
    root, _, _, expect = masked_cache
    listing = tmp_path / "list.jsonl"
    listing.write_text("\n".join(json.dumps({"path": str(root / p), "caption": "x"})
                                 for p in ("masked.jpg", "masked.mask.png", "plain.png")) + "\n")
    sources, skipped = list_manifest(str(listing))
    assert [s.key for s in sources] == [str(root / "masked.jpg"), str(root / "plain.png")]
    assert len(skipped) == 1 and "a loss mask file" in skipped[0][1]
    _build(tmp_path / "c", manifest=str(listing))
    recs = _records(tmp_path / "c")
    np.testing.assert_array_equal(recs[str(root / "masked.jpg")]["mask"][..., 0], expect["masked.jpg"])
    assert recs[str(root / "plain.png")]["mask"] is None


# ---- the loader ----------------------------------------------------------------------------------

def test_masked_loader_batch(masked_cache):
    from sdxl_jax.train.unet_task import batch_spec
    _, out, _, expect = masked_cache
    batches = {}
    for masked in (False, True):
        cfg = _config(masked)
        it = make_train_iterator(cfg, str(out), fake_tokenize(1), global_batch_size=len(expect), debug=True)
        batches[masked] = next(it)
        it.close()
        spec = batch_spec(cfg)(len(expect), SIDE, SIDE)
        batch = {k: v for k, v in batches[masked].items() if k != "debug"}
        assert ({k: (v.shape, v.dtype) for k, v in batch.items()}
                == {k: (v.shape, v.dtype) for k, v in spec.items()})  # the program's abstract batch
    assert "loss_mask" not in batches[False]  # loss.masked=false: the batch of before
    batch = batches[True]
    assert batch["loss_mask"].shape == (len(expect), LAT, LAT, 1) and batch["loss_mask"].dtype == np.float32
    for row, key in enumerate(batch["debug"]["keys"]):
        want = np.ones((LAT, LAT), np.float32) if expect[key] is None else expect[key]
        np.testing.assert_array_equal(batch["loss_mask"][row, ..., 0], want, err_msg=key)
