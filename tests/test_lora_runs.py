"""LoRA and text-encoder-trained runs through the run reader and the CLIs: checkpoints saved by hand per the trainer's contract (train.trainable, meta trainable /
trained_text / lora), then
- export --format lora / lora-diffusers: files whose read_lora round trip is the run's adapters;
- export --merge-lora: single-file weights = source + (α/r)·B·A, recomputed in float64;
- sample --lora FILE --lora-scale S on a plain run = sampling a run that holds the merged weights;
- a unet+text run's export carries its trained text encoder, the other from the source.
The adapter maths and the file layouts themselves are tested in test_adapters.py and
test_lora_interop.py; these tests check what reaches the user's files.
"""
import dataclasses
import json
import logging
import os

import jax
import numpy as np
import pytest
from PIL import Image

from helpers import tiny_config
from sdxl_jax import export, sample
from sdxl_jax.adapters import AdapterConfig, init_adapters, make_plan, merge_params, read_lora
from sdxl_jax.checkpoint import Checkpointer
from sdxl_jax.models import init_params
from sdxl_jax.models.convert import flat_leaves
from sdxl_jax.models.safetensors_io import SafetensorsFile
from sdxl_jax.models.weights import cached_abstract_params, frozen_params, load_pretrained
from sdxl_jax.runs import open_run
from sdxl_jax.train.state import TrainState

PRESET = "tiny"
SIDE = 64  # 8×8 latents: the sampler compiles in seconds
LORA = AdapterConfig(rank=4, alpha=2.0, conv=True, conv_rank=2, conv_alpha=6.0,
                     models=("unet", "text_l"))  # LoCon convs, one text encoder: text_g stays


def run_config(trainable: str) -> dict:
    """The engine config with the tiny (SDXL-layout) model as a checkpoint stores it (JSON),
    train.trainable (and lora.*) set."""
    lora = {f"lora.{k}": v for k, v in dataclasses.asdict(LORA).items()}
    return json.loads(tiny_config(**{"model.preset": PRESET, "train.trainable": trainable, **lora})
                      .to_json_best_effort())


def save_run(workdir: str, config: dict, raw, ema, meta: dict, step: int = 5) -> str:
    state = TrainState(step=np.int32(step), params=raw, opt_state={}, ema_params=ema,
                       rng=np.zeros((2,), np.uint32), nonfinite=np.int32(0))
    ck = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    ck.save(step, state, {"iterator": {}}, config,
            {"latents": {"normalization": "scale", "mean": None, "std": None}, **meta})
    ck.close()
    return workdir


def noisy(tree, seed: int, std: float):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (np.asarray(x, np.float32) + std * rng.standard_normal(
        np.shape(x))).astype(np.float32), tree)


def assert_trees_equal(a, b):
    fa, fb = dict(flat_leaves(a)), dict(flat_leaves(b))
    assert fa.keys() == fb.keys()
    for p in fa:
        np.testing.assert_array_equal(np.asarray(fa[p]), np.asarray(fb[p]), err_msg="/".join(p))


@pytest.fixture(scope="module")
def source():
    """The seeded source models every run of run_config shares (frozen_params, UNet included)."""
    return jax.device_get(frozen_params(run_config("lora"), components=("unet", "vae", "text_l",
                                                                         "text_g")))


@pytest.fixture(scope="module")
def plan():
    return make_plan({n: cached_abstract_params(n, PRESET) for n in LORA.models}, LORA)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, plan):
    """A LoRA run: raw and EMA adapter trees random in every leaf (the up factors too)."""
    zeros = jax.device_get(init_adapters(plan, seed=0))
    raw, ema = noisy(zeros, 1, 0.1), noisy(zeros, 2, 0.1)
    wd = save_run(str(tmp_path_factory.mktemp("lora_run")), run_config("lora"), raw, ema,
                  {"trainable": "lora", "lora": dataclasses.asdict(LORA)})
    return wd, raw, ema


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """A full-UNet run of before train.trainable (no meta key): every UNet leaf perturbed, so
    its output is not zero (the init leaves conv_out at 0)."""
    unet = noisy(init_params("unet", PRESET, 0), 3, 0.02)
    cfg = run_config("unet")
    del cfg["train"]["trainable"]
    return save_run(str(tmp_path_factory.mktemp("plain_run")), cfg, unet, unet, {}), unet


@pytest.fixture(scope="module")
def kohya_file(lora_run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lora_files") / "style.safetensors")
    assert export.main(["--workdir", lora_run[0], "--format", "lora", "--dtype", "fp32",
                        "--out", out]) == 0
    return out


def delta64(t, p: dict) -> np.ndarray:
    """(α/r)·B·A in float64, Flax kernel layout: Dense (in, out), Conv (kh, kw, in, out)."""
    down, up = np.asarray(p["lora_down"], np.float64), np.asarray(p["lora_up"], np.float64)
    up = up.reshape(up.shape[0], -1)  # (out, r)
    d = (t.alpha / t.rank) * np.einsum("or,r...->o...", up, down)  # (out, in[, kh, kw])
    return d.transpose(2, 3, 1, 0) if d.ndim == 4 else d.T


# ---- export ------------------------------------------------------------------------------------

def test_lora_export_kohya_round_trip_is_the_runs_ema_adapters(lora_run, plan, kohya_file):
    _, _, ema = lora_run
    tree, read_plan = read_lora(kohya_file, PRESET)
    assert read_plan == plan  # every target, rank and alpha (conv_rank 2 / α 6 for the 3×3s)
    assert_trees_equal(tree, ema)  # EMA by default, float32: bit for bit
    md = SafetensorsFile(kohya_file).metadata
    assert (md["modelspec.prediction_type"], md["sdxl_jax.ztsnr"], md["ss_network_dim"],
            md["ss_network_alpha"], md["ss_sd_model_name"]) == ("v", "true", "4", "2.0",
                                                                "random init")
    assert json.loads(md["ss_network_args"]) == {"algo": "lora", "conv_dim": "2",
                                                 "conv_alpha": "6.0"}


def test_export_cli_logs_no_library_info(lora_run, tmp_path, caplog):
    """Orbax logs every file it touches at INFO through absl (57 lines for one export): a CLI
    shows its own lines only."""
    with caplog.at_level(logging.INFO):
        assert export.main(["--workdir", lora_run[0], "--format", "lora", "--out",
                            str(tmp_path / "quiet.safetensors")]) == 0
    assert [(r.name, r.getMessage()) for r in caplog.records if not r.name.startswith("sdxl_jax")] == []


def test_lora_diffusers_export_keeps_every_delta(lora_run, plan, tmp_path):
    wd, raw, _ = lora_run
    out = str(tmp_path / "peft.safetensors")
    assert export.main(["--workdir", wd, "--format", "lora-diffusers", "--weights", "raw",
                        "--out", out]) == 0
    st = SafetensorsFile(out)
    assert next(iter(st.tensors)).startswith(("unet.", "text_encoder."))
    assert {str(st.get(k).dtype) for k in st.tensors} == {"float16"}  # the default --dtype
    tree, read_plan = read_lora(out, PRESET)
    assert {n: list(t) for n, t in read_plan.items()} == {n: list(t) for n, t in plan.items()}
    for name, targets in plan.items():
        for path, t in targets.items():
            got, want = (delta64(read_plan[name][path], _get(tree[name], path)),
                         delta64(t, _get(raw[name], path)))
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * np.abs(want).max(),
                                       err_msg=f"{name} {'/'.join(path)}")


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def test_merge_lora_single_file_is_source_plus_scaled_delta(lora_run, plan, source, tmp_path):
    wd, _, ema = lora_run
    out = str(tmp_path / "merged.safetensors")
    with pytest.raises(SystemExit, match="^error: .*LoRA run.*--merge-lora"):
        export.main(["--workdir", wd, "--format", "single-file", "--out", out])
    assert not os.path.exists(out)
    assert export.main(["--workdir", wd, "--format", "single-file", "--merge-lora", "--dtype",
                        "fp32", "--out", out]) == 0
    got = load_pretrained(out, PRESET, ("unet", "text_l", "text_g"))
    assert_trees_equal(got["text_g"], source["text_g"])  # not adapted: the source, bit for bit
    for name in ("unet", "text_l"):
        moved = 0.0
        for path, w in flat_leaves(source[name]):
            t = plan[name].get(path[:-1]) if path[-1] == "kernel" else None
            x = np.asarray(_get(got[name], path))
            if t is None:
                np.testing.assert_array_equal(x, w, err_msg="/".join(path))
                continue
            want = np.asarray(w, np.float64) + delta64(t, _get(ema[name], path[:-1]))
            np.testing.assert_allclose(x, want, rtol=1e-6, atol=1e-7, err_msg="/".join(path))
            moved = max(moved, float(np.abs(want - w).max()))
        assert moved > 1e-2, name  # the adapters really changed the weights
    # the same merge into a diffusers folder: every model equal to the single file's, bitwise
    folder = str(tmp_path / "merged_diffusers")
    assert export.main(["--workdir", wd, "--format", "diffusers", "--merge-lora", "--dtype", "fp32",
                        "--out", folder]) == 0
    from_folder = load_pretrained(folder, PRESET, ("unet", "text_l", "text_g"))
    for name in ("unet", "text_l", "text_g"):
        assert_trees_equal(from_folder[name], got[name])


def test_lora_run_errors_are_one_clear_line(lora_run, plain_run, tmp_path):
    out = str(tmp_path / "x.safetensors")
    with pytest.raises(SystemExit, match="^error: .*trained 'unet'.*no LoRA to read"):
        export.main(["--workdir", plain_run[0], "--format", "lora", "--out", out])
    with pytest.raises(SystemExit, match="^error: --merge-lora: .*no adapters to merge"):
        export.main(["--workdir", plain_run[0], "--format", "single-file", "--merge-lora",
                     "--out", out])
    with pytest.raises(SystemExit, match="^error: --format lora writes the adapters alone"):
        export.main(["--workdir", lora_run[0], "--format", "lora", "--merge-lora", "--out", out])
    with pytest.raises(ValueError, match="no LoRA to read"):
        open_run(plain_run[0]).adapters()
    assert not os.path.exists(out)


# ---- sample --lora and text-encoder runs ---------------------------------------------------------

@pytest.fixture(scope="module")
def merged_run(tmp_path_factory, plain_run, source, kohya_file):
    """A unet+text run holding the plain run's UNet and the source CLIP-L with the kohya file
    merged at SCALE, as the trainer would save a run that trained them to those weights."""
    tree, file_plan = read_lora(kohya_file, PRESET)
    merged = merge_params({"unet": plain_run[1], "text_l": source["text_l"]}, tree, file_plan,
                          SCALE)
    wd = save_run(str(tmp_path_factory.mktemp("merged_run")), run_config("unet+text"), merged,
                  merged, {"trainable": "unet+text", "trained_text": ["text_l"]})
    return wd, merged


SCALE = 0.7


def _sample(wd, out, *extra):
    """test_sample.py's grid (2 prompts × 2 seeds, 4 steps, 64²): one compiled sampler."""
    assert sample.main(["--workdir", wd, "--prompt", "completely black", "--prompt", "red circle",
                        "--seed", "0", "--seed", "3", "--steps", "4", "--width", str(SIDE),
                        "--height", str(SIDE), "--out", out, *extra]) == 0
    return np.asarray(Image.open(out))


def test_sample_lora_equals_sampling_the_merged_run(plain_run, merged_run, kohya_file, tmp_path):
    with_lora = _sample(plain_run[0], str(tmp_path / "lora.png"), "--lora", kohya_file,
                        "--lora-scale", str(SCALE))
    merged = _sample(merged_run[0], str(tmp_path / "merged.png"))
    np.testing.assert_array_equal(with_lora, merged)
    # not equal for want of sensitivity: the merged weights moved, and the pixels are neither
    # saturated nor alike across the grid, so different weights would show in the image
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for (_, a), (_, b) in
                zip(flat_leaves(merged_run[1]["unet"]), flat_leaves(plain_run[1])))
    assert moved > 1e-2
    assert 0.5 < np.mean((merged > 0) & (merged < 255))
    assert not np.array_equal(merged[:SIDE, :SIDE], merged[SIDE:, :SIDE])  # prompts differ


def test_unet_text_run_exports_its_trained_encoder(merged_run, source, tmp_path):
    wd, merged = merged_run
    run = open_run(wd)
    assert (run.trainable, run.trained_text) == ("unet+text", ("text_l",))
    out = str(tmp_path / "unet_text.safetensors")
    assert export.main(["--workdir", wd, "--format", "single-file", "--dtype", "fp32",
                        "--out", out]) == 0
    got = load_pretrained(out, PRESET, ("unet", "text_l", "text_g"))
    assert_trees_equal(got["text_l"], merged["text_l"])  # the checkpoint's, bit for bit
    assert_trees_equal(got["unet"], merged["unet"])
    assert_trees_equal(got["text_g"], source["text_g"])  # untrained: the source
    diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for (_, a), (_, b) in
               zip(flat_leaves(got["text_l"]), flat_leaves(source["text_l"])))
    assert diff > 1e-2  # the trained encoder is not the frozen source
