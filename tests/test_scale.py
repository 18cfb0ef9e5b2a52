"""Scale features: UNet remat / attention variants (same parameters, same loss and gradients) and
the memory-report helpers. Tiny UNet in float32, batch 2 of 32×32 latents; three compiles."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdxl_jax import models
from sdxl_jax.models import presets
from sdxl_jax.models.remat import (ATTENTION_MODES, REMAT_MODES, build_unet_from_config,
                                   build_unet_variant)
from sdxl_jax.tools import memory_report

PRESET = "tiny"
VARIANTS = [(r, a, s) for r in REMAT_MODES for a in ATTENTION_MODES for s in (False, True)
            if not (a == "memory_efficient" and s)]


def _init_args(preset: str):
    cfg = presets.unet_config(preset)
    time_dim = cfg["addition_time_embed_dim"]
    return (jnp.zeros((1, 4, 8, 8)), jnp.zeros((1,), jnp.int32),
            jnp.zeros((1, 1, cfg["cross_attention_dim"])),
            {"text_embeds": jnp.zeros((1, cfg["projection_class_embeddings_input_dim"] - 6 * time_dim)),
             "time_ids": jnp.zeros((1, 6))})


@pytest.mark.parametrize("remat,attention,split", VARIANTS)
def test_variant_parameter_tree_is_identical(remat, attention, split):
    unet = build_unet_variant(PRESET, "float32", remat=remat, attention=attention, split_head_dim=split)
    assert isinstance(unet, models.FlaxUNet2DConditionModel)
    got = jax.eval_shape(lambda: unet.init(jax.random.key(0), *_init_args(PRESET)))["params"]
    want = models.abstract_params("unet", PRESET)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(got)] == \
        [(x.shape, x.dtype) for x in jax.tree.leaves(want)]


@pytest.fixture(scope="module")
def problem():
    """Params (conv_out made non-zero so gradients reach every layer) and one fixed batch."""
    cfg = presets.unet_config(PRESET)
    params = models.init_params("unet", PRESET, 0)
    k = jax.random.split(jax.random.key(1), 5)
    params["conv_out"]["kernel"] = 0.05 * jax.random.normal(k[4], params["conv_out"]["kernel"].shape)
    batch = 2
    inputs = dict(
        z=jax.random.normal(k[0], (batch, 32, 32, 4)), t=jnp.array([10.0, 700.0]),
        context=jax.random.normal(k[1], (batch, 77, cfg["cross_attention_dim"])),
        pooled=jax.random.normal(k[2], (batch, presets.text_g_config(PRESET)["projection_dim"])),
        time_ids=jnp.tile(jnp.array([[256.0, 256, 0, 0, 256, 256]]), (batch, 1)))
    target = jax.random.normal(k[3], (batch, 32, 32, 4))
    return params, inputs, target


def _loss_fn(unet, inputs, target):
    def loss(params):
        out = models.unet_apply(unet, params, inputs["z"], inputs["t"], inputs["context"],
                                inputs["pooled"], inputs["time_ids"])
        return jnp.mean((out - target) ** 2)
    return loss


def _value_and_grad(problem, **variant):
    params, inputs, target = problem
    unet = build_unet_variant(PRESET, "float32", **variant)
    return jax.jit(jax.value_and_grad(_loss_fn(unet, inputs, target)))(params)


@pytest.fixture(scope="module")
def reference(problem):
    return _value_and_grad(problem)


# Each remat mode is paired with one attention option, so three compiles cover every choice:
# if a pair matches the plain model, each of its two changes preserves the computation.
@pytest.mark.parametrize("variant", [
    dict(remat="blocks", attention="memory_efficient"),
    dict(remat="dots", split_head_dim=True),
])
def test_variant_loss_and_gradients_match_plain_model(problem, reference, variant):
    loss_ref, grads_ref = reference
    loss, grads = _value_and_grad(problem, **variant)
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-6)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_ref))
    assert scale > 0
    assert jax.tree.structure(grads) == jax.tree.structure(grads_ref)
    for path, g, g_ref in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                              jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        err = float(jnp.max(jnp.abs(g - g_ref)))
        assert err <= 1e-5 * scale, f"{jax.tree_util.keystr(path[0])}: |Δgrad| {err:.3g}"


def _top_level_eqns(jaxpr, name):
    return [e for e in jaxpr.jaxpr.eqns if e.primitive.name == name]


def test_remat_modes_put_the_unet_under_checkpoint(problem):
    """The remat modes really change the program: 'blocks' checkpoints each of the 7 blocks (3
    down, mid, 3 up) with the save-nothing policy, 'dots' the whole UNet once with the dots
    policy, 'none' nothing; memory-efficient attention runs its query-chunk scan."""
    params, inputs, target = problem

    def jaxpr(**variant):
        unet = build_unet_variant(PRESET, "float32", **variant)
        return jax.make_jaxpr(_loss_fn(unet, inputs, target))(params)

    assert _top_level_eqns(jaxpr(remat="none"), "checkpoint") == []
    blocks = _top_level_eqns(jaxpr(remat="blocks"), "checkpoint")
    assert len(blocks) == 3 + 1 + 3 and all(e.params["policy"] is None for e in blocks)
    dots = _top_level_eqns(jaxpr(remat="dots"), "checkpoint")
    assert len(dots) == 1
    assert dots[0].params["policy"] is jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    assert "scan" not in str(jaxpr())
    assert "scan" in str(jaxpr(attention="memory_efficient"))


def test_build_unet_from_config_threads_model_options():
    cfg = memory_report.load_config(os.path.join(os.path.dirname(__file__), "..", "configs",
                                                 "ztsnr.py") + ":tiny")
    assert cfg.model.preset == "tiny" and cfg.model.remat == "none"
    cfg.model.remat, cfg.model.attention, cfg.model.split_head_dim = "blocks", "memory_efficient", False
    unet = build_unet_from_config(cfg)
    assert unet.use_memory_efficient_attention and not unet.split_head_dim
    assert unet.dtype == jnp.bfloat16 and type(unet).__name__.startswith("BlockRemat")
    cfg.model.remat, cfg.model.attention, cfg.model.split_head_dim = "dots", "standard", True
    unet = build_unet_from_config(cfg)
    assert unet.split_head_dim and not unet.use_memory_efficient_attention


@pytest.mark.parametrize("kwargs,match", [
    (dict(remat="layers"), "model.remat='layers'"),
    (dict(attention="flash"), "model.attention='flash'"),
    (dict(attention="memory_efficient", split_head_dim=True), "model.split_head_dim"),
])
def test_bad_options_name_the_config_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_unet_variant(PRESET, "float32", **kwargs)


# ---- memory report helpers ----------------------------------------------------------------------
def test_memory_report_parsers():
    assert memory_report.parse_mesh("fsdp=8") == {"data": -1, "fsdp": 8}
    assert memory_report.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4}
    assert memory_report.parse_mesh("data=4") == {"data": 4, "fsdp": -1}
    assert memory_report.parse_bucket("1216x832") == (832, 1216)
    for bad in ("1024", "1020x1024", "axb"):
        with pytest.raises(ValueError, match="--bucket"):
            memory_report.parse_bucket(bad)
    with pytest.raises(ValueError, match="--mesh"):
        memory_report.parse_mesh("model=2")


def test_memory_report_peak_and_fits():
    gib = 1024 ** 3
    stats = dict(argument_bytes=6 * gib, output_bytes=6 * gib, alias_bytes=5 * gib, temp_bytes=7 * gib)
    assert memory_report.peak_bytes(stats) == 14 * gib
    assert memory_report.fits(14 * gib) == {"TPU v5e": "yes", "TPU v4": "yes", "H100": "yes", "TPU v5p": "yes"}
    assert memory_report.fits(15 * gib)["TPU v5e"] == "tight"  # 15 > 0.9·16, ≤ 16
    assert memory_report.fits(int(16.5 * gib)) == {"TPU v5e": "no", "TPU v4": "yes", "H100": "yes",
                                                   "TPU v5p": "yes"}
