"""Failure and recovery: SIGTERM and SIGKILL at several points give the uninterrupted run's
params and batches bitwise; non-finite steps change nothing and K in a row stop the run; a
corrupted latest checkpoint falls back to the previous one; config mistakes fail early."""
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import tiny_config
from sdxl_jax import checkpoint as ckpt_lib
from sdxl_jax.train.common import NonFiniteError
from sdxl_jax.train.loop import train
from sdxl_jax.train.state import TrainState

HERE = os.path.dirname(__file__)
STEPS = 8  # conftest.REFERENCE_STEPS


def _read_log(path):
    steps, final = {}, None
    for line in open(path):
        parts = line.split()
        if parts[0] == "final":
            final = parts[1:]
        elif parts[0] in ("loss", "run"):
            continue
        else:
            step, digest = int(parts[0]), parts[1]
            assert steps.setdefault(step, digest) == digest, f"step {step} re-ran on another batch"
            steps[step] = digest
    return steps, final


def _start(workdir, log, cache):
    args = [sys.executable, os.path.join(HERE, "train_driver.py"), workdir, log,
            f'data.cache_dir="{cache}"', f"train.steps={STEPS}", "checkpoint.every_steps=2",
            "checkpoint.async_save=true"]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc, log, step, timeout=600):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if os.path.exists(log) and sum(1 for _ in open(log)) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"driver exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached")


class _TermAt:
    """A batch log that sends this process SIGTERM when step `at` is fetched: the loop's
    preemption handler (installed by train()) then finishes the step in flight, checkpoints and
    returns "preempted", as a run on a preempted VM does."""

    def __init__(self, log, at):
        self._log, self._at = log, at

    def append(self, item):
        self._log.append(item)
        if item[0] == self._at:
            os.kill(os.getpid(), signal.SIGTERM)


def test_kill_and_preempt_resume_bitwise(demo_cache, reference_run, tmp_path):
    from train_driver import FileLog, params_digest
    _, _, ref, ref_log = reference_run
    wd, log = str(tmp_path / "faulty"), str(tmp_path / "faulty.log")
    # every leg has the config of the driver's subprocess; the in-process legs run the reference
    # run's step program (already compiled), the subprocess loads it from the persistent cache
    cfg = tiny_config(**{"data.cache_dir": demo_cache, "train.steps": STEPS, "checkpoint.every_steps": 2,
                         "checkpoint.async_save": True})
    # 1. SIGTERM when step 4 is fetched (clean preemption: finish the step, checkpoint, stop)
    out = train(cfg, wd, batch_log=_TermAt(FileLog(log), 4))
    ck = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), read_only=True)
    saved = ck.steps
    ck.close()
    assert out["stopped"] == "preempted" and out["end_step"] == 4 and saved == [2, 4]
    # 2. a fresh process resumes and is SIGKILLed after step 6 (lines are logged before a step
    # runs, so "step 7 fetched" means step 6 has been dispatched; the kill lands while step 6's
    # async checkpoint may be in flight, which must not matter: an unfinished save never counts)
    proc = _start(wd, log, demo_cache)
    start_lines = sum(1 for _ in open(log))
    _wait_for_step(proc, log, start_lines + 1)  # this run has started stepping
    steps_seen, _ = _read_log(log)
    if max(steps_seen) < 7:
        _wait_for_step(proc, log, start_lines + (7 - max(steps_seen)) + 1)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=600) == -signal.SIGKILL, proc.stderr.read()[-2000:]
    # 3. the last leg, here again (the killed run's stale workdir lock is taken over), from the
    # newest committed checkpoint: 6 if the killed run's async save of step 6 finished, else 4
    ck = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), read_only=True)
    committed = ck.steps[-1]
    ck.close()
    out = train(cfg, wd, batch_log=FileLog(log))
    steps, _ = _read_log(log)
    assert steps == dict(ref_log)  # every step fed exactly the uninterrupted run's batch
    assert out["stopped"] == "done" and out["end_step"] == STEPS and out["start_step"] == committed
    assert params_digest(out["state"].params) == params_digest(ref["state"].params)  # bitwise


class _PoisonedIterator:
    """Wraps the train iterator and turns the latents of chosen steps into NaN."""

    def __init__(self, it, nan_steps):
        self._it, self._nan, self._n = it, set(nan_steps), 0

    def __next__(self):
        batch = next(self._it)
        self._n += 1
        if self._n in self._nan:
            batch = dict(batch, latents=np.full_like(batch["latents"], np.nan))
        return batch

    def __getattr__(self, name):
        return getattr(self._it, name)


def _poison(monkeypatch, nan_steps):
    import sdxl_jax.data as data
    real = data.make_train_iterator
    monkeypatch.setattr(data, "make_train_iterator",
                        lambda *a, **k: _PoisonedIterator(real(*a, **k), nan_steps))


def test_nonfinite_steps_change_nothing_and_k_in_a_row_stop(demo_cache, tmp_path, monkeypatch):
    # every run has the reference run's config (train.steps included: it shapes the LR schedule)
    # and stops early with max_steps, so all of them run the one step program already compiled
    cfg = tiny_config(**{"data.cache_dir": demo_cache, "train.steps": STEPS, "checkpoint.every_steps": 100})
    one = train(cfg, str(tmp_path / "one"), max_steps=1)["state"]
    _poison(monkeypatch, nan_steps={2, 3})
    cfg = tiny_config(**{"data.cache_dir": demo_cache, "train.steps": STEPS, "train.max_nonfinite": 3,
                         "checkpoint.every_steps": 100})
    out = train(cfg, str(tmp_path / "poisoned"), max_steps=3)
    assert np.isnan(out["losses"][1]) and np.isnan(out["losses"][2])
    state = out["state"]
    assert int(state.step) == 1 and int(state.nonfinite) == 2
    for a, b in ((one.params, state.params), (one.ema_params, state.ema_params),
                 (one.opt_state, state.opt_state)):
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)

    monkeypatch.undo()
    _poison(monkeypatch, nan_steps={3})
    cfg = tiny_config(**{"data.cache_dir": demo_cache, "train.steps": STEPS, "train.max_nonfinite": 2,
                         "checkpoint.every_steps": 2})
    wd = str(tmp_path / "stops")
    assert train(cfg, wd, max_steps=3)["end_step"] == 3  # step 3 skipped, and saved at the stop
    # the count of skipped steps is the state's: the resumed run's first step is the second
    monkeypatch.undo()
    _poison(monkeypatch, nan_steps={1})  # the resumed process's first batch
    # steps are numbered by checkpoint (the resumed run's first step is 4, not the state's count
    # of applied updates), and step 4's scheduled checkpoint holds the unchanged state
    with pytest.raises(NonFiniteError, match=r"^2 consecutive non-finite steps up to step 4: stopping. The last good checkpoint \(4\)"):
        train(cfg, wd)
    ck = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"))
    assert ck.steps == [2, 3, 4]  # intact and restorable
    assert ck.read_json(2, "meta")["prediction_type"] == "v_prediction"
    ck.close()


def _tiny_state(value):
    params = {"w": jnp.full((4, 3), value, jnp.float32)}
    tx = optax.adam(1e-3)
    return TrainState(step=jnp.array(int(value), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=params, rng=jax.random.PRNGKey(0), nonfinite=jnp.array(0, jnp.int32))


def test_corrupted_latest_checkpoint_falls_back(tmp_path, caplog):
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=5, async_save=False)
    for step in (1, 2):
        ck.save(step, _tiny_state(step), {"stage": 0, "iterator": {"step": step}}, {}, {})
    ck.close()
    # corrupt every array file of step 2 (truncate to half)
    for root, _, files in os.walk(tmp_path / "2" / "state"):
        for name in files:
            path = os.path.join(root, name)
            if os.path.getsize(path) > 64 and not name.endswith(".json"):
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
    abstract = jax.eval_shape(lambda: _tiny_state(0))
    sh = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=5, async_save=False)
    with caplog.at_level("WARNING"):
        restored = ck.restore_latest_good(ckpt_lib.abstract_with_shardings(abstract, sh))
    ck.close()
    assert restored.step == 1 and restored.data_state == {"stage": 0, "iterator": {"step": 1}}
    np.testing.assert_array_equal(np.asarray(restored.state.params["w"]), 1.0)
    assert "step 2" in caplog.text and "falling back" in caplog.text


@pytest.mark.parametrize("flag,message", [
    ("--config.train.learnig_rate=1e-4", "learnig_rate"),
    ("--config.loss.snr_gamma=-1", "loss.snr_gamma"),
    ("--config.train.global_batch_size=3", "train.global_batch_size"),
    ("--config.data.images_dir=/no/such/dir", "data.images_dir"),
])
def test_config_mistakes_fail_before_compiling(tmp_path, flag, message):
    root = os.path.dirname(HERE)
    # JAX_LOG_COMPILES: JAX logs "Compiling jit(train_step) …" if the step gets that far
    proc = subprocess.run([sys.executable, os.path.join(root, "train.py"), "--config",
                           os.path.join(root, "configs/ztsnr.py:tiny"), "--workdir", str(tmp_path), flag],
                          capture_output=True, text=True, timeout=300, cwd=root,
                          env=dict(os.environ, JAX_LOG_COMPILES="1"))
    out = proc.stderr + proc.stdout
    assert proc.returncode != 0
    assert message in out
    assert "train_step" not in out  # the step was never traced nor compiled
    assert not os.path.exists(tmp_path / "checkpoints")
