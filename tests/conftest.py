"""Test-wide setup: 8 simulated CPU devices (before JAX is imported), quiet HF libraries."""
import os

# 8 simulated devices; XLA:CPU's LLVM back end at -O0 without its expensive passes compiles the
# tiny train step ~40 % faster, and the suite is compile-bound (its models run in milliseconds).
# Subprocesses (fault injection, multi-host) inherit these flags.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One persistent XLA cache for the whole suite and its subprocesses: the same train step compiled
# by several tests (or a restarted training subprocess) is compiled once.
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "sdxl_jax_test_xla_cache"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory):
    """A small generated demo dataset (images + .txt captions), shared by the whole session."""
    from sdxl_jax.data.demo import make_demo_dataset
    out = tmp_path_factory.mktemp("demo_images")
    make_demo_dataset(str(out), n=48, seed=0)
    return str(out)


@pytest.fixture(scope="session")
def demo_cache(demo_images, tmp_path_factory):
    """The latent cache of `demo_images`, encoded by the tiny VAE the trainer itself uses."""
    from helpers import tiny_config
    from sdxl_jax.data import build_cache
    out = tmp_path_factory.mktemp("demo_cache")
    build_cache(tiny_config(), images_dir=demo_images, out=str(out), progress=False)
    return str(out)


REFERENCE_STEPS = 8


@pytest.fixture(scope="session")
def reference_run(demo_cache, tmp_path_factory):
    """The uninterrupted reference training run (tests/helpers.py config, 8 steps, checkpoint
    every 2): resume, fault-injection and multi-host tests all compare against it."""
    from helpers import tiny_config
    from sdxl_jax.train.loop import train
    wd = str(tmp_path_factory.mktemp("reference_run"))
    cfg = tiny_config(**{"data.cache_dir": demo_cache, "train.steps": REFERENCE_STEPS,
                         "checkpoint.every_steps": 2})
    log = []
    summary = train(cfg, wd, batch_log=log)
    return cfg, wd, summary, log


# The suite runs on 2 xdist workers, one test module per worker at a time (pytest.ini). The
# modules that compile train steps and run training subprocesses go first, longest first, so
# the quick modules fill in behind them instead of leaving one worker alone at the end.
_LONGEST_FIRST = ("test_reliability", "test_train", "test_trainable", "test_accumulation", "test_multihost",
                  "test_vae_decoder", "test_lora_interop", "test_cli_errors", "test_demo_vae", "test_sample",
                  "test_lora_runs", "test_scale", "test_interop", "test_attention", "test_sharding_golden",
                  "test_models", "test_tfds", "test_export_safety", "test_checkpoints", "test_runs",
                  "test_step_sweep", "test_workdir_lock")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.module.__name__.rsplit(".", 1)[-1]
        return _LONGEST_FIRST.index(name) if name in _LONGEST_FIRST else len(_LONGEST_FIRST)
    items.sort(key=rank)  # stable: the order inside each module is kept
