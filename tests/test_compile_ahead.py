"""Every batch shape compiled ahead in a pool of threads (train/compile_pool.py, compile_ahead.py):
the same executables and the same training as compiling one shape after another, every shape
fit-checked before the first step, compile times and the loop's stall in the summary and log."""
import logging
import os
import threading
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import optimized_hlo, tiny_config, unet_program

from sdxl_jax import parallel
from sdxl_jax.train import compile_pool, program
from sdxl_jax.train.loop import train


@pytest.fixture
def private_xla_cache(tmp_path, monkeypatch):
    """No executable from this process or the suite's persistent cache: every compile is real."""
    from jax.experimental.compilation_cache import compilation_cache as cc
    monkeypatch.setattr(program, "_EXECUTABLES", {})
    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla"))
    cc.reset_cache()
    yield str(tmp_path / "xla")
    jax.config.update("jax_compilation_cache_dir", old)
    cc.reset_cache()


def _toy_step():
    """A CompiledStep of a least-squares update on a 4-device mesh: compiles in well under a
    second, so the pool's mechanics are checked on many shapes."""
    mesh = parallel.make_mesh(SimpleNamespace(data=4, fsdp=1), jax.devices()[:4])
    rep = parallel.replicated(mesh)

    def update(w, frozen, batch):
        def loss(w):
            return jnp.mean((batch["x"] @ w * frozen - batch["y"]) ** 2)
        value, g = jax.value_and_grad(loss)(w)
        return w - 0.1 * g, {"loss": value}
    step = program.CompiledStep(update, rep, rep, mesh)
    w = jax.ShapeDtypeStruct((3, 1), jnp.float32, sharding=rep)
    frozen = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)

    def batch(rows):
        sh = parallel.batch_sharding(mesh)
        return {"x": jax.ShapeDtypeStruct((rows, 3), jnp.float32, sharding=sh),
                "y": jax.ShapeDtypeStruct((rows, 1), jnp.float32, sharding=sh)}
    return step, (w, frozen), batch


def test_pool_compiles_what_serial_compiles_each_shape_once(private_xla_cache):
    rows = [4, 8, 12, 16, 20, 24]
    serial, inputs, batch = _toy_step()
    texts = [optimized_hlo(serial.compiled_for(*inputs, batch(r))) for r in rows]
    assert len(set(texts)) == len(rows) and all("metadata" not in t and "FileNames" not in t for t in texts)
    program._EXECUTABLES.clear()  # the pool compiles anew, in 3 threads at once
    pooled, inputs, batch = _toy_step()
    pool = compile_pool.CompilePool(pooled, inputs, workers=3)
    pool.submit([compile_pool.Shape(f"rows {r}", batch(r)) for r in rows])
    pool.submit([compile_pool.Shape("again", batch(8))])  # a shape submitted twice compiles once
    done = pool.wait_all()
    assert [optimized_hlo(c) for _, c in done] == texts and [s.label for s, _ in done] == [f"rows {r}" for r in rows]
    assert pooled.compile_count == len(rows) and pool.workers_used == 3
    assert list(pool.seconds()) == [f"rows {r}" for r in rows] and all(t > 0 for t in pool.seconds().values())
    waited, compiled = pool.wait(batch(12))
    assert waited == 0.0 and optimized_hlo(compiled) == texts[2]
    pool.close()
    with pytest.raises(ValueError, match=r"train.compile_workers=-1: must be ≥ 0"):
        compile_pool.CompilePool(pooled, inputs, workers=-1)


def test_auto_workers_measure_one_compile_then_fill_the_cores(private_xla_cache, caplog):
    step, inputs, batch = _toy_step()
    pool = compile_pool.CompilePool(step, inputs)  # 0 = auto
    with caplog.at_level(logging.INFO, logger="sdxl_jax.train"):
        pool.submit([compile_pool.Shape(f"rows {r}", batch(r)) for r in (4, 8, 12)])
        pool.wait_all()
    pool.close()
    cores = compile_pool.host_cores()
    bound = compile_pool.memory_bound(pool.footprint)
    assert pool.workers_used <= min(cores, 3, bound or cores)
    assert f"compile workers: {min(cores, bound or cores)} ({cores} cores;" in caplog.text


class _PriorityProbe:
    """A step whose "compile" returns the CPU priority (nice) of the thread that compiles it."""
    compile_count = 0

    def signature(self, batch):
        return batch

    def compiled_for(self, state, frozen, batch):
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_compile_workers_run_below_the_training_threads_priority():
    """Compiles ahead fill idle cycles: a worker's nice is the caller's + compile_pool.NICE, the
    caller's own priority unchanged (measured: the demo 367 s → 315 s with its compiles beside
    the demo VAE's training, 346 s without the lower priority)."""
    me = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    pool = compile_pool.CompilePool(_PriorityProbe(), (None, None), workers=2)
    pool.submit([compile_pool.Shape(s, s) for s in ("a", "b")])
    assert [nice for _, nice in pool.wait_all()] == [min(19, me + compile_pool.NICE)] * 2
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == me
    pool.close()


# ---- the trainer: two stages of the demo cache, two batch sizes → two shapes ----------------------
def _two_shapes(cache, **overrides):
    return tiny_config(**{"data.cache_dir": cache, "checkpoint.every_steps": 100,
                          "train.stages": ({"steps": 2, "global_batch_size": 8},
                                           {"steps": 2, "global_batch_size": 16}), **overrides})


@pytest.fixture(scope="module")
def serial_run(demo_cache, tmp_path_factory):
    """One compile worker: the shapes compile one after another (the reference)."""
    cfg = _two_shapes(demo_cache, **{"train.compile_workers": 1})
    batches = []
    summary = train(cfg, str(tmp_path_factory.mktemp("serial")), batch_log=batches)
    return summary, batches


def test_pooled_compiles_train_bitwise_like_serial_ones(serial_run, demo_cache, tmp_path, monkeypatch, caplog):
    """Two workers, this process's executables forgotten: each shape's executable is loaded from
    the persistent cache (what a restarted run does) by a worker thread, both at once."""
    serial, serial_batches = serial_run
    monkeypatch.setattr(program, "_EXECUTABLES", {})
    batches = []
    with caplog.at_level(logging.INFO, logger="sdxl_jax.train"):
        pooled = train(_two_shapes(demo_cache, **{"train.compile_workers": 2}), str(tmp_path / "pooled"),
                       batch_log=batches)
    assert len(program._EXECUTABLES) == 2
    assert batches == serial_batches and pooled["losses"] == serial["losses"]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(serial["state"].params),
                 jax.device_get(pooled["state"].params))
    shapes = ["bucket 128x128 (global batch 8, stage 0)", "bucket 128x128 (global batch 16, stage 1)"]
    for s in (serial, pooled):
        assert list(s["compile_s"]) == shapes and s["compiles"] == 2
        assert s["compile_total_s"] == pytest.approx(sum(s["compile_s"].values()))
    assert serial["compile_workers"] == 1 and pooled["compile_workers"] == 2
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("compiles: "))
    assert f"total {pooled['compile_total_s']:.1f} s" in line
    assert f"loop stall waiting for programs after it {pooled['stall_s']:.1f} s" in line


def test_a_run_whose_shapes_are_ready_never_stalls(serial_run, demo_cache, tmp_path, caplog):
    """A restarted run (every executable already compiled): the loop waits 0 s for any program."""
    with caplog.at_level(logging.INFO, logger="sdxl_jax.train"):
        again = train(_two_shapes(demo_cache, **{"train.compile_workers": 1}), str(tmp_path / "again"))
    assert again["first_wait_s"] == 0.0 and again["stall_s"] == 0.0
    assert "loop stall waiting for programs after it 0.0 s" in caplog.text
    assert "waited" not in caplog.text.replace("waited 0.0 s for the first program", "")


def test_a_bucket_that_cannot_fit_stops_the_run_before_its_first_step(serial_run, demo_cache, tmp_path):
    """The second stage's batch needs more than the limit, the first's less: the run stops before
    step 1 naming that bucket, the bytes and the settings that would fit."""
    from sdxl_jax.fit import FitError, compiled_memory, needed_bytes
    prog = unet_program(_two_shapes(demo_cache), total_steps=4)  # the run's program (its executables)
    need = {rows: needed_bytes(compiled_memory(prog.compile(rows, 128, 128))) for rows in (8, 16)}
    assert need[8] < need[16]
    limit = (need[8] + need[16]) // 2
    batches = []
    with pytest.raises(FitError) as e:
        train(_two_shapes(demo_cache, **{"train.compile_workers": 1, "train.fit_check": str(limit)}),
              str(tmp_path / "nofit"), batch_log=batches)
    msg = str(e.value)
    assert msg.startswith("the train step of bucket 128x128 (global batch 16, stage 1) needs ")
    assert f"({need[16]} bytes) per device" in msg and "allows" in msg and f"({limit} bytes); to fit, try:" in msg
    assert batches == [] and not os.path.exists(tmp_path / "nofit" / "checkpoints" / "1")
