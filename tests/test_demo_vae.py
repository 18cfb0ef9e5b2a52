"""The demo's own VAE (train/demo_vae.py): trained from scratch it reconstructs held-out demo
images and separates black from white in latent space (the property the "completely black"
experiment needs); a finished one is reused only when its settings match."""
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import config
from sdxl_jax import models
from sdxl_jax.data.demo import make_example
from sdxl_jax.train import demo_vae

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 120  # CI-sized; the demo's 800 reach 22.4 dB (measured, module docstring)


def unet_cfg(**overrides):
    cfg = config("ztsnr:tiny")
    cfg.data.demo_vae_steps = STEPS
    for k, v in overrides.items():
        node = cfg
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return cfg


# The demo trains its VAE in a one-device process (train.py on a CPU); in this suite's
# 8-device process the same 120 steps ran ~1.4× slower (2.3 vs 3.3 steps/s, measured)
TRAIN_IN_ONE_DEVICE_PROCESS = f"""
import sys
sys.path[:0] = {[HERE, os.path.dirname(HERE)]!r}
from test_demo_vae import unet_cfg
from sdxl_jax.train.prepare import train_demo_vae
print(train_demo_vae(unet_cfg(), sys.argv[1], sys.argv[2]))
"""


@pytest.fixture(scope="module")
def trained(demo_images, tmp_path_factory):
    os.environ["SDXL_JAX_CACHE_DIR"] = str(tmp_path_factory.mktemp("user_cache"))
    wd = str(tmp_path_factory.mktemp("demo_vae_run"))
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    proc = subprocess.run([sys.executable, "-c", TRAIN_IN_ONE_DEVICE_PROCESS, wd, demo_images],
                          env=dict(os.environ, XLA_FLAGS=flags), capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = proc.stdout.strip().splitlines()[-1]
    assert path == os.path.join(wd, "demo_vae", os.path.basename(path))  # trained here
    from sdxl_jax.runs import open_run
    return path, open_run(path).params("vae", on_host=True)


def _held_out(n=8, side=128):
    """Unseen demo images (another seed), plus a plain black and a plain white one."""
    imgs = [np.asarray(make_example(i, seed=1, side=side)[0].convert("RGB").resize((side, side)),
                       np.float32) / 127.5 - 1 for i in range(n)]
    black, white = np.full((side, side, 3), -1.0, np.float32), np.ones((side, side, 3), np.float32)
    return np.stack(imgs), black[None], white[None]


def _psnr_and_means(params, x):
    vae = models.build_vae("tiny", "float32")
    mean, _ = models.vae_encode(vae, params, x)
    y = np.asarray(models.vae_decode(vae, params, mean))
    mse = np.mean((y - x) ** 2, axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(4.0 / mse))), np.asarray(mean).mean(axis=(0, 1, 2))


def test_the_trained_demo_vae_reconstructs_and_separates_black_from_white(trained):
    path, params = trained
    held, black, white = _held_out()
    random_vae = jax.device_get(models.init_params("vae", "tiny", jax.random.fold_in(jax.random.PRNGKey(0), 1)))
    psnr, _ = _psnr_and_means(params, held)
    psnr_random, _ = _psnr_and_means(random_vae, held)
    assert psnr > 13.0 and psnr > psnr_random + 8.0, (psnr, psnr_random)  # measured: 14.7 vs 4.2 dB
    _, m_black = _psnr_and_means(params, black)
    _, m_white = _psnr_and_means(params, white)
    _, r_black = _psnr_and_means(random_vae, black)
    _, r_white = _psnr_and_means(random_vae, white)
    # the random VAE maps black and white to nearly the same latent; the trained one does not
    assert np.abs(m_black - m_white).max() > 1.0 > np.abs(r_black - r_white).max(), (m_black, m_white)
    assert json.load(open(os.path.join(path, demo_vae.MARKER)))["steps"] == STEPS


def test_a_finished_demo_vae_is_reused_only_when_its_settings_match(trained, demo_images, tmp_path, monkeypatch):
    """The resolver finds a finished demo VAE of the same settings (here the user-cache copy,
    from another workdir) and hands it to the cache build; other settings name another folder,
    which prepare_run must train first."""
    from sdxl_jax.run_inputs import resolve_vae
    path, params = trained
    again = resolve_vae(unet_cfg(), str(tmp_path / "other"))
    assert again.kind == "demo" and again.ready
    assert os.path.dirname(again.path) == os.path.join(os.environ["SDXL_JAX_CACHE_DIR"], "demo_vae")
    assert os.path.basename(again.path) == os.path.basename(path)
    from sdxl_jax.data.encode import vae_fingerprint
    assert again.fingerprint == vae_fingerprint(params, "tiny", unet_cfg().model.dtype)
    # any setting that changes the VAE (here the seed) names another directory, not yet trained
    other = resolve_vae(unet_cfg(**{"train.seed": 1}), str(tmp_path / "seed1"))
    assert not other.ready and other.path.startswith(str(tmp_path / "seed1"))
    assert os.path.basename(other.path) != os.path.basename(path)
    # a directory whose marker names other settings is not taken
    fake = tmp_path / ("0" * 16)
    fake.mkdir()
    shutil.copy(os.path.join(path, demo_vae.MARKER), fake / demo_vae.MARKER)
    assert demo_vae.finished(path) and not demo_vae.finished(str(fake))


def test_no_demo_vae_steps_is_one_clear_error(demo_images, tmp_path):
    """data.demo_vae_steps=0 means the seeded random VAE; a tool that asks for the trained demo
    VAE with it set so gets the key named, not an empty run."""
    from sdxl_jax.train.prepare import train_demo_vae
    with pytest.raises(ValueError, match="data.demo_vae_steps=0"):
        train_demo_vae(unet_cfg(**{"data.demo_vae_steps": 0}), str(tmp_path), demo_images)
    assert not os.listdir(tmp_path)
