"""Sampling end to end: the CLI on a saved checkpoint (EMA by default, grids, determinism) and
the in-training evaluator (preview PNG, deterministic validation loss)."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from helpers import ENGINE_PRESET, tiny_config, unet_program
from sdxl_jax import checkpoint as ckpt_lib
from sdxl_jax import models

SIDE = 64  # 8×8 latents: the sampler compiles in seconds


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, demo_cache):
    """A checkpoint whose EMA and raw weights differ (no training: the EMA is a perturbed copy)."""
    wd = str(tmp_path_factory.mktemp("sample_run"))
    cfg = tiny_config(**{"data.cache_dir": demo_cache, "sample.width": SIDE, "sample.height": SIDE,
                         "sample.steps": 4, "sample.prompts": ("completely black", "red circle"),
                         "sample.seeds": (0, 1), "sample.val_batches": 1})
    prog = unet_program(cfg)
    mesh = prog.plan.mesh
    params = models.init_params("unet", ENGINE_PRESET, 0)
    params["conv_out"]["kernel"] = params["conv_out"]["kernel"] + 0.05  # non-zero output
    state = prog.init_state(params, jax.random.PRNGKey(0))
    state = state.replace(ema_params=jax.tree.map(lambda x: x * 0.5, state.ema_params))
    ck = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), async_save=False)
    meta = {"latents": {"normalization": "scale", "mean": None, "std": None}}
    ck.save(7, state, {"stage": 0, "iterator": {}}, json.loads(cfg.to_json_best_effort()), meta)
    ck.close()
    return cfg, wd, state, mesh


def _run_cli(wd, out, *extra):
    from sdxl_jax.sample import main
    assert main(["--workdir", wd, "--prompt", "completely black", "--prompt", "red circle",
                 "--seed", "0", "--seed", "3", "--steps", "4", "--width", str(SIDE),
                 "--height", str(SIDE), "--out", out, *extra]) == 0
    return np.asarray(Image.open(out))


def test_sample_cli_grid_is_deterministic_and_uses_ema(saved_run, tmp_path):
    _, wd, _, _ = saved_run
    a = _run_cli(wd, str(tmp_path / "a.png"))
    assert a.shape == (2 * SIDE, 2 * SIDE, 3)  # 2 prompts × 2 seeds
    b = _run_cli(wd, str(tmp_path / "b.png"))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[:SIDE, :SIDE], a[:SIDE, SIDE:])  # seeds differ
    raw = _run_cli(wd, str(tmp_path / "raw.png"), "--weights", "raw")
    assert not np.array_equal(a, raw)
    ancestral = _run_cli(wd, str(tmp_path / "ea.png"), "--sampler", "euler_a", "--cfg", "3", "--rescale", "0.7")
    # the options reach the sampler: another image of the same prompts and seeds
    assert ancestral.shape == a.shape and not np.array_equal(ancestral, a)


def test_sample_cli_errors_are_clear(tmp_path):
    from sdxl_jax.sample import main
    with pytest.raises(SystemExit, match="no checkpoints"):
        main(["--workdir", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "x.png")])


def test_evaluator_writes_previews_and_deterministic_validation(saved_run, demo_cache):
    from sdxl_jax.train.evaluate import Evaluator
    from sdxl_jax.train.step import StepConfig
    from sdxl_jax.models.weights import frozen_params
    cfg, wd, state, mesh = saved_run
    tok_l, tok_g = models.get_tokenizers("tiny")
    tokenize = lambda c: (models.tokenize(tok_l, c, 1), models.tokenize(tok_g, c, 1))  # noqa: E731
    unet = models.build_unet(ENGINE_PRESET, "float32")
    text_l, text_g = models.build_text_encoders(ENGINE_PRESET, "float32")
    ev = Evaluator(cfg, wd, mesh, unet, text_l, text_g, StepConfig.from_config(cfg),
                   frozen_params(cfg), tokenize, demo_cache, None, None, None)
    first = ev.validation(7, {"ema": state.ema_params, "raw": state.params})
    again = ev.validation(7, {"ema": state.ema_params, "raw": state.params})
    assert first == again  # fixed timesteps, noise and captions
    assert first["val_ema/loss"] != first["val_raw/loss"]
    assert any(k.startswith("val_ema/loss_t") for k in first)
    path = ev.previews(7, state.ema_params)
    grid = np.asarray(Image.open(path))
    assert path.endswith("step_0000007.png") and grid.shape == (2 * SIDE, 2 * SIDE, 3)


def test_evaluator_previews_a_trained_text_encoder(saved_run, demo_cache):
    """train.trainable="unet+text": CLIP-L is trained, so it is not among the frozen weights;
    the previews take it from the trained tree (through `view`), not from the frozen source."""
    from sdxl_jax.train.evaluate import Evaluator
    from sdxl_jax.train.step import StepConfig
    from sdxl_jax.models.weights import frozen_params
    cfg, wd, state, mesh = saved_run
    frozen = frozen_params(cfg)
    shown = {k: v for k, v in frozen.items() if k != "text_l"}
    unet = models.build_unet(ENGINE_PRESET, "float32")
    text_l, text_g = models.build_text_encoders(ENGINE_PRESET, "float32")
    ev = Evaluator(cfg, wd, mesh, unet, text_l, text_g, StepConfig.from_config(cfg), shown,
                   None, demo_cache, None, None, None,
                   view=lambda tree: (tree["unet"], {"text_l": tree["text_l"], "text_g": frozen["text_g"]}))
    grid = lambda step, tl: np.asarray(Image.open(ev.previews(step, {"unet": state.ema_params, "text_l": tl})))  # noqa: E731
    source = grid(7, frozen["text_l"])
    from sdxl_jax import prompts  # the same sampler fed the frozen encoders directly
    want = prompts.render_grid(ev.sampler, state.ema_params, ev.jobs,
                               text_params={k: frozen[k] for k in ("text_l", "text_g")})
    np.testing.assert_array_equal(source, want)
    moved = jax.tree.map(lambda x: x * 1.5, frozen["text_l"])  # a "trained" CLIP-L
    assert not np.array_equal(grid(8, moved), source)


@pytest.mark.parametrize("attention,split", [("standard", False), ("memory_efficient", False),
                                             ("standard", True)])
def test_sampler_builds_the_runs_attention_options(attention, split):
    from sdxl_jax.sample import ImageSampler
    cfg = tiny_config(**{"model.attention": attention, "model.split_head_dim": split}).to_dict()
    unet = ImageSampler(cfg, frozen={}).unet
    assert unet.use_memory_efficient_attention == (attention == "memory_efficient")
    assert unet.split_head_dim == split
    del cfg["model"]["attention"], cfg["model"]["split_head_dim"]  # a run saved before the options
    assert not ImageSampler(cfg, frozen={}).unet.use_memory_efficient_attention
