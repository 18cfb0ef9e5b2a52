"""Training, cache building, sampling and export never import torch, diffusers or transformers.

Those three are test-only references (requirements.txt). One subprocess, in which importing any
of them raises ImportError (a meta-path finder installed before anything else), builds a latent
cache of the demo images, trains the engine config a few steps, samples a grid from the run and
exports it as a diffusers folder. Every import attempt of the three is recorded with the file
that made it: one from sdxl_jax/ or data_tools/ fails the test even when the code survives the
ImportError (an optional `try: import torch`); third-party optional ones (tensorboardX tries
torch) are allowed, as long as nothing is loaded.
"""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

DRIVER = r"""
import json, os, sys, traceback
BLOCKED = ("torch", "diffusers", "transformers")
ours = []  # attempts made by a module of this project (file under ROOT, outside site-packages)

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            frames = [f.filename for f in traceback.extract_stack()
                      if "importlib" not in f.filename and not f.filename.startswith("<")]
            importer = frames[-1] if frames else "?"
            if importer.startswith(ROOT) and "site-packages" not in importer:
                ours.append(f"{name} from {os.path.relpath(importer, ROOT)}")
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Block())
sys.path[:0] = [HERE, ROOT]
images, work = sys.argv[1:]
from helpers import tiny_config
from sdxl_jax import export, sample
from sdxl_jax.data import build_cache
from sdxl_jax.run_inputs import resolve_weights
from sdxl_jax.train.loop import train

cache = f"{work}/cache"
build_cache(tiny_config(), images_dir=images, out=cache, progress=False,
            vae_params=resolve_weights(tiny_config()).load(("vae",))["vae"])
wd = f"{work}/run"
summary = train(tiny_config(**{"data.cache_dir": cache, "train.steps": 2}), wd)
assert sample.main(["--workdir", wd, "--prompt", "red circle", "--seed", "0", "--steps", "2",
                    "--width", "64", "--height", "64", "--out", f"{work}/grid.png"]) == 0
assert export.main(["--workdir", wd, "--format", "diffusers", "--dtype", "fp32",
                    "--out", f"{work}/exported"]) == 0
print("RESULT", json.dumps({"attempts": ours, "steps": summary["end_step"],
                            "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}))
"""


def test_train_cache_sample_export_without_torch_diffusers_transformers(demo_images, tmp_path):
    script = f"HERE, ROOT = {HERE!r}, {os.path.dirname(HERE)!r}\n" + DRIVER
    proc = subprocess.run([sys.executable, "-c", script, demo_images, str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    assert result == {"attempts": [], "steps": 2, "loaded": []}
    assert os.path.getsize(tmp_path / "grid.png") > 0
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        assert os.listdir(tmp_path / "exported" / sub), sub
