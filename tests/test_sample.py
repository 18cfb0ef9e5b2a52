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
    assert ancestral.shape == a.shape and np.isfinite(ancestral).all()


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


def test_sample_out_under_a_file_fails_before_any_work(tmp_path):
    """`--out existing.png/x.png`: one line naming the file in the way, before the run is read
    (no run exists here: that error would come next), where it used to fail only after
    sampling, with "[Errno 17] File exists"."""
    from sdxl_jax import sample
    wd = str(tmp_path / "no_run")
    (tmp_path / "existing.png").write_bytes(b"png")
    for out in ("existing.png/x.png", "existing.png/deeper/x.png", "existing.png/dir/"):
        with pytest.raises(SystemExit) as e:
            sample.main(["--workdir", wd, "--prompt", "x", "--out", str(tmp_path / out)])
        assert e.value.code == (f"error: --out '{tmp_path / out}': {tmp_path / 'existing.png'} is "
                                "a file, not a folder; choose another --out")


def test_sample_prompt_file_in_batches_into_a_folder(saved_run, tmp_path, monkeypatch):
    """--batch-size bounds every sampling call; --out DIR/ gets one PNG per image, named by the
    file's line and the seed, each the same pixels as that image in the grid drawn with the
    same batches."""
    from sdxl_jax import sample
    from sdxl_jax.sampling import ImageSampler
    _, wd, _, _ = saved_run
    prompts = tmp_path / "p.txt"
    prompts.write_text("# five prompts, one setting\ncompletely black\nred circle --d 5\n"
                       "blue square\n\nwhite\ngreen --d 9\n", encoding="utf-8")
    batches = []
    generate = ImageSampler.generate
    monkeypatch.setattr(ImageSampler, "generate",
                        lambda self, p, pairs, *a: batches.append(len(pairs)) or generate(self, p, pairs, *a))
    common = ["--workdir", wd, "--prompts-file", str(prompts), "--seed", "0", "--seed", "3",
              "--steps", "2", "--width", str(SIDE), "--height", str(SIDE), "--batch-size", "3"]
    assert sample.main(common + ["--out", str(tmp_path / "each") + "/"]) == 0
    assert batches == [3, 3, 3]  # 8 images: 3 + 3 + 2 padded to 3
    names = sorted(os.listdir(tmp_path / "each"))
    assert names == ["00002-s0.png", "00002-s3.png", "00003-s5.png", "00004-s0.png",
                     "00004-s3.png", "00006-s0.png", "00006-s3.png", "00007-s9.png"]
    assert sample.main(common + ["--out", str(tmp_path / "grid.png")]) == 0
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    cells = {(2, 0): (0, 0), (2, 3): (0, 1), (3, 5): (1, 0), (4, 0): (2, 0), (4, 3): (2, 1),
             (6, 0): (3, 0), (6, 3): (3, 1), (7, 9): (4, 0)}
    for (line, seed), (r, c) in cells.items():
        image = np.asarray(Image.open(tmp_path / "each" / f"{line:05d}-s{seed}.png"))
        np.testing.assert_array_equal(image, grid[r * SIDE:(r + 1) * SIDE, c * SIDE:(c + 1) * SIDE])


def test_sample_reads_the_newest_step_when_a_trainer_rotates_its_step_away(saved_run, tmp_path,
                                                                            monkeypatch):
    """A trainer saving every step with checkpoint.keep=1 removes the step sample chose while
    sample reads it: sample reads the new newest step instead of failing."""
    import shutil
    from sdxl_jax import sample
    _, wd, state, _ = saved_run
    mine = str(tmp_path / "run")
    shutil.copytree(wd, mine)
    ckdir = os.path.join(mine, "checkpoints")
    restore = ckpt_lib.Checkpointer.restore_params
    rotations = []

    def rotate_then_restore(self, step, *a, **k):
        if not rotations:  # what the trainer does between sample's choice and its array read
            shutil.copytree(os.path.join(ckdir, str(step)), os.path.join(ckdir, str(step + 1)))
            shutil.rmtree(os.path.join(ckdir, str(step)))
            rotations.append(step)
        return restore(self, step, *a, **k)
    monkeypatch.setattr(ckpt_lib.Checkpointer, "restore_params", rotate_then_restore)
    _, params, _ = sample.load_run(mine)
    assert rotations == [7] and sorted(os.listdir(ckdir)) == ["8"]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params),
                 jax.device_get(state.ema_params))


def test_a_failing_preview_is_logged_and_training_goes_on(saved_run, demo_cache, tmp_path, caplog):
    """The evaluator the loop calls: a preview that cannot be written (samples/ is a file here)
    is one warning; the validation figures are still written and the call returns."""
    from sdxl_jax.train.evaluate import Evaluator
    from sdxl_jax.train.step import StepConfig
    from sdxl_jax.models.weights import frozen_params
    cfg, _, state, mesh = saved_run
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "samples").write_text("not a folder")
    tok_l, tok_g = models.get_tokenizers("tiny")
    tokenize = lambda c: (models.tokenize(tok_l, c, 1), models.tokenize(tok_g, c, 1))  # noqa: E731
    unet = models.build_unet(ENGINE_PRESET, "float32")
    text_l, text_g = models.build_text_encoders(ENGINE_PRESET, "float32")

    class Scalars:
        def __init__(self):
            self.seen = {}

        def add_scalar(self, k, v, step):
            self.seen[k] = v
    writer = Scalars()
    ev = Evaluator(cfg, str(wd), mesh, unet, text_l, text_g, StepConfig.from_config(cfg),
                   frozen_params(cfg), tokenize, demo_cache, None, None, writer)
    with caplog.at_level("WARNING", logger="sdxl_jax.train"):
        ev(7, state)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and warned[0].startswith("step 7 | preview failed, training goes on: ")
    assert "val_ema/loss" in writer.seen and (wd / "samples").read_text() == "not a folder"
