"""Export safety: an existing export is never replaced without
overwrite (--overwrite), and a per_channel run's single file, which other tools decode with
the 0.13025 scale only (METHODS §16), needs allow_per_channel (--allow-per-channel), warns and
carries the statistics in its metadata."""
import json
import logging
import os

import numpy as np
import pytest

from configs.ztsnr import get_config
from sdxl_jax import export
from sdxl_jax.models import build
from sdxl_jax.models.safetensors_io import SafetensorsFile
from sdxl_jax.models.weights import frozen_params

PRESET = "tiny"
MEAN, STD = [4.81, 0.16, 1.35, -1.78], [9.92, 6.28, 7.6, 6.0]  # METHODS §10's SDXL figures


@pytest.fixture(scope="module")
def params():
    """Seeded tiny weights (numpy init, nothing compiled)."""
    return {"unet": build.init_params("unet", PRESET, 0), **frozen_params(get_config(PRESET))}


def meta(title: str, **kw) -> dict:
    return {"title": title, "step": 1, "ztsnr": True, "latent_normalization": "scale",
            "scaling_factor": 0.13025, **kw}


def tree_bytes(root) -> dict:
    """{relative path: bytes} of every file under `root`."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def test_single_file_is_not_overwritten_without_overwrite(params, tmp_path):
    out = str(tmp_path / "model.safetensors")
    export.export_single_file(params, PRESET, out, "fp16", meta("first"))
    before = open(out, "rb").read()
    with pytest.raises(FileExistsError, match=f"{out} already exists; pass --overwrite"):
        export.export_single_file(params, PRESET, out, "fp16", meta("second"))
    assert open(out, "rb").read() == before
    export.export_single_file(params, PRESET, out, "fp16", meta("second"), overwrite=True)
    assert SafetensorsFile(out).metadata["modelspec.title"] == "second"
    folder = tmp_path / "a_folder.safetensors"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        export.export_single_file(params, PRESET, str(folder), "fp16", meta("x"), overwrite=True)


def test_diffusers_folder_is_not_overwritten_without_overwrite(params, tmp_path):
    out = str(tmp_path / "model_diffusers")
    export.export_diffusers(params, PRESET, out, "fp16", meta("first"))
    before = tree_bytes(out)
    with pytest.raises(FileExistsError, match=f"{out} already exists; pass --overwrite"):
        export.export_diffusers(params, PRESET, out, "fp16", meta("second"))
    assert tree_bytes(out) == before
    export.export_diffusers(params, PRESET, out, "fp16", meta("second"), overwrite=True)
    with open(os.path.join(out, "sdxl_jax_export.json")) as f:
        assert json.load(f)["title"] == "second"
    assert sorted(os.listdir(tmp_path)) == ["model_diffusers"]  # no staging or old copies left
    other = tmp_path / "photos"  # not an export: never replaced, even with overwrite
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="is not a diffusers export"):
        export.export_diffusers(params, PRESET, str(other), "fp16", meta("x"), overwrite=True)
    assert (other / "holiday.jpg").read_bytes() == b"keep me"


def test_cli_refuses_an_existing_out_before_reading_the_checkpoint(tmp_path):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"an earlier export")
    # no run at --workdir: the existing --out is reported first, so nothing was loaded
    with pytest.raises(SystemExit, match="^error: .* already exists; pass --overwrite"):
        export.main(["--workdir", str(tmp_path / "no_run"), "--format", "single-file",
                     "--out", str(out)])
    assert out.read_bytes() == b"an earlier export"


def test_per_channel_single_file_needs_allow_warns_and_records_statistics(params, tmp_path,
                                                                         caplog):
    pc = meta("pc", latent_normalization="per_channel", latents_mean=MEAN, latents_std=STD)
    out = str(tmp_path / "pc.safetensors")
    with pytest.raises(ValueError, match="per_channel.*decode.*0.13025.*--allow-per-channel"):
        export.export_single_file(params, PRESET, out, "fp16", pc)
    assert not os.path.exists(out)
    with caplog.at_level(logging.WARNING, logger="sdxl_jax.export"):
        export.export_single_file(params, PRESET, out, "fp16", pc, allow_per_channel=True)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "per_channel" in warned[0] and "ComfyUI" in warned[0]
    md = SafetensorsFile(out).metadata
    assert md["sdxl_jax.latent_normalization"] == "per_channel"
    assert json.loads(md["sdxl_jax.latents_mean"]) == MEAN
    assert json.loads(md["sdxl_jax.latents_std"]) == STD
    # a scale run needs no flag and logs no warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdxl_jax.export"):
        export.export_single_file(params, PRESET, str(tmp_path / "s.safetensors"), "fp16",
                                  meta("scale"))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert np.isfinite(SafetensorsFile(str(tmp_path / "s.safetensors"))
                       .get("model.diffusion_model.out.2.weight")).all()


def test_temporaries_of_killed_exports_are_cleaned_at_the_next_export(params, tmp_path):
    """A killed export leaves `X.safetensors.tmp-PID` (and a diffusers export `.X.tmp-PID/`);
    the next export into that folder removes those of dead PIDs, keeps a live process's, and
    puts back a diffusers folder whose replacement was killed mid-swap."""
    import subprocess
    import sys
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a PID that no process has any more
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        dead, alive = gone.pid, live.pid
        (tmp_path / f"model.safetensors.tmp-{dead}").write_bytes(b"half a model")
        (tmp_path / f"other.safetensors.tmp-{alive}").write_bytes(b"being written")
        (tmp_path / f".m_diffusers.tmp-{dead}" / "unet").mkdir(parents=True)
        (tmp_path / f".kept_diffusers.old-{dead}").mkdir()  # the swap was killed: no kept_diffusers
        (tmp_path / f".kept_diffusers.old-{dead}" / "model_index.json").write_text("{}")
        (tmp_path / f"notes.tmp-{dead}").write_text("not an export's")
        export.export_single_file(params, PRESET, str(tmp_path / "new.safetensors"), "fp16",
                                  meta("new"))
        assert sorted(os.listdir(tmp_path)) == ["kept_diffusers", "new.safetensors",
                                                f"notes.tmp-{dead}",
                                                f"other.safetensors.tmp-{alive}"]
        assert (tmp_path / "kept_diffusers" / "model_index.json").read_text() == "{}"
    finally:
        live.kill()
        live.wait()
