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


def _built_once(tmp_path_factory, name: str, build):
    """`build(dir)` run once for the whole suite: the first xdist worker to ask builds under a
    file lock in the directory the workers share; the others wait and reuse it (each worker
    building its own copy of the reference run cost two minutes of both cores)."""
    from filelock import FileLock
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # gwN's basetemp is <this run's>/popen-gwN
        root = root.parent  # shared by all workers of this run (and by this run only)
    out, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            if out.exists():  # a worker died half-way: start that build again
                import shutil
                shutil.rmtree(out)
            out.mkdir()
            build(str(out))
            done.touch()
    return str(out)


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory):
    """A small generated demo dataset (images + .txt captions), shared by the whole session."""
    from sdxl_jax.data.demo import make_demo_dataset
    return _built_once(tmp_path_factory, "demo_images", lambda out: make_demo_dataset(out, n=48, seed=0))


@pytest.fixture(scope="session")
def demo_cache(demo_images, tmp_path_factory):
    """The latent cache of `demo_images`, encoded by the tiny VAE the trainer itself uses."""
    from helpers import tiny_config
    from sdxl_jax.data import build_cache
    from sdxl_jax.run_inputs import resolve_weights
    cfg = tiny_config()
    return _built_once(tmp_path_factory, "demo_cache", lambda out: build_cache(
        cfg, images_dir=demo_images, out=out, progress=False,
        vae_params=resolve_weights(cfg).load(("vae",))["vae"]))


GCS_BUCKET = "sdxl-jax-test"


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """A GCS server on loopback (tests/gcs_server.py), one per test process (xdist worker); its
    endpoint settings stay in os.environ for the session, so subprocesses reach it too."""
    from gcs_server import GcsServer
    server = GcsServer(str(tmp_path_factory.mktemp("gcs_server"))).start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        server.create_bucket(GCS_BUCKET)
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def gcs_dir(gcs_server, request):
    """This test's own prefix in the test bucket: gs://<bucket>/<test name>-<random>."""
    import uuid
    return f"gs://{GCS_BUCKET}/{request.node.name.replace('[', '-').rstrip(']')}-{uuid.uuid4().hex[:8]}"


REFERENCE_STEPS = 8


class _Finished:
    """The final state of a run as host arrays (what the tests compare against)."""

    def __init__(self, params, ema_params):
        self.params, self.ema_params = params, ema_params


@pytest.fixture(scope="session")
def reference_run(demo_cache, tmp_path_factory):
    """The uninterrupted reference training run (tests/helpers.py config, 8 steps, checkpoint
    every 2): resume, fault-injection and multi-host tests all compare against it. Built once per
    suite; a worker that did not run it reads its summary (JSON) and final state (the step-8
    checkpoint), so everything it returns is the same on every worker."""
    import json
    from helpers import tiny_config
    cfg = tiny_config(**{"data.cache_dir": demo_cache, "train.steps": REFERENCE_STEPS,
                         "checkpoint.every_steps": 2})
    ran = {}

    def run(wd):
        from sdxl_jax.train.loop import train
        log = []
        summary = train(cfg, wd, batch_log=log)
        ran.update(summary=summary, log=log)
        keep = {k: summary[k] for k in ("start_step", "end_step", "stopped", "compiles", "losses")}
        with open(f"{wd}.json", "w") as f:
            json.dump({"summary": keep, "log": log}, f)

    wd = _built_once(tmp_path_factory, "reference_run", run)
    if ran:
        return cfg, wd, ran["summary"], ran["log"]
    import jax
    from sdxl_jax import checkpoint as ckpt_lib
    with open(f"{wd}.json") as f:
        saved = json.load(f)
    ck = ckpt_lib.Checkpointer(f"{wd}/checkpoints", read_only=True)
    host = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def read(which):
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=host),
                                ck.saved_tree(REFERENCE_STEPS, which))
        return ck.restore_params(REFERENCE_STEPS, abstract, which, on_host=True)[0]
    try:
        trees = [read(which) for which in ("params", "ema_params")]
    finally:
        ck.close()
    summary = dict(saved["summary"], state=_Finished(*trees))
    return cfg, wd, summary, [tuple(x) for x in saved["log"]]


# The suite runs on 2 xdist workers, one test module per worker at a time (pytest.ini). The
# modules that compile train steps and run training subprocesses go first, longest first, so
# the quick modules fill in behind them instead of leaving one worker alone at the end.
_LONGEST_FIRST = ("test_reliability", "test_run_inputs", "test_gcs_run", "test_gcs_outage", "test_scale", "test_train", "test_attention", "test_multihost",
                  "test_trainable", "test_accumulation", "test_sources", "test_adapters",
                  "test_vae_decoder", "test_demo_vae", "test_step_sweep", "test_sample", "test_lora_interop",
                  "test_cli_errors", "test_gcs_cache", "test_gcs_readers", "test_lora_runs", "test_interop", "test_sharding_golden",
                  "test_models", "test_tfds", "test_export_safety", "test_checkpoints", "test_runs",
                  "test_workdir_lock", "test_gcs_lock", "test_gcs_paths")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.module.__name__.rsplit(".", 1)[-1]
        return _LONGEST_FIRST.index(name) if name in _LONGEST_FIRST else len(_LONGEST_FIRST)
    items.sort(key=rank)  # stable: the order inside each module is kept
