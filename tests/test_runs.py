"""`runs.open_run`, the one reader of a saved run (sample, export, the VAE-finetune loader): the
chosen trained tree comes back bit for bit, with the step's config and metadata; the frozen
models are those of `weights.frozen_params` (the seeded-init contract, any subset giving the
same numbers); an unreadable newest step is skipped (not renamed: readers never write), an asked-
for step is never substituted; a VAE-decoder run gives its source encoder + trained decoder,
checked against the saved encoder fingerprint."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from sdxl_jax import export, sample
from sdxl_jax.checkpoint import Checkpointer, CheckpointError
from sdxl_jax.models import build, vae_parts, weights
from sdxl_jax.runs import open_run
from test_checkpoints import _truncate_arrays

SEED = 7


def _unet_tree(step):
    """A stand-in UNet tree: the reader restores what was saved, whatever its shapes."""
    return {"down": {"kernel": np.arange(24, dtype=np.float32).reshape(4, 6) * step},
            "out": {"bias": np.full((3,), step, np.float32)}}


def _plus(tree, x):
    return jax.tree.map(lambda a: np.asarray(a, np.float32) + np.float32(x), tree)


def _equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _write(workdir, config, states: dict, meta):
    ck = Checkpointer(os.path.join(workdir, "checkpoints"), keep=10, async_save=False)
    for step, (raw, ema) in states.items():
        ck.save(step, {"step": np.int32(step), "params": raw, "ema_params": ema, "opt_state": {}},
                {"iterator": {}}, config, dict(meta, step=step))
    ck.close()
    return workdir


@pytest.fixture(scope="module")
def config():
    from configs.ztsnr import get_config
    cfg = get_config("tiny")
    cfg.train.seed = SEED
    return cfg


@pytest.fixture(scope="module")
def frozen(config):
    return jax.device_get(weights.frozen_params(config))


@pytest.fixture(scope="module")
def unet_run(config, tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("unet_run"))
    return _write(wd, config.to_dict(), {s: (_unet_tree(s), _plus(_unet_tree(s), 1)) for s in (2, 4)},
                  {"title": "reader test", "latents": {"mean": None}})


def test_unet_run_trees_config_meta(unet_run, config):
    run = open_run(unet_run)
    assert (run.step, run.task, run.meta["step"], run.meta["title"]) == (4, "unet", 4, "reader test")
    assert run.checkpoint_dir == os.path.join(unet_run, "checkpoints", "4")
    assert run.config == json.loads(json.dumps(config.to_dict()))  # as JSON keeps it
    ema = run.params("unet")  # EMA by default
    _equal(ema, _plus(_unet_tree(4), 1))
    assert all(x.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])
               for x in jax.tree.leaves(ema))
    raw = run.params("unet", "raw", on_host=True)
    assert all(type(x) is np.ndarray for x in jax.tree.leaves(raw))
    _equal(raw, _unet_tree(4))
    assert open_run(unet_run, step=2).params("unet", "raw")["out"]["bias"].tolist() == [2.0] * 3
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 3 in .* \(have \[2, 4\]\)"):
        open_run(unet_run, step=3)
    with pytest.raises(FileNotFoundError, match="no checkpoints in .*: not a run directory"):
        open_run(os.path.dirname(unet_run))


def test_frozen_weights_have_one_source(unet_run, config, frozen):
    from sdxl_jax.run_inputs import resolve_weights
    run = open_run(unet_run)
    _equal(run.frozen(), frozen)
    # the seeded-init contract, recomputed: text_g is init_params(fold_in(PRNGKey(seed), 3))
    _equal(frozen["text_g"], build.init_params("text_g", "tiny", jax.random.fold_in(
        jax.random.PRNGKey(SEED), 3)))
    # a subset gives the same numbers as the full set (the cache builder asks for the VAE only)
    _equal(weights.frozen_params(config, components=("text_l",))["text_l"], frozen["text_l"])
    seeded = config.copy_and_resolve_references()  # with data, or no demo VAE: the seeded one
    seeded.data.demo_vae_steps = 0
    _equal(resolve_weights(seeded).load(("vae",))["vae"], frozen["vae"])  # what build_cache encodes with
    _equal(run.params("vae", on_host=True), frozen["vae"])


def test_reader_skips_unreadable_latest_and_never_substitutes(unet_run, tmp_path):
    wd = str(tmp_path / "run")
    shutil.copytree(unet_run, wd)
    _truncate_arrays(os.path.join(wd, "checkpoints", "4"))
    run = open_run(wd)
    _equal(run.params("unet"), _plus(_unet_tree(2), 1))
    assert run.step == 2 and run.meta["step"] == 2  # config/meta follow the step actually read
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2", "4"]  # readers rename nothing
    with pytest.raises(CheckpointError, match=r"checkpoint step 4 in .* is unreadable"):
        open_run(wd, step=4).params("unet")
    # sample reads through it (export too: runs.Run.all_params, test_interop)
    cfg, params, meta = sample.load_run(wd, weights="raw")
    assert meta["step"] == 2
    _equal(params, _unet_tree(2))
    run = open_run(wd)  # the newest step whose config and metadata read; arrays when read
    assert (run.directory, run.step) == (os.path.join(wd, "checkpoints"), 4)
    _, params, meta = sample.load_run(checkpoint=os.path.join(wd, "checkpoints", "2"))
    assert meta["step"] == 2
    _truncate_arrays(os.path.join(wd, "checkpoints", "2"))
    with pytest.raises(CheckpointError, match=f"none of the checkpoints in {wd}/checkpoints is readable"):
        open_run(wd).params("unet")


def test_ema_disabled_run_defaults_to_raw(config, tmp_path):
    cfg = config.to_dict()
    cfg["ema"]["enabled"] = False
    wd = _write(str(tmp_path / "noema"), cfg, {1: (_unet_tree(1), _plus(_unet_tree(1), 1))}, {})
    run = open_run(wd)
    _equal(run.params("unet"), _unet_tree(1))
    with pytest.raises(ValueError, match="ema.enabled=False"):
        run.params("unet", "ema")


def _vae_config(train_encoder=False):
    return {"task": "vae_decoder", "model": {"preset": "tiny", "pretrained": "",
                                             "train_encoder": train_encoder},
            "train": {"seed": SEED}, "ema": {"enabled": True}}


def test_vae_decoder_run_pairs_source_encoder_with_trained_decoder(frozen, tmp_path):
    encoder, decoder = vae_parts.split_vae_params(frozen["vae"])
    raw, ema = _plus(decoder, 0.5), _plus(decoder, 0.25)
    meta = {"task": "vae_decoder", "encoder_fingerprint": vae_parts.encoder_fingerprint(encoder)}
    wd = _write(str(tmp_path / "vae"), _vae_config(), {3: ({"generator": raw}, {"generator": ema})}, meta)
    run = open_run(wd)
    _equal(run.params("vae", on_host=True), {**encoder, **ema})
    _equal(export.restore_vae(wd, None, "raw"), {**encoder, **raw})
    with pytest.raises(ValueError, match="VAE decoder run"):
        run.params("unet")
    bad = _write(str(tmp_path / "other_encoder"), _vae_config(),
                 {3: ({"generator": raw}, {"generator": ema})}, dict(meta, encoder_fingerprint="0" * 32))
    with pytest.raises(ValueError, match="not the one the decoder .* was trained against"):
        open_run(bad).params("vae")
    whole = _plus(frozen["vae"], 2)  # model.train_encoder: the whole VAE is in the checkpoint
    wd = _write(str(tmp_path / "whole"), _vae_config(True), {1: ({"generator": whole}, {"generator": whole})},
                {"task": "vae_decoder", "encoder_fingerprint": None})
    _equal(open_run(wd).params("vae", on_host=True), whole)
