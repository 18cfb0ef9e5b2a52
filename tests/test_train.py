"""End-to-end engine tests on the tiny model: sharded == single-device, resume equality,
restore onto another device count, one compile per bucket, the loss falls.

All runs share one config (tests/helpers.py) so the 8-device train step compiles once for the
whole module (and is reused from the persistent XLA cache by later runs).
"""
import os

import jax
import numpy as np
import pytest

from helpers import ENGINE_PRESET, held_out_loss, override, tiny_config, unet_program
from sdxl_jax import checkpoint as ckpt_lib
from sdxl_jax import models, parallel
from sdxl_jax.train.loop import train

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
    """The held-out loss at fixed timesteps and noise (the evaluator's validation loss) falls
    from the seeded initial UNet to the trained one: zero-initialised conv_out predicts v̂ = 0
    at first, and within 8 steps the tiny UNet learns the latents' scale."""
    from sdxl_jax.models.weights import frozen_params
    cfg, _, summary, _ = straight_run
    text = frozen_params(cfg, components=("text_l", "text_g"))
    initial = models.init_params("unet", ENGINE_PRESET, jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed), 0))
    before = held_out_loss(cfg, initial, text)
    after = held_out_loss(cfg, jax.device_get(summary["state"].params), text)
    assert after < 0.95 * before, (before, after)  # measured here: 0.2456 → 0.2253


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
    prog4 = unet_program(tiny_config(**{"mesh.fsdp": 4}), jax.devices()[:4], STEPS)  # really sharded
    ck = ckpt_lib.Checkpointer(f"{wd}/checkpoints")
    restored = ck.restore(STEPS, ckpt_lib.abstract_with_shardings(prog4.abstract_state, prog4.shardings))
    ck.close()
    kernel = restored.state.params["mid_block"]["attentions_0"]["proj_in"]["kernel"]
    assert len(kernel.sharding.device_set) == 4
    assert int(restored.state.step) == STEPS
    jax.tree.map(np.testing.assert_array_equal, _params_np(summary["state"]), _params_np(restored.state))


def test_sharded_step_equals_single_device(straight_run, demo_cache):
    """Same global batch, same initial state: 8-device FSDP×data step == 1-device step (the
    8-device program is the reference run's: same config and schedule length)."""
    from sdxl_jax.data import make_train_iterator
    cfg = straight_run[0]  # 4×2 data×FSDP mesh
    tok_l, tok_g = models.get_tokenizers("tiny")
    tokenize = lambda c: (models.tokenize(tok_l, c, 1), models.tokenize(tok_g, c, 1))  # noqa: E731
    it = make_train_iterator(cfg, demo_cache, tokenize, 0, 1, 8, 8)
    batch = next(it)
    it.close()
    params = jax.device_get(models.init_params("unet", ENGINE_PRESET, jax.random.PRNGKey(0)))  # host: init_state donates
    frozen = {k: models.init_params(k, ENGINE_PRESET, jax.random.PRNGKey(i)) for i, k in ((2, "text_l"), (3, "text_g"))}
    results = []
    for devices, fsdp in ((jax.devices()[:8], 2), (jax.devices()[:1], 1)):
        prog = unet_program(override(cfg.copy_and_resolve_references(), {"mesh.fsdp": fsdp}), devices, STEPS)
        state = prog.init_state(params, jax.random.PRNGKey(1))
        new_state, metrics = prog.step(state, jax.device_put(frozen, prog.frozen_shardings),
                                       parallel.global_batch(batch, prog.plan.mesh))
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


def test_resuming_in_stage_2_after_stage_1_changed_length_is_refused(demo_cache, tmp_path):
    """Stopped inside stage 2 (step 3 of 2 + 2), then stage 1 lengthened to 4: step 3 falls in
    stage 1 now and the saved stage-2 data position used to be dropped silently; shortened to
    1, stage 2 would start at step 1 and its saved position would be 1 step off. Both are
    refused naming the stages, nothing is changed, and the original stages resume."""
    stages = lambda first, second: tiny_config(**{  # noqa: E731
        "data.cache_dir": demo_cache, "checkpoint.every_steps": 2,
        "train.stages": ({"steps": first, "cache_dir": demo_cache},
                         {"steps": second, "cache_dir": demo_cache})})
    wd = str(tmp_path / "staged")
    assert train(stages(2, 2), wd, max_steps=3)["end_step"] == 3
    with pytest.raises(ValueError, match=r"the checkpoint of step 3 holds the data position of "
                                         r"train\.stages\[1\], which began at step 2, but with this "
                                         r"config step 3 falls in train\.stages\[0\] \(steps 0–4\): a "
                                         r"stage's steps changed since the checkpoint"):
        train(stages(4, 2), wd)
    with pytest.raises(ValueError, match=r"holds the data position of train\.stages\[1\], which "
                                         r"began at step 2, .* falls in train\.stages\[1\] \(steps 1–5\)"):
        train(stages(1, 4), wd)
    assert ckpt_lib.Checkpointer(f"{wd}/checkpoints").steps == [2, 3]
    assert train(stages(2, 2), wd)["end_step"] == 4


def test_a_step_that_cannot_fit_stops_before_training(straight_run, tmp_path):
    from sdxl_jax.fit import FitError
    cfg = tiny_config(**{"data.cache_dir": straight_run[0].data.cache_dir, "train.fit_check": "1MiB"})
    with pytest.raises(FitError, match=r"per device .* allows 1\.00 MiB \(1048576 bytes\); to fit, try:"):
        train(cfg, str(tmp_path / "nofit"))
    assert not os.path.exists(tmp_path / "nofit" / "checkpoints" / "1")  # no step ran
