"""One resolver of a run's inputs (sdxl_jax.run_inputs): train.py and build_cache resolve the
same VAE for the same config; every cache a run reads is checked against the run before
anything compiles, in one line naming both sides and the command that rebuilds it; and that
command, printed by train.py, works exactly as printed.

Foreign caches are made with data_tools.bench_loader.pool_encode (8×8 pooling, fingerprint
"pool8"): no VAE to compile, and a fingerprint no real VAE has.
"""
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from data_tools.bench_loader import pool_encode
from helpers import ROOT, config, tiny_config
from sdxl_jax.config import ConfigError
from sdxl_jax.data import cache as C
from sdxl_jax.data.build import build_cache
from sdxl_jax.data.demo import make_demo_dataset
from sdxl_jax.data.encode import vae_fingerprint
from sdxl_jax.run_inputs import Command, check_caches, resolve_run
from sdxl_jax.train.loop import train


def _pool_cache(cfg, images, out):
    build_cache(cfg, images_dir=str(images), out=str(out), encode_fn=pool_encode,
                encoder_fingerprint="pool8", process_index=0, process_count=1, progress=False)
    return str(out)


@pytest.fixture(scope="module")
def vae_run(demo_images, tmp_path_factory):
    """A configs/vae_decoder.py run (the demo VAE's recipe, one step): a VAE that is neither
    the seeded init nor model.pretrained."""
    from sdxl_jax.config import apply_overrides
    from sdxl_jax.train import demo_vae
    vcfg = apply_overrides(demo_vae.vae_config(config("ztsnr:tiny"), demo_images),
                           {"train.steps": 1, "checkpoint.every_steps": 1, "train.warmup_steps": 0})
    wd = str(tmp_path_factory.mktemp("vae_run"))
    train(vcfg, wd)
    return wd


@pytest.fixture(scope="module")
def few_images(tmp_path_factory):
    out = tmp_path_factory.mktemp("few")
    make_demo_dataset(str(out), n=12, seed=3)  # 10+ training images: one global batch of 8
    return str(out)


def test_build_cache_cli_encodes_with_model_vae_workdir(vae_run, few_images, tmp_path):
    """The measured bug: build_cache with --config.model.vae_workdir=RUN wrote latents of the
    seeded VAE. Now its manifest carries the fingerprint of RUN's VAE, the one the trainer
    resolves for the same config."""
    out = tmp_path / "c"
    proc = subprocess.run([sys.executable, "-m", "data_tools.build_cache", "--images", few_images,
                           "--out", str(out), "--config", "configs/ztsnr.py:tiny",
                           f"--config.model.vae_workdir={vae_run}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = config("ztsnr:tiny", {"model.vae_workdir": vae_run, "data.images_dir": few_images,
                                "data.cache_dir": str(out)})
    inputs = resolve_run(cfg, str(tmp_path / "wd"))
    from sdxl_jax.runs import open_run
    want = vae_fingerprint(open_run(vae_run).params("vae", on_host=True), "tiny", cfg.model.dtype)
    assert inputs.vae.kind == "run" and inputs.vae.fingerprint == want
    assert C.load_manifest(str(out))["vae_fingerprint"] == want
    seeded = resolve_run(config("ztsnr:tiny", {"data.images_dir": few_images, "data.cache_dir": str(out)}),
                         None).vae.fingerprint
    assert seeded != want


def test_train_and_build_cache_resolve_the_same_inputs(vae_run, few_images, tmp_path):
    """The RunInputs train.py's prepare phase ends with (the cache it built, the VAE with its
    fingerprint, the loader, the stages) equal build_cache's for the same config."""
    from sdxl_jax.run_inputs import resolve_build
    from sdxl_jax.train.prepare import prepare_run
    cache = str(tmp_path / "cache")
    cfg = tiny_config(**{"model.vae_workdir": vae_run, "data.images_dir": few_images,
                         "data.cache_dir": cache})
    trained = prepare_run(cfg, str(tmp_path / "wd"))
    _, built = resolve_build(cfg, images=few_images, out=cache)  # what data_tools.build_cache runs
    assert trained == built
    assert trained.vae.fingerprint == C.load_manifest(cache)["vae_fingerprint"]
    assert trained.stages[0].caches[0].exists and trained.stages[0].buckets == ((128, 128),)
    assert cfg.model.vae_workdir == vae_run and cfg.data.cache_dir == cache  # cfg untouched


def _refused(cfg, tmp_path, match):
    """loop.train refuses before building anything (no program, no checkpoint)."""
    wd = tmp_path / "wd"
    with pytest.raises(C.CacheError, match=match) as e:
        train(cfg, str(wd), command=Command(os.path.join(ROOT, "configs", "ztsnr.py") + ":tiny"))
    assert not (wd / "checkpoints").exists()
    return str(e.value)


def test_a_cache_of_another_vae_is_refused_naming_both(few_images, tmp_path):
    foreign = _pool_cache(tiny_config(), few_images, tmp_path / "pool")
    cfg = tiny_config(**{"data.cache_dir": foreign})
    run_vae = resolve_run(cfg, None).vae.fingerprint
    msg = _refused(cfg, tmp_path, "was encoded by VAE pool8")
    assert run_vae in msg and "the seeded random VAE" in msg
    assert f"--images {few_images} --out {foreign}" in msg and msg.rstrip().endswith("--rebuild")


def test_every_stage_cache_is_checked(demo_cache, few_images, tmp_path):
    """Measured before: two stages whose caches came from different VAEs trained, exit 0."""
    foreign = _pool_cache(tiny_config(), few_images, tmp_path / "pool")
    cfg = tiny_config(**{"data.cache_dir": demo_cache,
                         "train.stages": ({"steps": 1}, {"steps": 1, "cache_dir": foreign})})
    _refused(cfg, tmp_path, rf"the cache {foreign} was encoded by VAE pool8")


def test_every_source_cache_is_checked(few_images, tmp_path):
    foreign = _pool_cache(tiny_config(), few_images, tmp_path / "pool")
    cfg = tiny_config(**{"data.sources": ({"cache_dir": foreign, "name": "pooled"},)})
    _refused(cfg, tmp_path, rf"the cache {foreign} \(data source 'pooled'\) was encoded by VAE pool8")


def test_two_sources_in_one_cache_folder_are_refused(tmp_path):
    """Measured before: both trained, exit 0, the second source's loss on the first's records."""
    a, b = tmp_path / "a", tmp_path / "b"
    make_demo_dataset(str(a), n=4, seed=1)
    make_demo_dataset(str(b), n=4, seed=2)
    shared = str(tmp_path / "shared")
    cfg = tiny_config(**{"data.sources": ({"images_dir": str(a), "cache_dir": shared},
                                          {"images_dir": str(b), "cache_dir": shared})})
    with pytest.raises(C.CacheError, match=rf"data sources 'a' \(images:{a}\) and 'b' \(images:{b}\) "
                                           rf"share the cache folder {shared}"):
        check_caches(cfg, resolve_run(cfg, str(tmp_path / "wd")))


def test_a_cache_holding_another_source_is_refused(demo_images, tmp_path):
    other = tmp_path / "other"
    make_demo_dataset(str(other), n=4, seed=5)
    cache = _pool_cache(tiny_config(), other, tmp_path / "c")
    cfg = tiny_config(**{"data.sources": ({"images_dir": demo_images, "cache_dir": cache},)})
    inputs = resolve_run(cfg, str(tmp_path / "wd"))
    with pytest.raises(C.CacheError, match=rf"holds images:{other}, but this run reads it as "
                                           rf"images:{demo_images}"):
        check_caches(cfg, _same_vae(inputs, "pool8"))  # past the VAE check, to the source one


def _same_vae(inputs, fingerprint):
    """`inputs` with its VAE's fingerprint set (to reach the checks after the VAE one)."""
    import dataclasses
    vae = dataclasses.replace(inputs.vae, fingerprint=fingerprint)
    return dataclasses.replace(inputs, weights=dataclasses.replace(inputs.weights, vae=vae))


def test_kohya_folders_of_the_same_name_keep_their_caches_in_any_order(tmp_path):
    """Two kohya folders named `cat` (A/5_cat, B/3_cat): each keeps its cache folder whichever
    is listed first (derived from its path, not from the order)."""
    from sdxl_jax.data.sources import resolve_sources
    for root, n in (("A", 5), ("B", 3)):
        (tmp_path / root / f"{n}_cat").mkdir(parents=True)
    entries = [{"images_dir": str(tmp_path / "A")}, {"images_dir": str(tmp_path / "B")}]
    got = []
    for order in (entries, entries[::-1]):
        cfg = tiny_config(**{"data.sources": tuple(order)})
        got.append({s.images_dir: s.cache_dir for s in resolve_sources(cfg, str(tmp_path / "wd"))})
    assert got[0] == got[1]
    for path, cache in got[0].items():
        assert cache == os.path.join(str(tmp_path / "wd"), "cache",
                                     f"cat-{hashlib.sha1(path.encode()).hexdigest()[:8]}")


def test_masked_loss_on_a_cache_without_masks_is_refused(demo_cache, tmp_path):
    """Measured before: exit 0, the loss identical to the unmasked run."""
    cfg = tiny_config(**{"data.cache_dir": demo_cache, "loss.masked": True})
    _refused(cfg, tmp_path, rf"loss.masked=true, but the cache {demo_cache} holds no masks")


def test_vae_workdir_of_a_unet_run_is_refused(reference_run, tmp_path):
    """Accepted by train.py before (export refused it)."""
    _, unet_run, _, _ = reference_run
    cfg = tiny_config(**{"model.vae_workdir": unet_run, "data.cache_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=rf"model.vae_workdir='{unet_run}' is a 'unet' run, not a "
                                          "VAE run: give the --workdir of a configs/vae_decoder.py run"):
        resolve_run(cfg, str(tmp_path / "wd"))


# train.py with tests/helpers.tiny_config's settings (the suite's compiled step, shared through
# the persistent compilation cache) as command-line overrides
TINY = ["--config.model.preset=micro", "--config.model.dtype=float32", "--config.data.demo_vae_steps=0",
        "--config.latents.normalization=scale", "--config.data.buckets.min_side=128",
        "--config.data.buckets.max_side=128", "--config.data.buckets.max_ar_error=1.0",
        "--config.data.val_fraction=0.1", "--config.train.global_batch_size=8",
        "--config.train.warmup_steps=0", "--config.train.learning_rate=3e-4",
        "--config.train.lr_schedule=constant", "--config.train.log_every=1",
        "--config.sample.every_steps=0", "--config.checkpoint.async_save=False",
        "--config.mesh.data=-1", "--config.mesh.fsdp=2", "--config.mesh.min_fsdp_size=1024",
        "--config.checkpoint.every_steps=1", "--config.data.shard_size=16"]


def _train_py(workdir, images, cache, steps):
    return subprocess.run([sys.executable, "train.py", "--config", "configs/ztsnr.py:tiny", "--workdir",
                           workdir, f"--config.data.images_dir={images}", f"--config.data.cache_dir={cache}",
                           f"--config.train.steps={steps}", *TINY],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "SDXL_JAX_DEBUG"})


def test_the_printed_repair_command_works_as_printed(few_images, tmp_path):
    """Measured before: the printed command had placeholders, and filled in with the trainer's
    config it was refused ("built with different settings (vae)"). Now: a truncated shard stops
    train.py before compiling with the exact command; run verbatim, it rebuilds the shard and the
    run resumes."""
    wd, cache = str(tmp_path / "wd"), str(tmp_path / "cache")
    first = _train_py(wd, few_images, cache, 2)
    assert first.returncode == 0, first.stderr[-2000:]
    shutil.rmtree(os.path.join(wd, "checkpoints", "2"))  # as if killed after step 1's checkpoint
    shard = os.path.join(cache, C.load_manifest(cache)["shards"][0]["name"] + C.SHARD_EXT)
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    broken = _train_py(wd, few_images, cache, 2)
    assert broken.returncode == 1
    line = broken.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: cache shard {shard}: ") and "<" not in line, line
    printed = re.search(r"rerun `([^`]+)`", line).group(1)
    repair = subprocess.run(shlex.split(printed), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert repair.returncode == 0, repair.stderr[-2000:]
    resumed = _train_py(wd, few_images, cache, 2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step 1" in resumed.stdout and "finished at step 2" in resumed.stdout


def test_a_resumed_run_keeps_its_latent_normalisation(reference_run, tmp_path):
    """The reference run's checkpoints, resumed with other latent settings (as after its cache
    was rebuilt from other data), stop at the restore with both settings named."""
    cfg, ref_wd, _, _ = reference_run
    wd = tmp_path / "wd"
    shutil.copytree(os.path.join(ref_wd, "checkpoints"), wd / "checkpoints")
    other = tiny_config(**{"data.cache_dir": cfg.data.cache_dir, "train.steps": cfg.train.steps + 1,
                           "latents.scale_factor": 0.5})
    with pytest.raises(ValueError, match=r"normalised latents with \{.*'scale_factor': 0.13025.*\}; this run "
                                         r"would use \{.*'scale_factor': 0.5"):
        train(other, str(wd))


def test_the_repair_command_of_a_demo_run_names_its_vae(monkeypatch, tmp_path):
    """The demo resolves its own VAE (no model.vae_workdir in its config): the command carries
    it, with the trainer's config file and overrides as given (both flag forms)."""
    from sdxl_jax.run_inputs import CacheInput, RunInputs, StageInputs, VaeSource, Weights, rebuild_command
    monkeypatch.chdir(ROOT)
    argv = ["--config", "configs/ztsnr.py:tiny", "--workdir", "wd", "--config.train.steps", "5",
            "--config.data.shard_size=16"]
    command = Command.from_argv("configs/ztsnr.py:tiny", argv)
    assert command == Command(os.path.join(ROOT, "configs", "ztsnr.py") + ":tiny",
                              ("--config.train.steps=5", "--config.data.shard_size=16"))
    cache = CacheInput("data", "/r/cache", images_dir="/r/demo_data")
    inputs = RunInputs("unet", Weights("tiny", "bfloat16", "", 0, VaeSource("demo", "/v/demo_vae/ab", "fp")),
                       (StageInputs(0, 5, 8, (cache,)),))
    got = shlex.split(rebuild_command(cache, inputs, command, verify=True))
    assert got[1:] == ["-m", "data_tools.build_cache", "--images", "/r/demo_data", "--out", "/r/cache",
                       "--config", os.path.join(ROOT, "configs", "ztsnr.py") + ":tiny",
                       "--config.train.steps=5", "--config.data.shard_size=16",
                       "--config.model.vae_workdir=/v/demo_vae/ab", "--verify"]
    assert os.path.samefile(shutil.which(got[0]) or got[0], sys.executable)
