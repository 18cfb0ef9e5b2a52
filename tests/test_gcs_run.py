"""A training run whose run directory is on gs:// (a real GCS server on loopback,
conftest.gcs_server) behaves as on local disk: preempted, killed with SIGKILL and resumed, it
feeds the uninterrupted local reference run's batches and ends with its params bitwise; the
checkpoints, the TensorBoard events and the lock are objects in the bucket."""
import os
import signal
import subprocess
import sys

from conftest import GCS_BUCKET
from helpers import tiny_config
from test_reliability import STEPS, _read_log, _TermAt, _wait_for_step
from sdxl_jax import checkpoint as ckpt_lib
from sdxl_jax import paths
from sdxl_jax.train.loop import train

HERE = os.path.dirname(__file__)


def _objects(server, url):
    prefix = url.split(f"gs://{GCS_BUCKET}/", 1)[1] + "/"
    return [n[len(prefix):] for n in server.objects(GCS_BUCKET, prefix)]


def _committed(server, url):
    return sorted(int(n.split("/")[1]) for n in _objects(server, url)
                  if n.startswith("checkpoints/") and n.count("/") == 2 and n.endswith("/commit_success.txt"))


def _driver(workdir, log, cache, env=None):
    args = [sys.executable, os.path.join(HERE, "train_driver.py"), workdir, log,
            f'data.cache_dir="{cache}"', f"train.steps={STEPS}", "checkpoint.every_steps=2",
            "checkpoint.async_save=true"]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, **(env or {})))


def test_gs_workdir_preempt_kill_resume_bitwise(demo_cache, reference_run, gcs_server, gcs_dir, tmp_path):
    from train_driver import FileLog, params_digest
    _, _, ref, ref_log = reference_run
    wd, log = gcs_dir + "/run", str(tmp_path / "gs.log")
    cfg = tiny_config(**{"data.cache_dir": demo_cache, "train.steps": STEPS, "checkpoint.every_steps": 2,
                         "checkpoint.async_save": True})
    # 1. SIGTERM when step 4 is fetched: the step finishes, step 4 is checkpointed to gs://
    out = train(cfg, wd, batch_log=_TermAt(FileLog(log), 4))
    assert out["stopped"] == "preempted" and out["end_step"] == 4
    assert _committed(gcs_server, wd) == [2, 4]
    assert not [n for n in _objects(gcs_server, wd) if n.startswith("train.")]  # lock released
    assert [n for n in _objects(gcs_server, wd) if n.startswith("tb/events.out.tfevents.")]
    # 2. a fresh process resumes from gs:// and is SIGKILLed once step 6 has been dispatched
    proc = _driver(wd, log, demo_cache)
    start_lines = sum(1 for _ in open(log))
    _wait_for_step(proc, log, start_lines + 1)
    steps_seen, _ = _read_log(log)
    if max(steps_seen) < 7:
        _wait_for_step(proc, log, start_lines + (7 - max(steps_seen)) + 1)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=600) == -signal.SIGKILL, proc.stderr.read()[-2000:]
    # the killed run's lock object is still there; its process is gone, so this leg takes it over
    assert "train.0.lock" in _objects(gcs_server, wd)
    out = train(cfg, wd, batch_log=FileLog(log))
    steps, _ = _read_log(log)
    assert steps == dict(ref_log)  # every step fed exactly the uninterrupted local run's batch
    assert out["stopped"] == "done" and out["end_step"] == STEPS and out["start_step"] in (4, 6)
    assert params_digest(out["state"].params) == params_digest(ref["state"].params)  # bitwise
    # keep-3 on gs://, and every step directory left is a committed one
    assert _committed(gcs_server, wd) == [4, 6, 8]
    assert sorted({n.split("/")[1] for n in _objects(gcs_server, wd) if n.startswith("checkpoints/")}) \
        == ["4", "6", "8"]
    ck = ckpt_lib.Checkpointer(wd + "/checkpoints", read_only=True)
    assert ck.steps == [4, 6, 8]
    ck.close()


def test_gs_run_inputs_in_the_bucket_and_the_demo_kept_on_this_host(demo_cache, gcs_server, gcs_dir,
                                                                     tmp_path, monkeypatch):
    """A gs:// workdir with no data configured: its latent cache is <workdir>/cache in the bucket
    (found there once uploaded), while the generated demo dataset and the demo VAE, which are
    written as local files, are kept in this host's stand-in <user cache>/runs/gs/<bucket>/<key>.
    Resolving writes nothing to the bucket."""
    from sdxl_jax.data.cache import load_manifest
    from sdxl_jax.run_inputs import resolve_run
    monkeypatch.setenv("SDXL_JAX_CACHE_DIR", str(tmp_path / "user_cache"))
    wd = gcs_dir + "/run"
    host = str(tmp_path / "user_cache" / "runs" / "gs" / wd[len("gs://"):])
    cfg = tiny_config(**{"data.demo_vae_steps": 50})
    inputs = resolve_run(cfg, wd)
    assert inputs.vae.kind == "demo" and os.path.dirname(inputs.vae.path) == host + "/demo_vae"
    assert inputs.missing == (f"the demo dataset {host}/demo_data", f"the demo VAE {inputs.vae.path}",
                              f"the latent cache {wd}/cache")
    assert _objects(gcs_server, wd) == []
    paths.upload_tree(demo_cache, wd + "/cache")
    cache = resolve_run(cfg, wd).stages[0].caches[0]
    assert cache.cache_dir == wd + "/cache" and cache.exists
    assert cache.vae_fingerprint == load_manifest(demo_cache)["vae_fingerprint"]
    assert resolve_run(cfg, wd).missing == inputs.missing[:2]


def test_prepare_run_builds_a_missing_cache_into_the_gs_workdir(demo_images, demo_cache, gcs_server,
                                                                gcs_dir, tmp_path, monkeypatch):
    """train.py's prepare phase with a gs:// workdir and data.images_dir: the missing cache is
    built into <workdir>/cache in the bucket, holding the same shards as the local build, and the
    prepare lock object is gone afterwards."""
    from sdxl_jax.data.cache import load_manifest
    from sdxl_jax.train.prepare import prepare_run
    monkeypatch.setenv("SDXL_JAX_CACHE_DIR", str(tmp_path / "user_cache"))  # the local stand-in
    wd = gcs_dir + "/run"
    inputs = prepare_run(tiny_config(**{"data.images_dir": demo_images}), wd)
    cache = inputs.stages[0].caches[0]
    assert cache.cache_dir == wd + "/cache" and cache.exists and not inputs.missing
    assert cache.inputs == f"images:{demo_images}"
    for shard in load_manifest(demo_cache)["shards"]:
        name = shard["name"] + ".array_record"
        with open(os.path.join(demo_cache, name), "rb") as f:
            assert paths.read_bytes(f"{wd}/cache/{name}") == f.read()
    assert not [n for n in _objects(gcs_server, wd) if n.startswith("train.")]
