"""Readers of a run whose run directory is on gs:// (a GCS server on loopback,
conftest.gcs_server): `sample` and `export` give byte-identical outputs for the same checkpoint
on gs:// and on local disk, and write their outputs to gs:// (`--out gs://…`) too."""
import json
import os

import jax
import pytest

from helpers import ENGINE_PRESET, tiny_config, unet_program
from sdxl_jax import checkpoint as ckpt_lib
from sdxl_jax import models, paths

SIDE = 64  # 8×8 latents: the sampler compiles in seconds


def _save(workdir, cfg, state):
    ck = ckpt_lib.Checkpointer(paths.join(workdir, "checkpoints"), async_save=False)
    meta = {"latents": {"normalization": "scale", "mean": None, "std": None}}
    ck.save(7, state, {"stage": 0, "iterator": {}}, json.loads(cfg.to_json_best_effort()), meta)
    ck.close()


@pytest.fixture(scope="module")
def state_and_config(demo_cache):
    cfg = tiny_config(**{"data.cache_dir": demo_cache})
    prog = unet_program(cfg)
    params = models.init_params("unet", ENGINE_PRESET, 0)
    params["conv_out"]["kernel"] = params["conv_out"]["kernel"] + 0.05  # non-zero output
    state = prog.init_state(params, jax.random.PRNGKey(0))
    return cfg, state.replace(ema_params=jax.tree.map(lambda x: x * 0.5, state.ema_params))


def test_sample_and_export_from_and_to_gcs_match_local(state_and_config, gcs_dir, tmp_path):
    from sdxl_jax.export import main as export_main
    from sdxl_jax.sample import main as sample_main
    cfg, state = state_and_config
    local, remote = str(tmp_path / "run"), gcs_dir + "/run"
    _save(local, cfg, state)
    _save(remote, cfg, state)
    png = {}
    for name, wd, out in (("local", local, str(tmp_path / "local.png")),
                          ("gcs", remote, gcs_dir + "/out/grid.png")):
        assert sample_main(["--workdir", wd, "--prompt", "red circle", "--seed", "0", "--steps", "2",
                            "--width", str(SIDE), "--height", str(SIDE), "--out", out]) == 0
        png[name] = paths.read_bytes(out)
    assert png["gcs"] == png["local"] and png["local"][:8] == b"\x89PNG\r\n\x1a\n"
    pngs = {}  # --out DIR/: one PNG per image, into a gs:// prefix too
    for name, out in (("local", str(tmp_path / "pngs") + "/"), ("gcs", gcs_dir + "/out/pngs/")):
        assert sample_main(["--workdir", local, "--prompt", "red circle", "--seed", "0", "--steps", "2",
                            "--width", str(SIDE), "--height", str(SIDE), "--out", out]) == 0
        pngs[name] = {n: paths.read_bytes(out + n) for n in paths.listdir(out)}
    assert pngs["gcs"] == pngs["local"] and list(pngs["local"]) == ["00001-s0.png"]
    model = {}
    for name, wd, out in (("local", local, str(tmp_path / "local.safetensors")),
                          ("gcs", remote, gcs_dir + "/out/model.safetensors")):
        assert export_main(["--workdir", wd, "--format", "single-file", "--out", out]) == 0
        model[name] = paths.read_bytes(out)
    assert model["gcs"] == model["local"] and len(model["local"]) > 1_000_000
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        export_main.__wrapped__(["--workdir", remote, "--format", "single-file",
                                 "--out", gcs_dir + "/out/model.safetensors"])
