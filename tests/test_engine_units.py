"""Engine pieces without models: mesh resolution, partition rules, EMA math, LR schedule,
config validation."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sdxl_jax import parallel
from sdxl_jax.config import ConfigError, validate
from sdxl_jax.train import optim

from helpers import config


def test_mesh_shape_fills_minus_one_and_names_bad_keys():
    assert parallel.mesh_shape(-1, 2, 8) == (4, 2)
    assert parallel.mesh_shape(2, -1, 8) == (2, 4)
    assert parallel.mesh_shape(-1, 1, 8) == (8, 1)
    with pytest.raises(ValueError, match="mesh.fsdp=3"):
        parallel.mesh_shape(-1, 3, 8)
    with pytest.raises(ValueError, match="≠ 8"):
        parallel.mesh_shape(2, 2, 8)
    mesh = parallel.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": -1}))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert parallel.data_parallel_size(mesh) == 8


def test_partition_rules_shard_large_kernels_only():
    spec = parallel.spec_for("unet/down_blocks_0/attn/to_q/kernel", (640, 1280), 8, 2**18)
    assert spec == P(None, "fsdp")  # largest divisible axis
    assert parallel.spec_for("unet/conv_in/kernel", (3, 3, 4, 320), 8, 2**18) == P()  # small
    assert parallel.spec_for("unet/x/norm1/scale", (2**20,), 8, 2**18) == P()  # norms replicate
    assert parallel.spec_for("unet/x/proj/bias", (2**20,), 8, 2**18) == P()
    assert parallel.spec_for("unet/x/kernel", (1001, 1003), 8, 2**18) == P()  # nothing divisible
    assert parallel.spec_for("a/kernel", (4096, 1000), 8, 2**18) == P("fsdp", None)
    assert parallel.spec_for("a/kernel", (4096, 1000), 1, 2**18) == P()


def test_ema_decay_warmup_formula():
    cfg = ml_collections.ConfigDict({"decay": 0.9999, "inv_gamma": 1.0, "power": 2 / 3, "every": 1})
    for t in [0, 1, 10, 1000, 10**7]:
        expect = min(0.9999, 1 - (1 + t) ** (-2 / 3))
        np.testing.assert_allclose(float(optim.ema_decay(t, cfg)), expect, rtol=1e-6)


@pytest.mark.parametrize("every", [1, 2])
def test_ema_update_matches_recurrence(every):
    cfg = ml_collections.ConfigDict({"decay": 0.9, "inv_gamma": 1.0, "power": 0.75, "every": every})
    rng = np.random.default_rng(0)
    thetas = rng.normal(size=(6, 3)).astype(np.float32)
    ema_ref = np.zeros(3)
    ema = {"w": jnp.zeros(3, jnp.float32)}
    n_updates = 0
    for step in range(1, 7):
        theta = thetas[step - 1]
        if step % every == 0:
            d = min(0.9, 1 - (1 + n_updates) ** -0.75)
            ema_ref = ema_ref + (1 - d) * (theta - ema_ref)
            n_updates += 1
        ema = optim.ema_update(ema, {"w": jnp.asarray(theta)}, step, cfg)
        assert ema["w"].dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(ema["w"]), ema_ref, rtol=1e-5, atol=1e-6)
    if every == 1:  # the first update copies θ (d_0 = 0)
        np.testing.assert_allclose(np.asarray(optim.ema_update({"w": jnp.zeros(3)}, {"w": jnp.ones(3)}, 1, cfg)["w"]), 1.0)


def test_ema_every_n_skips_the_whole_update_on_the_other_steps():
    cfg = ml_collections.ConfigDict({"decay": 0.9, "inv_gamma": 1.0, "power": 0.75, "every": 2})
    ema = {"w": jnp.arange(3, dtype=jnp.float32)}
    # a skipped step does not read θ: bitwise the old EMA even for θ = inf (0·inf would be NaN)
    skipped = optim.ema_update(ema, {"w": jnp.full(3, jnp.inf)}, jnp.int32(1), cfg)
    np.testing.assert_array_equal(np.asarray(skipped["w"]), [0.0, 1.0, 2.0])
    # nor compute anything: outside the cond, the traced update makes no leaf-shaped array
    jaxpr = jax.make_jaxpr(lambda e, p, s: optim.ema_update(e, p, s, cfg))(
        ema, {"w": jnp.ones(3)}, jnp.int32(1))
    leaf_ops = [e.primitive.name for e in jaxpr.eqns if any(v.aval.shape == (3,) for v in e.outvars)]
    assert leaf_ops == ["cond"]


def test_learning_rate_warmup_then_cosine_or_constant():
    tr = config("ztsnr:tiny").train
    tr.learning_rate, tr.warmup_steps, tr.steps = 1e-3, 10, 110
    tr.lr_schedule = "constant"
    s = optim.learning_rate_schedule(tr)
    np.testing.assert_allclose([float(s(0)), float(s(5)), float(s(10)), float(s(100))], [0, 5e-4, 1e-3, 1e-3], rtol=1e-6)
    tr.lr_schedule = "cosine"
    s = optim.learning_rate_schedule(tr)
    np.testing.assert_allclose(float(s(60)), 1e-3 * 0.5 * (1 + np.cos(np.pi * 0.5)), rtol=1e-5)
    np.testing.assert_allclose(float(s(110)), 0.0, atol=1e-9)


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor"])
def test_optimizers_build_and_update_once_per_call(name):
    tr = config("ztsnr:tiny").train
    tr.optimizer, tr.warmup_steps = name, 0
    tx = optim.make_optimizer(tr)
    params = {"w": jnp.ones((4, 4))}
    st = tx.init(params)
    upd, st = tx.update({"w": jnp.ones((4, 4))}, st, params)
    # the first call's update, by hand: the 16 unit gradients clipped to global norm 1 (0.25
    # each), θ = 1, no accumulation wrapper (it would return 0 until its k-th call)
    lr, wd, g = float(tr.learning_rate), float(tr.weight_decay), 1.0 / 4
    expected = {"adamw": -lr * (g / (g + float(tr.eps)) + wd),  # m̂/(√v̂+ε) + decoupled decay
                "lion": -lr * (1.0 + wd),  # sign(interpolated momentum) + decay
                # unfactored 4×4 (dims < 128): g/√(g²) = 1 times the parameter RMS 1; optax
                # adds weight_decay_rate·θ unscaled by the learning rate
                "adafactor": -(lr + wd)}[name]
    np.testing.assert_allclose(np.asarray(upd["w"]), np.full((4, 4), expected), rtol=2e-5)  # float32


@pytest.mark.parametrize("key,value,msg", [
    ("loss.snr_gamma", 0.0, "loss.snr_gamma"),
    ("loss.weighting", "minsnr", "loss.weighting"),
    ("schedule.ztsnr", "on", "schedule.ztsnr"),
    ("train.global_batch_size", 6, "train.global_batch_size"),
    ("train.per_device_batch_size", 3, "train.per_device_batch_size"),
    ("train.stages", ({"step": 3},), "train.stages"),
    ("sample.width", 200, "sample.width"),
    ("sample.steps", 0, "sample.steps"),
    ("data.cache_dir", "/nonexistent/cache", "data.cache_dir"),
    ("data.images_dir", "/nonexistent/images", "data.images_dir"),
    ("data.buckets.min_side", 4096, "data.buckets"),
    ("model.ff_chunks", 0, "model.ff_chunks"),
    ("train.compile_workers", -1, "train.compile_workers"),
])
def test_config_validation_names_the_key(key, value, msg):
    cfg = config("ztsnr:tiny")
    section, name = key.rsplit(".", 1)
    node = cfg
    for part in section.split("."):
        node = node[part]
    node[name] = value
    with pytest.raises(ConfigError, match=msg.replace(".", r"\.")):
        validate(cfg, num_devices=4)


def test_config_is_locked_against_misspelt_keys():
    from ml_collections import config_flags  # noqa: F401  (the loader locks; emulate it)
    cfg = config("ztsnr:tiny")
    cfg.lock()
    with pytest.raises(AttributeError):
        cfg.train.learnig_rate = 1.0
    validate(config("ztsnr:tiny"), num_devices=8)  # the shipped tiny preset is valid


def test_sdxl_preset_requires_pretrained_weights():
    with pytest.raises(ConfigError, match="model.pretrained"):
        validate(config("ztsnr:sdxl"), num_devices=8)


def test_a_program_is_built_once_per_fingerprint_and_plan(monkeypatch):
    """A second train() of the same run in one process reuses its program (no second trace or
    lowering); another fingerprint or another mesh builds a new one."""
    from sdxl_jax.train import program
    built = []
    monkeypatch.setattr(program, "build_program", lambda spec, plan: built.append((spec, plan)) or object())
    monkeypatch.setattr(program, "_PROGRAMS", {})
    cfg = config("ztsnr:tiny").mesh
    cfg.data, cfg.fsdp = -1, 2
    eight, four = (parallel.ShardingPlan.from_config(cfg, d) for d in (jax.devices(), jax.devices()[:4]))
    first = program.cached_program(["run A"], lambda: "spec A", eight)
    assert program.cached_program(["run A"], lambda: "spec A", eight) is first
    assert program.cached_program(["run B"], lambda: "spec B", eight) is not first
    assert program.cached_program(["run A"], lambda: "spec A", four) is not first
    assert [spec for spec, _ in built] == ["spec A", "spec B", "spec A"]


def test_mode_lists_are_the_configs():
    """The task registry and the model's remat modes are the lists config.validate checks."""
    from sdxl_jax import config as config_lib
    from sdxl_jax.models.unet import REMAT_MODES
    from sdxl_jax.train.loop import TASKS
    assert tuple(TASKS) == config_lib.TASKS == ("unet", "vae_decoder")
    assert REMAT_MODES == config_lib.REMAT_MODES == ("none", "blocks", "dots")
