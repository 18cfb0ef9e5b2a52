"""The train step's XLA:CPU compile options (train/program.py: compiler_options): the step the
loop compiles on CPU devices takes them, an accelerator's does not, an XLA_FLAGS setting of the
same option wins, and the step computes what it computes under XLA's defaults."""
import os
from types import SimpleNamespace

import jax
import numpy as np
from helpers import ENGINE_PRESET, optimized_hlo, tiny_config, unet_program

from sdxl_jax import models, parallel
from sdxl_jax.train import program

OPTION = "xla_cpu_experimental_ynn_fusion_type"


def test_cpu_devices_take_the_options_accelerators_none_and_xla_flags_win(monkeypatch):
    assert program.compiler_options(jax.devices()) == {OPTION: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
    assert program.compiler_options(jax.devices()[:1] + [SimpleNamespace(platform="tpu")]) == {}
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + f" --{OPTION}=reduce")
    assert program.compiler_options(jax.devices()) == {}


def test_the_loops_step_takes_them_and_matches_xla_defaults(demo_cache, monkeypatch):
    from sdxl_jax.data import make_train_iterator
    monkeypatch.setattr(program, "_EXECUTABLES", {})
    cfg = tiny_config(**{"data.cache_dir": demo_cache, "mesh.fsdp": 1, "train.global_batch_size": 2})
    tok_l, tok_g = models.get_tokenizers("tiny")
    it = make_train_iterator(cfg, demo_cache, lambda c: (models.tokenize(tok_l, c, 1),
                                                         models.tokenize(tok_g, c, 1)), 0, 1, 2, 1)
    host_batch = next(it)
    it.close()
    prog = unet_program(cfg, jax.devices()[:1])
    params = jax.device_get(models.init_params("unet", ENGINE_PRESET, jax.random.PRNGKey(0)))
    frozen = jax.device_put({k: models.init_params(k, ENGINE_PRESET, jax.random.PRNGKey(i))
                             for i, k in ((2, "text_l"), (3, "text_g"))}, prog.frozen_shardings)
    batch = parallel.global_batch(host_batch, prog.plan.mesh)
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
