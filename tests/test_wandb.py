"""Weights & Biases beside TensorBoard (sdxl_jax/train/writer.py), offline: the same scalars at the
same steps and the preview image reach both, read back with readers of their own file formats
(W&B's LevelDB-log `.wandb` records, TensorBoard's TFRecord events), not with the writer; a resume
continues the same W&B run id; an error finishes the run as failed. No train step is compiled."""
import glob
import json
import os
import struct
import sys

import numpy as np
import pytest
from helpers import config
from PIL import Image

from sdxl_jax.config import ConfigError, validate
from sdxl_jax.train.common import config_json
from sdxl_jax.train.writer import WANDB_ID_FILE, open_writer

pytest.importorskip("wandb")

SCALARS = {1: {"train/loss": 0.5, "train/lr": 1e-4},  # step → tag → value
           2: {"train/loss": np.float32(0.25), "train/lr": 2e-4},
           3: {"train/loss": 0.125, "train/lr": 3e-4, "val_ema/loss": 0.3}}


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """W&B quiet and hermetic: its settings / cache directories in the test's tmp, never ~."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.delenv("WANDB_MODE", raising=False)


def _cfg(**overrides):
    return config("ztsnr:tiny", {"log.wandb_project": "sdxl-jax-test", "log.wandb_mode": "offline",
                                 "log.wandb_run_name": "writer-test", **overrides})


def _wandb_records(path: str) -> list:
    """Every record of a `.wandb` file: a 7-byte ':W&B' header, then LevelDB-log blocks of 32 KiB
    holding chunks (crc32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, chunk, out = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(chunk)
            out.append(rec)
            chunk = b""
    return out


def _history(records) -> dict:
    """step → {key: value} of the logged rows."""
    rows = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {it.key or "/".join(it.nested_key): json.loads(it.value_json) for it in r.history.item}
            rows[row.pop("_step")] = {k: v for k, v in row.items() if not k.startswith("_")}
    return rows


def _one(records, kind):
    found = [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]
    assert len(found) == 1, (kind, len(found))
    return found[0]


def _tb_scalars(tb_dir: str) -> dict:
    """step → {tag: value} from TensorBoard's event files (TFRecord: u64 length, u32 crc, data,
    u32 crc), parsed as tensorboardX's Event protos."""
    from tensorboardX.proto.event_pb2 import Event
    out = {}
    for path in glob.glob(os.path.join(tb_dir, "events.out.tfevents.*")):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = Event()
            ev.ParseFromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                if v.WhichOneof("value") == "simple_value":
                    out.setdefault(ev.step, {})[v.tag] = v.simple_value
    return out


def _run_file(wd: str, nth: int) -> str:
    runs = sorted(glob.glob(os.path.join(wd, "wandb", "offline-run-*", "run-*.wandb")))
    return runs[nth]


def test_offline_run_records_the_scalars_image_and_config_and_resumes(tmp_path, wandb_env):
    wd = str(tmp_path / "run")
    os.makedirs(wd)
    cfg = _cfg()
    validate(cfg, num_devices=8)
    grid = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    with open_writer(cfg, wd, config_json(cfg)) as w:
        for step, tags in SCALARS.items():
            for tag, v in tags.items():
                w.add_scalar(tag, v, step)
        w.add_image("samples/ema", grid, 3, dataformats="HWC")

    # W&B: one offline run under <workdir>/wandb, its id the one kept for resuming
    run_id = open(os.path.join(wd, WANDB_ID_FILE)).read().strip()
    first = _wandb_records(_run_file(wd, 0))
    run = _one(first, "run")
    assert (run.run_id, run.project, run.display_name) == (run_id, "sdxl-jax-test", "writer-test")
    logged = {it.key: json.loads(it.value_json) for it in run.config.update}
    assert logged["train"]["steps"] == cfg.train.steps and logged["log"]["wandb_mode"] == "offline"
    hist = _history(first)
    assert sorted(hist) == [1, 2, 3]
    for step, tags in SCALARS.items():
        for tag, v in tags.items():
            assert hist[step][tag] == float(v), (step, tag)  # JSON keeps the float64 exactly
    image = {k.split("/", 2)[2]: v for k, v in hist[3].items() if k.startswith("samples/ema/")}
    assert (image["_type"], image["width"], image["height"]) == ("image-file", 24, 16)
    png = os.path.join(os.path.dirname(_run_file(wd, 0)), "files", image["path"])
    np.testing.assert_array_equal(np.asarray(Image.open(png).convert("RGB")), grid)
    assert _one(first, "exit").exit_code == 0

    # TensorBoard got the same tags at the same steps (float32 in its events)
    tb = _tb_scalars(os.path.join(wd, "tb"))
    assert sorted(tb) == [1, 2, 3]
    for step, tags in SCALARS.items():
        assert tb[step] == pytest.approx({t: float(np.float32(v)) for t, v in tags.items()}, rel=0, abs=0)

    # resume: the same W&B run id, the curve continues; an error finishes the run as failed
    with pytest.raises(RuntimeError, match="boom"):
        with open_writer(cfg, wd, config_json(cfg)) as w:
            w.add_scalar("train/loss", 0.0625, 4)
            raise RuntimeError("boom")
    second = _wandb_records(_run_file(wd, 1))
    assert _one(second, "run").run_id == run_id
    assert _history(second) == {4: {"train/loss": 0.0625}}
    assert _one(second, "exit").exit_code == 1


def test_no_wandb_without_a_project(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any import of wandb would now fail
    cfg = config("ztsnr:tiny")
    validate(cfg, num_devices=8)
    with open_writer(cfg, str(tmp_path), config_json(cfg)) as w:
        w.add_scalar("train/loss", 1.0, 1)
    assert w.wandb_run is None and not os.path.exists(tmp_path / "wandb")
    assert _tb_scalars(str(tmp_path / "tb")) == {1: {"train/loss": 1.0}}


@pytest.mark.parametrize("name", ["ztsnr:tiny", "vae_decoder:tiny"])
def test_config_names_a_missing_wandb_or_a_bad_mode(name, monkeypatch):
    for key in ("wandb_project", "wandb_entity", "wandb_mode", "wandb_run_name"):
        assert config(name).log[key] == ""  # both trainers have the section, W&B off
    with pytest.raises(ConfigError, match=r"log\.wandb_mode='offlin'"):
        validate(config(name, {"log.wandb_mode": "offlin"}))
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"log\.wandb_project='p': .*wandb package") as e:
        validate(config(name, {"log.wandb_project": "p"}))
    assert "\n" not in str(e.value)



@pytest.mark.parametrize("fail", [False, True])
def test_train_loop_hands_its_evaluation_the_wandb_writer(fail, tmp_path, monkeypatch, wandb_env):
    """train() with log.wandb_project set, on a task with no step to run (nothing compiles): the
    evaluation at step 0 writes through the loop's writer to W&B, which the loop finishes on exit,
    as failed when the evaluation raised."""
    from types import SimpleNamespace

    from sdxl_jax.run_inputs import RunInputs, VaeSource, Weights
    from sdxl_jax.train import loop
    grid = np.full((8, 8, 3), 200, np.uint8)

    def evaluate(step, state, writer):
        writer.add_scalar("val_ema/loss", 0.75, step)
        writer.add_image("samples/ema", grid, step, dataformats="HWC")
        if fail:
            raise RuntimeError("evaluation failed")
        return {"val_ema/loss": 0.75}

    step_fn = SimpleNamespace(compile_count=0, on_compile=None)
    task = loop.Task(name="fake", program=SimpleNamespace(abstract_state={}, shardings={}, step=step_fn),
                     stages=(loop.Stage(0, 0, lambda: None),), frozen=None,
                     fresh_state=lambda: SimpleNamespace(step=np.int32(0)), lr_schedule=lambda s: 0.0,
                     log_line=lambda s, m: "", metadata={}, evaluate=evaluate, eval_at_start=True)
    inputs = RunInputs("fake", Weights("tiny", "float32", "", 0, VaeSource("seeded")))  # no data
    monkeypatch.setattr(loop, "resolve_inputs", lambda cfg, workdir: inputs)
    monkeypatch.setattr(loop, "build_task", lambda cfg, inputs, plan, cleanup: task)
    wd = str(tmp_path / "run")
    if fail:
        with pytest.raises(RuntimeError, match="evaluation failed"):
            loop.train(_cfg(), wd)
    else:
        assert loop.train(_cfg(), wd)["eval"] == {0: {"val_ema/loss": 0.75}}
    records = _wandb_records(_run_file(wd, 0))
    row = _history(records)[0]
    assert row["val_ema/loss"] == 0.75 and row["samples/ema/_type"] == "image-file"
    assert _one(records, "exit").exit_code == (1 if fail else 0)
    assert _tb_scalars(os.path.join(wd, "tb")) == {0: {"val_ema/loss": 0.75}}
