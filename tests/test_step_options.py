"""The train step's XLA:CPU compile options (train/program.py: compiler_options): the step the
loop compiles on CPU devices takes them, an accelerator's does not, an XLA_FLAGS setting of the
same option wins, and the step computes what it computes under XLA's defaults."""
import os
from types import SimpleNamespace

import jax
import numpy as np
from helpers import engine_weights, first_train_batch, optimized_hlo, tiny_config, unet_program

from sdxl_jax import parallel
from sdxl_jax.train import program

OPTION = "xla_cpu_experimental_ynn_fusion_type"


def test_cpu_devices_take_the_options_accelerators_none_and_xla_flags_win(monkeypatch):
    assert program.compiler_options(jax.devices()) == {OPTION: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
    assert program.compiler_options(jax.devices()[:1] + [SimpleNamespace(platform="tpu")]) == {}
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + f" --{OPTION}=reduce")
    assert program.compiler_options(jax.devices()) == {}


def test_the_loops_step_takes_them_and_matches_xla_defaults(demo_cache, monkeypatch):
    monkeypatch.setattr(program, "_EXECUTABLES", {})
    cfg = tiny_config(**{"data.cache_dir": demo_cache, "mesh.fsdp": 1, "train.global_batch_size": 2})
    prog = unet_program(cfg, jax.devices()[:1])
    params, frozen = engine_weights()
    frozen = jax.device_put(frozen, prog.frozen_shardings)
    batch = parallel.global_batch(first_train_batch(cfg, 2), prog.plan.mesh)
    state = prog.init_state(params, jax.random.PRNGKey(1))
    lowered = prog.step.lower(state, frozen, batch)
    plain = lowered.compile()
    ours = prog.step.compiled_for(state, frozen, batch)
    with_options = lowered.compile(compiler_options=program.CPU_COMPILER_OPTIONS)
    assert optimized_hlo(ours) == optimized_hlo(with_options) != optimized_hlo(plain)

    new_plain, m_plain = plain(prog.init_state(params, jax.random.PRNGKey(1)), frozen, batch)
    new, m = prog.step(state, frozen, batch)
    np.testing.assert_allclose(m["loss"], m_plain["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(new_plain.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-6)
