"""The storage service stops answering in the middle of a gs:// run (the GCS server on loopback
is killed): the trainer stops with one line naming the run directory; once the server is back
(same port, same objects), the rerun resumes from the last committed step and ends bitwise
equal to the uninterrupted local reference run."""
import os
import time

from helpers import tiny_config
from test_gcs_run import _committed, _driver
from test_reliability import STEPS, _read_log
from sdxl_jax.train.loop import train


def test_server_stopped_mid_run_one_error_then_resume(demo_cache, reference_run, gcs_server, gcs_dir,
                                                      tmp_path):
    from train_driver import FileLog, params_digest
    _, _, ref, ref_log = reference_run
    wd, log = gcs_dir + "/run", str(tmp_path / "outage.log")
    pause = str(tmp_path / "pause")
    # the driver waits when step 5's batch is fetched (step 4's checkpoint started); the storage
    # then stops while no save is in flight, and the save of step 6 meets the outage
    proc = _driver(wd, log, demo_cache, env={"SDXL_JAX_STORAGE_TIMEOUT_S": "5",  # not minutes
                                             "SDXL_JAX_TEST_PAUSE_AT": "5", "SDXL_JAX_TEST_PAUSE_FILE": pause})
    try:
        deadline = time.time() + 600
        while not (os.path.exists(pause + ".paused") and 4 in _committed(gcs_server, wd)):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.1)
        gcs_server.stop()
        t0 = time.time()
        open(pause + ".go", "w").close()
        rc = proc.wait(timeout=600)
        t_error = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        gcs_server.start()  # back on the same port with the same objects
    err = proc.stderr.read()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 1 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert f"{wd}/" in errors[0] and "did not answer" in errors[0], errors[0]
    print(f"outage reported after {t_error:.0f} s: {errors[0]}")
    last = max(_committed(gcs_server, wd))
    assert last == 4
    cfg = tiny_config(**{"data.cache_dir": demo_cache, "train.steps": STEPS, "checkpoint.every_steps": 2,
                         "checkpoint.async_save": True})
    out = train(cfg, wd, batch_log=FileLog(log))
    assert out["start_step"] == last and out["end_step"] == STEPS
    steps, _ = _read_log(log)
    assert steps == dict(ref_log)
    assert params_digest(out["state"].params) == params_digest(ref["state"].params)
