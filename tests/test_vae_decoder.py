"""VAE decoder finetuning (METHODS §11) and latent statistics (§10) on the tiny VAE.

One module-scoped training run (STEPS steps, 64² crops, perceptual loss from a generated file,
discriminator switched on at DISC_START) is shared by the end-to-end tests; a second run resumes
from a copy of its mid-way checkpoint. Model evaluations in the tests run op by op (no jit), so
the only compiled programs are the trainer's own (train step, reconstruction evaluation).
"""
import os
import shutil
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import config, override
from sdxl_jax import checkpoint as ckpt_lib
from sdxl_jax import models
from sdxl_jax.config import ConfigError
from sdxl_jax.data import pixels
from sdxl_jax.train import vae_losses as L
from sdxl_jax.config import validate
from sdxl_jax.models.vae_parts import split_vae_params
from sdxl_jax.models.weights import frozen_params
from sdxl_jax.runs import open_run
from sdxl_jax.train.loop import train

STEPS = 16
DISC_START = 8  # GAN terms exactly 0 for steps 1…8, on from step 9
CROP = 32  # training crops (held-out samples stay 64²)


def tiny_vae_config(images_dir: str, **overrides):
    cfg = config("vae_decoder:tiny")
    cfg.data.images_dir = images_dir
    cfg.data.val_fraction = 0.1  # 5 of the 48 demo images held out
    cfg.data.crop_size = CROP
    cfg.train.steps = STEPS
    cfg.train.warmup_steps = 2
    cfg.train.log_every = 5
    cfg.disc.start_step = DISC_START
    cfg.checkpoint.every_steps = STEPS // 2
    cfg.checkpoint.async_save = False
    cfg.sample.every_steps = STEPS
    return override(cfg, overrides)


def held_out_images(cfg, images_dir: str, n: int, size: int):
    """The first `n` held-out images of `images_dir` by key, square: the trainer's sample set."""
    items, _, _ = pixels.scan_images(cfg, images_dir, None, 4)
    _, val_ids = pixels.split_items(items, float(cfg.data.val_fraction))
    return pixels.square_images([items[i] for i in val_ids], n, size, int(cfg.data.max_image_pixels))


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


@pytest.fixture(scope="module")
def run(demo_images, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vae")
    weights = str(tmp / "perceptual.safetensors")
    L.save_perceptual(weights, L.init_perceptual(0, (8, 16)))
    cfg = tiny_vae_config(demo_images, **{"loss.perceptual_weights": weights})
    wd = str(tmp / "straight")
    log = []
    summary = train(cfg, wd, metrics_log=log)
    # resume: the mid-way checkpoint alone in a fresh workdir, continued to the end (no
    # samples: they do not touch the training state)
    wd2 = str(tmp / "resumed")
    half = str(STEPS // 2)
    shutil.copytree(os.path.join(wd, "checkpoints", half), os.path.join(wd2, "checkpoints", half))
    resumed = train(tiny_vae_config(demo_images, **{"loss.perceptual_weights": weights,
                                                                  "sample.every_steps": 0}), wd2)
    vae = models.build_vae("tiny", "float32")
    held, _ = held_out_images(cfg, demo_images, 4, 64)
    source, finetuned = frozen_params(cfg, components=("vae",))["vae"], open_run(wd).params("vae")

    @jax.jit
    def autoencode(params, x):  # latents (mean, std) and reconstruction, independent of the trainer
        mean, std = models.vae_encode(vae, params, x)
        return mean, std, models.vae_decode(vae, params, mean)
    return SimpleNamespace(cfg=cfg, wd=wd, summary=summary, log=dict(log), resumed=resumed,
                           held=held, source=source, finetuned=finetuned,
                           before=_np(autoencode(source, held)), after=_np(autoencode(finetuned, held)))


def test_only_the_decoder_trains_and_the_encoder_is_bit_identical(run):
    s = run.summary
    assert s["end_step"] == STEPS and s["stopped"] == "done" and s["compiles"] == 1
    assert set(s["state"].params) == {"generator", "discriminator"}
    assert set(s["state"].params["generator"]) == {"post_quant_conv", "decoder"}
    enc_src, dec_src = split_vae_params(_np(run.source))
    enc_fine, dec_fine = split_vae_params(_np(run.finetuned))
    jax.tree.map(np.testing.assert_array_equal, enc_src, enc_fine)
    jax.tree.map(np.testing.assert_array_equal, enc_src, _np(s["encoder"]))
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), dec_src, dec_fine))
    assert min(moved) > 0  # every decoder leaf trained
    # the latents the UNet sees are unchanged by the finetune
    np.testing.assert_array_equal(run.before[0], run.after[0])
    np.testing.assert_array_equal(run.before[1], run.after[1])


def test_heldout_reconstruction_error_falls(run):
    before = float(np.mean((run.before[2] - run.held) ** 2))
    after = float(np.mean((run.after[2] - run.held) ** 2))
    print(f"held-out reconstruction MSE: before {before:.4f}, after {after:.4f} (EMA decoder)")
    assert after < 0.6 * before
    ev = run.summary["eval"]
    assert sorted(ev) == [0, STEPS]
    np.testing.assert_allclose(ev[0]["val_ema/mse"], before, rtol=1e-3)
    np.testing.assert_allclose(ev[STEPS]["val_ema/mse"], after, rtol=1e-3)
    from PIL import Image
    grid = Image.open(os.path.join(run.wd, "samples", f"recon_{STEPS:07d}.png"))
    assert grid.size == (2 * 64, 4 * 64)  # 4 rows of input | reconstruction
    left = np.asarray(grid)[:64, :64].astype(np.float64)
    np.testing.assert_allclose(left, np.round((run.held[0] + 1) * 127.5), atol=1)
    assert any(f.startswith("events.") for f in os.listdir(os.path.join(run.wd, "tb")))


def test_resume_from_midway_checkpoint_matches_straight_run(run):
    r = run.resumed
    assert r["start_step"] == STEPS // 2 and r["end_step"] == STEPS
    jax.tree.map(np.testing.assert_array_equal, _np(run.summary["state"].params), _np(r["state"].params))
    jax.tree.map(np.testing.assert_array_equal, _np(run.summary["state"].ema_params),
                 _np(r["state"].ema_params))
    ck = ckpt_lib.Checkpointer(os.path.join(run.wd, "checkpoints"), async_save=False)
    assert ck.steps == [STEPS // 2, STEPS]
    ck.close()


def test_a_run_on_gcs_ends_as_the_local_run(run, gcs_server, gcs_dir):
    """The VAE task with its run directory on gs:// (conftest's GCS server on loopback) trains
    the same decoder, bitwise, as the local run; its checkpoints are committed objects in the
    bucket, its reconstruction grid is there too, and the run reader opens it."""
    from sdxl_jax import paths
    wd = gcs_dir + "/vae"
    out = train(run.cfg, wd)
    assert out["end_step"] == STEPS
    jax.tree.map(np.testing.assert_array_equal, _np(run.summary["state"].params), _np(out["state"].params))
    for step in (STEPS // 2, STEPS):
        assert paths.isfile(paths.join(wd, "checkpoints", str(step), "commit_success.txt"))
    assert [n for n in paths.listdir(paths.join(wd, "samples")) if n.endswith(".png")]
    jax.tree.map(np.testing.assert_array_equal, _np(run.finetuned), _np(open_run(wd).params("vae")))


def _unet_run(workdir: str):
    """A UNet training run's checkpoint (tiny, random weights; EMA = params + 1), as export reads it."""
    from configs.ztsnr import get_config
    from sdxl_jax.train.state import TrainState
    raw = _np(models.init_params("unet", "tiny", jax.random.PRNGKey(5)))
    ema = jax.tree.map(lambda x: x + np.float32(1.0), raw)
    state = TrainState(step=np.asarray(3, np.int32), params=raw, opt_state={}, ema_params=ema,
                       rng=np.zeros((2,), np.uint32), nonfinite=np.asarray(0, np.int32))
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    ck.save(3, state, {}, get_config("tiny").to_dict(), {})
    ck.close()
    return ema


def test_export_puts_the_finetuned_decoder_into_both_formats(run, tmp_path):
    """`python -m sdxl_jax.export --vae-workdir`: a UNet run exported with this run's decoder."""
    from sdxl_jax import export
    from sdxl_jax.models import weights
    unet_wd = str(tmp_path / "unet_run")
    unet_ema = _unet_run(unet_wd)
    out = str(tmp_path / "with_vae.safetensors")
    assert export.main(["--workdir", unet_wd, "--format", "single-file", "--dtype", "fp32",
                        "--out", out, "--vae-workdir", run.wd]) == 0
    got = weights.load_pretrained(out, "tiny", ("unet", "vae"))
    jax.tree.map(np.testing.assert_array_equal, _np(run.finetuned), got["vae"])
    enc_src, dec_src = split_vae_params(_np(run.source))
    _, dec_got = split_vae_params(got["vae"])
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(dec_src), jax.tree.leaves(dec_got)))
    jax.tree.map(np.testing.assert_array_equal, unet_ema, got["unet"])

    folder = str(tmp_path / "with_vae_diffusers")
    assert export.main(["--workdir", unet_wd, "--format", "diffusers", "--dtype", "fp32",
                        "--out", folder, "--vae-workdir", run.wd, "--vae-weights", "raw"]) == 0
    raw_vae = open_run(run.wd).params("vae", "raw")
    jax.tree.map(np.testing.assert_array_equal, _np(raw_vae),
                 weights.load_pretrained(folder, "tiny", ("vae",))["vae"])
    with pytest.raises(SystemExit, match="not a VAE decoder run"):  # the UNet run given as VAE run
        export.main(["--workdir", unet_wd, "--format", "single-file", "--out", out + ".again.safetensors",
                     "--vae-workdir", unet_wd])


def test_discriminator_switches_on_at_start_step(run):
    log = run.log
    assert sorted(log) == list(range(1, STEPS + 1))
    for s in range(1, DISC_START + 1):  # warm-up: the terms are exactly zero
        assert log[s]["gan_term"] == 0.0 and log[s]["disc_loss"] == 0.0 and log[s]["gan_weight"] == 0.0
    for s in range(DISC_START + 1, STEPS + 1):
        assert log[s]["disc_loss"] > 0.0 and log[s]["gan_weight"] > 0.0 and log[s]["gan_term"] != 0.0
        np.testing.assert_allclose(log[s]["loss"], log[s]["rec_loss"] + log[s]["gan_term"], rtol=1e-5)
    assert all(log[s]["perceptual"] > 0 for s in log)
    # zero gradients during the warm-up leave the discriminator at its initial weights
    init = L.init_discriminator([run.cfg.train.seed, 0xD15C], run.cfg.disc.channels, run.cfg.disc.layers)
    ck = ckpt_lib.Checkpointer(os.path.join(run.wd, "checkpoints"), async_save=False)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"discriminator": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=dev), init)}
    at_start, _, _ = ck.restore_params(DISC_START, abstract, "params")
    at_end, _, _ = ck.restore_params(STEPS, abstract, "params")
    ck.close()
    jax.tree.map(np.testing.assert_array_equal, init, _np(at_start["discriminator"]))
    assert not np.array_equal(init["conv_0"]["kernel"], np.asarray(at_end["discriminator"]["conv_0"]["kernel"]))


def test_adaptive_weight_formula():
    # ‖(3, 4)‖ = 5, ‖(0, 2)‖ = 2
    w = L.adaptive_weight(jnp.array([3.0, 4.0]), jnp.array([0.0, 2.0]))
    np.testing.assert_allclose(float(w), 5.0 / (2.0 + 1e-4), rtol=1e-6)
    assert float(L.adaptive_weight(jnp.array([1.0]), jnp.array([0.0]), max_weight=7.0)) == 7.0
    # toy two-layer "decoder": the weight from one vjp equals the ratio of the last layer's
    # gradients of the two losses taken separately through the whole model
    rng = np.random.default_rng(0)
    params = {"hidden": rng.normal(size=(3, 5)).astype(np.float32),
              "last": rng.normal(size=(5, 2)).astype(np.float32)}
    z, target = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(4, 2)).astype(np.float32)
    decode = lambda p: jnp.tanh(z @ p["hidden"]) @ p["last"]  # noqa: E731
    rec = lambda y: jnp.mean((y - target) ** 2)  # noqa: E731
    gan = lambda y: -jnp.mean(jnp.sin(y))  # noqa: E731

    @jax.jit
    def both():
        y, pull = jax.vjp(decode, params)
        got = L.last_layer_weight(pull, jax.grad(rec)(y), jax.grad(gan)(y), lambda g: g["last"])
        return (got, jax.grad(lambda p: rec(decode(p)))(params)["last"],
                jax.grad(lambda p: gan(decode(p)))(params)["last"])
    got, g_rec, g_gan = (np.asarray(v, np.float64) for v in both())
    np.testing.assert_allclose(float(got), np.linalg.norm(g_rec) / (np.linalg.norm(g_gan) + 1e-4), rtol=1e-5)


def test_hinge_gan_losses_from_one_forward_match_separate_gradients():
    disc = L.init_discriminator(1, 8, 1)
    rng = np.random.default_rng(1)
    real, fake = (rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32) for _ in range(2))
    d_loss, d_grads, g_loss, g_fake, _, _ = jax.jit(L.gan_losses)(disc, real, fake)
    D = L.discriminator_logits
    ref_d = lambda p: 0.5 * (jnp.mean(jax.nn.relu(1 - D(p, real))) + jnp.mean(jax.nn.relu(1 + D(p, fake))))  # noqa: E731
    ref_g = lambda f: -jnp.mean(D(disc, f))  # noqa: E731
    ref_losses = jax.jit(lambda: (ref_d(disc), ref_g(fake)))()
    np.testing.assert_allclose(float(d_loss), float(ref_losses[0]), rtol=1e-6)
    np.testing.assert_allclose(float(g_loss), float(ref_losses[1]), rtol=1e-6)
    ref_d_grads, ref_g_fake = jax.jit(lambda: (jax.grad(ref_d)(disc), jax.grad(ref_g)(fake)))()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), d_grads, ref_d_grads)
    np.testing.assert_allclose(g_fake, ref_g_fake, rtol=1e-4, atol=1e-8)
    assert jax.eval_shape(D, disc, real).shape == (2, 6, 6, 1)  # 4×4 convs, pad 1: 16 → 8 (stride 2) → 7 → 6


def _numpy_perceptual(params, x, y):
    """Reference: the file format's formula with numpy loops (float64)."""
    def conv3(h, k, b):
        hp = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
        out = np.zeros(h.shape[:3] + (k.shape[3],))
        for i in range(3):
            for j in range(3):
                out += np.einsum("bhwc,cd->bhwd", hp[:, i:i + h.shape[1], j:j + h.shape[2]], k[i, j])
        return out + b
    hx = (x - params["shift"]) / params["scale"]
    hy = (y - params["shift"]) / params["scale"]
    total = np.zeros(x.shape[0])
    for i in range(2):
        if i:
            pool = lambda h: h.reshape(h.shape[0], h.shape[1] // 2, 2, h.shape[2] // 2, 2, -1).mean((2, 4))  # noqa: E731
            hx, hy = pool(hx), pool(hy)
        k, b = params[f"conv_{i}"]["kernel"].astype(np.float64), params[f"conv_{i}"]["bias"]
        hx, hy = np.maximum(conv3(hx, k, b), 0), np.maximum(conv3(hy, k, b), 0)
        nx = hx / np.sqrt((hx ** 2).sum(-1, keepdims=True) + 1e-10)
        ny = hy / np.sqrt((hy ** 2).sum(-1, keepdims=True) + 1e-10)
        total += (params[f"lin_{i}"]["kernel"] * (nx - ny) ** 2).sum(-1).mean((1, 2))
    return total


def test_perceptual_loss_file_roundtrip_formula_and_clear_errors(tmp_path, demo_images):
    params = L.init_perceptual(3, (4, 6))
    params["shift"] = np.array([0.1, -0.2, 0.0], np.float32)
    params["lin_1"]["kernel"] = np.arange(6, dtype=np.float32) / 10
    path = str(tmp_path / "lpips.safetensors")
    L.save_perceptual(path, params)
    loaded = L.load_perceptual(path)
    jax.tree.map(np.testing.assert_array_equal, params, loaded)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    y = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    got = np.asarray(L.perceptual_distance(loaded, jnp.asarray(x), jnp.asarray(y)))
    np.testing.assert_allclose(got, _numpy_perceptual(loaded, x, y), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(L.perceptual_distance(loaded, x, x)), 0.0, atol=1e-6)

    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(L.PerceptualWeightsError, match="loss.perceptual_weights=.*nope.safetensors.*no such file"):
        L.load_perceptual(missing)
    cfg = tiny_vae_config(demo_images, **{"loss.perceptual_weights": missing})
    with pytest.raises(ConfigError, match="loss.perceptual_weights"):
        validate(cfg)
    params["conv_1"]["kernel"] = np.zeros((3, 3, 5, 6), np.float32)  # does not chain from 4
    L.save_perceptual(path, params)
    with pytest.raises(L.PerceptualWeightsError, match="conv_1.kernel"):
        L.load_perceptual(path)


def test_config_and_validation(demo_images):
    cfg = config("vae_decoder:tiny")
    assert cfg.task == "vae_decoder"
    validate(cfg, num_devices=8)
    with pytest.raises(ConfigError, match="data.crop_size"):
        validate(tiny_vae_config(demo_images, **{"data.crop_size": 100}))
    with pytest.raises(ConfigError, match="model.pretrained"):
        validate(config("vae_decoder:sdxl"))
    with pytest.raises(ValueError, match="unknown preset"):
        config("vae_decoder:big")


def test_pixel_iterator_is_deterministic_and_resumes(demo_images):
    cfg = tiny_vae_config(demo_images)
    a = pixels.make_pixel_iterator(cfg, demo_images, None, 0, 1, 8, 8)
    first = [next(a)["images"] for _ in range(3)]
    state = a.get_state()
    fourth = next(a)["images"]
    a.close()
    assert first[0].shape == (8, CROP, CROP, 3) and first[0].dtype == np.float32
    assert -1.0 <= first[0].min() and first[0].max() <= 1.0
    assert not np.array_equal(first[0], first[1])
    b = pixels.make_pixel_iterator(cfg, demo_images, None, 0, 1, 8, 8)
    np.testing.assert_array_equal(next(b)["images"], first[0])
    b.set_state(state)
    np.testing.assert_array_equal(next(b)["images"], fourth)
    b.close()
    # two processes: each gets its half of the same global batch
    halves = [pixels.make_pixel_iterator(cfg, demo_images, None, p, 2, 8, 8) for p in (0, 1)]
    both = np.concatenate([next(h)["images"] for h in halves])
    for h in halves:
        h.close()
    np.testing.assert_array_equal(both, first[0])
    assert len(a.held_out) == 5  # round(0.1 × 48), never in a training batch (split by key hash)


def _toy_encode(images):
    """A deterministic stand-in encoder for the cache builder: 8× average pool, then a fixed
    3 → 4 channel map with offsets, so every channel has its own mean and spread."""
    b, h, w, _ = images.shape
    pooled = images.reshape(b, h // 8, 8, w // 8, 8, 3).mean((2, 4))
    mix = np.array([[2.0, 0.5, -1.0, 0.0], [0.0, 3.0, 1.0, -2.0], [1.0, 0.0, 0.5, 4.0]])
    mean = pooled @ mix + np.array([4.8, 0.2, 1.3, -1.8])
    return mean, np.full_like(mean, 0.1)


def test_latent_stats_equal_numpy_and_normalisation_roundtrip(demo_images, tmp_path):
    from data_tools.latent_stats import compute_latent_stats, main as stats_main
    from helpers import tiny_config
    from sdxl_jax.data import build_cache, decode_record, read_index
    from sdxl_jax.data.cache import RecordSource, read_json
    from sdxl_jax.diffusion import denormalize_latents, normalize_latents
    from sdxl_jax.run_inputs import resolve_run

    cache = str(tmp_path / "cache")
    cfg = tiny_config(**{"latents.normalization": "per_channel"})
    manifest = build_cache(cfg, images_dir=demo_images, out=cache, encode_fn=_toy_encode,
                           encoder_fingerprint="toy-v1", progress=False)
    index = read_index(cache)
    source = RecordSource(index.files, index.counts)
    every = np.concatenate([np.asarray(decode_record(source[i])["latent"], np.float64).reshape(-1, 4)
                            for i in range(len(source))])
    source.close()
    assert len(every) == manifest["num_records"] * 16 * 16 and manifest["num_records"] == 48
    want_mean, want_std = every.mean(0), every.std(0)
    stats = compute_latent_stats(cache)
    np.testing.assert_allclose(stats.mean, want_mean, rtol=1e-12)
    np.testing.assert_allclose(stats.std, want_std, rtol=1e-12)
    stats_main(["--cache", cache])  # the CLI writes them next to the manifest
    np.testing.assert_allclose(read_json(f"{cache}/latent_stats.json")["std"], want_std, rtol=1e-12)
    # the UNet trainer's per_channel normalisation reads the statistics the build stored
    inputs = resolve_run(tiny_config(**{"latents.normalization": "per_channel", "data.cache_dir": cache}), None)
    mean, std = inputs.latent_mean, inputs.latent_std
    np.testing.assert_allclose(mean, want_mean, rtol=1e-9)
    np.testing.assert_allclose(std, want_std, rtol=1e-9)
    z = jnp.asarray(every.reshape(-1, 32, 32, 4)[:8], jnp.float32)
    zn = normalize_latents(z, "per_channel", mean=mean, std=std)
    back = denormalize_latents(zn, "per_channel", mean=mean, std=std)
    np.testing.assert_allclose(np.asarray(back), np.asarray(z), rtol=1e-5, atol=1e-5)
    all_n = normalize_latents(jnp.asarray(every, jnp.float32), "per_channel", mean=mean, std=std)
    np.testing.assert_allclose(np.asarray(all_n).mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(all_n).std(0), 1.0, rtol=1e-4)
