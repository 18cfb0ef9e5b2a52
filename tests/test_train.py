"""End-to-end engine tests on the tiny model: sharded == single-device, resume equality,
restore onto another device count, one compile per bucket, the loss falls.

All runs share one config (tests/helpers.py) so the 8-device train step compiles once for the
whole module (and is reused from the persistent XLA cache by later runs).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from sdxl_jax import checkpoint as ckpt_lib
from sdxl_jax import models, parallel
from sdxl_jax.train import optim
from sdxl_jax.train.loop import train
from sdxl_jax.train.state import create_state, state_shardings
from sdxl_jax.train.step import CompiledStep, StepConfig, make_train_step

STEPS = 8  # conftest.REFERENCE_STEPS


@pytest.fixture(scope="module")
def straight_run(reference_run):
    return reference_run


def _params_np(state):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), state.params)


def test_train_runs_checkpoints_and_compiles_once(straight_run):
    cfg, wd, summary, log = straight_run
    assert summary["end_step"] == STEPS and summary["stopped"] == "done"
    assert summary["compiles"] == 1  # one bucket shape → exactly one compilation
    assert len(log) == STEPS and len(set(log)) == STEPS  # distinct batches
    assert all(np.isfinite(summary["losses"]))
    assert ckpt_lib.Checkpointer(f"{wd}/checkpoints").steps == [4, 6, 8]  # keep = 3


def test_training_converges_on_the_demo_data(straight_run):
    # zero-initialised conv_out: the first steps predict v̂ ≈ 0; within 8 steps the tiny UNet
    # learns the latents' scale (seeded, so this is deterministic on CPU)
    losses = straight_run[2]["losses"]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


def test_resume_gives_identical_params_and_batch_order(straight_run, tmp_path):
    cfg, _, summary, log = straight_run
    wd = str(tmp_path / "resumed")
    first_log, second_log = [], []
    first = train(cfg, wd, max_steps=STEPS // 2, batch_log=first_log)
    assert first["end_step"] == STEPS // 2
    second = train(cfg, wd, batch_log=second_log)
    assert second["start_step"] == STEPS // 2 and second["end_step"] == STEPS
    assert first_log + second_log == log
    a, b = _params_np(summary["state"]), _params_np(second["state"])
    jax.tree.map(np.testing.assert_array_equal, a, b)
    ema_a = jax.tree.map(np.asarray, summary["state"].ema_params)
    ema_b = jax.tree.map(np.asarray, second["state"].ema_params)
    jax.tree.map(np.testing.assert_array_equal, ema_a, ema_b)


def test_checkpoint_from_8_devices_restores_on_4(straight_run):
    cfg, wd, summary, _ = straight_run
    mesh4 = parallel.make_mesh(cfg.mesh, jax.devices()[:4])
    tx = optim.make_optimizer(cfg.train, STEPS)
    abstract = jax.eval_shape(lambda p: create_state(p, tx, jax.random.PRNGKey(0)),
                              models.abstract_params("unet", "tiny"))
    sh4 = state_shardings(abstract, mesh4, 1024)  # small threshold: really sharded over 4
    ck = ckpt_lib.Checkpointer(f"{wd}/checkpoints")
    restored = ck.restore(STEPS, ckpt_lib.abstract_with_shardings(abstract, sh4))
    ck.close()
    kernel = restored.state.params["down_blocks_1"]["attentions_0"]["proj_in"]["kernel"]
    assert len(kernel.sharding.device_set) == 4
    assert int(restored.state.step) == STEPS
    jax.tree.map(np.testing.assert_array_equal, _params_np(summary["state"]), _params_np(restored.state))


def test_sharded_step_equals_single_device(demo_cache):
    """Same global batch, same initial state: 8-device FSDP×data step == 1-device step."""
    from sdxl_jax.data import make_train_iterator
    cfg = tiny_config(**{"data.cache_dir": demo_cache})  # 4×2 data×FSDP mesh
    tok_l, tok_g = models.get_tokenizers("tiny")
    tokenize = lambda c: (models.tokenize(tok_l, c, 1), models.tokenize(tok_g, c, 1))  # noqa: E731
    it = make_train_iterator(cfg, demo_cache, tokenize, 0, 1, 8, 8)
    batch = next(it)
    it.close()
    unet = models.build_unet("tiny", "float32")
    text_l, text_g = models.build_text_encoders("tiny", "float32")
    tx = optim.make_optimizer(cfg.train, cfg.train.steps)
    params = models.init_params("unet", "tiny", jax.random.PRNGKey(0))
    frozen = {k: models.init_params(k, "tiny", jax.random.PRNGKey(i)) for i, k in ((2, "text_l"), (3, "text_g"))}
    results = []
    for devices in (jax.devices()[:8], jax.devices()[:1]):
        mesh = parallel.make_mesh(cfg.mesh if len(devices) == 8 else tiny_config(**{"mesh.fsdp": 1}).mesh,
                                  devices)
        abstract = jax.eval_shape(lambda p: create_state(p, tx, jax.random.PRNGKey(1)), params)
        sh = state_shardings(abstract, mesh, cfg.mesh.min_fsdp_size)
        state = jax.jit(lambda p: create_state(p, tx, jax.random.PRNGKey(1)), out_shardings=sh)(params)
        fsh = {k: parallel.param_shardings(v, mesh, cfg.mesh.min_fsdp_size) for k, v in frozen.items()}
        step_fn = make_train_step(unet, text_l, text_g, tx, StepConfig.from_config(cfg), sh.params)
        compiled = CompiledStep(step_fn, sh, fsh, mesh)
        new_state, metrics = compiled(state, jax.device_put(frozen, fsh), parallel.global_batch(batch, mesh))
        results.append((float(metrics["loss"]), _params_np(new_state)))
    (loss8, p8), (loss1, p1) = results
    assert np.isfinite(loss8)
    np.testing.assert_allclose(loss8, loss1, rtol=2e-5)
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), p8, p1))
    assert max(diffs) < 2e-6  # lr 3e-4 updates agree far below their own size
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), p1,
                                         jax.tree.map(np.asarray, params)))
    assert max(moved) > 1e-4  # …and the step really did update the params


def test_progressive_stages_switch_and_resume_inside_a_stage(straight_run, demo_cache, tmp_path):
    """Two stages (both on the demo cache, so no new compile): the run switches at the
    boundary and a stop inside stage 2 resumes exactly."""
    cfg = tiny_config(**{"data.cache_dir": demo_cache, "checkpoint.every_steps": 2,
                         "train.stages": ({"steps": 2, "cache_dir": demo_cache},
                                          {"steps": 2, "cache_dir": demo_cache})})
    straight_log, a_log, b_log = [], [], []
    straight = train(cfg, str(tmp_path / "straight"), batch_log=straight_log)
    assert straight["end_step"] == 4 and straight["compiles"] == 1
    # stage 2 starts its own iterator: its first batch is stage 1's first batch again
    assert straight_log[2][1] == straight_log[0][1] and straight_log[:2] == straight_run[3][:2]
    wd = str(tmp_path / "interrupted")
    train(cfg, wd, max_steps=3, batch_log=a_log)  # stops inside stage 2
    resumed = train(cfg, wd, batch_log=b_log)
    assert resumed["start_step"] == 3 and a_log + b_log == straight_log
    jax.tree.map(np.testing.assert_array_equal, _params_np(straight["state"]), _params_np(resumed["state"]))
