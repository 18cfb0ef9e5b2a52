"""Attention kernels (`model.attention` memory_efficient / dot_product / splash / auto): the same
parameters, the same outputs and gradients as the standard attention, per backend choice and
with every remat mode. CPU: the splash kernel runs in the Pallas interpreter."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TWO_LEVEL, two_level_params
from sdxl_jax import models
from sdxl_jax.models import attention, presets
from sdxl_jax.models.attention import ATTENTION_MODES
from sdxl_jax.models.build import build_unet
from sdxl_jax.models.transformer import Attention
from sdxl_jax.models.unet import REMAT_MODES, UNet2DConditionModel, dummy_inputs

# ---- one attention layer -------------------------------------------------------------------------
# 96 queries and 77 text keys: neither a multiple of the splash kernel's 128-lane blocks, so its
# padding and key masking are exercised; 2 heads of 16.
LAYER = dict(query_dim=32, heads=2, dim_head=16)


@pytest.fixture(scope="module")
def layer():
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (2, 96, 32))
    context = jax.random.normal(k[1], (2, 77, 32))
    params = Attention(**LAYER).init(k[2], x, context)["params"]
    return params, x, context


def _layer_value_and_grad(kernel, params, x, context, dtype=jnp.float32, **fields):
    module = Attention(**LAYER, kernel=kernel, dtype=dtype, **fields)

    def loss(p, x):
        return jnp.sum(module.apply({"params": p}, x.astype(dtype), context.astype(dtype))
                       .astype(jnp.float32) ** 2)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)


@pytest.fixture(scope="module")
def layer_reference(layer):
    return _layer_value_and_grad("standard", *layer)


def _assert_close(got, want, rtol, per_leaf=True):
    """Trees identical and every leaf within rtol of the largest |value| of its reference leaf
    (`per_leaf`) or of the whole reference tree (UNet gradients: a conv bias right before a
    one-channel-per-group GroupNorm has an exactly zero gradient, so only rounding is left)."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    overall = max(float(jnp.max(jnp.abs(w))) for w in jax.tree.leaves(want))
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        scale = float(jnp.max(jnp.abs(w))) if per_leaf else overall
        assert scale > 0, f"{jax.tree_util.keystr(path)}: zero reference"
        err = float(jnp.max(jnp.abs(g.astype(jnp.float32) - w)))
        assert err <= rtol * scale, f"{jax.tree_util.keystr(path)}: |Δ| {err:.3g} vs {scale:.3g}"


@pytest.mark.parametrize("kernel", ["memory_efficient", "dot_product", "splash_interpret"])
def test_kernel_layer_matches_standard_fp32(layer, layer_reference, kernel):
    _assert_close(_layer_value_and_grad(kernel, *layer), layer_reference, rtol=2e-6)


def test_standard_split_head_dim_is_the_same_product(layer, layer_reference):
    _assert_close(_layer_value_and_grad("standard", *layer, split_head_dim=True), layer_reference,
                  rtol=2e-6)


def test_memory_efficient_runs_over_query_chunks(layer):
    """96 queries → 16 chunks of 6 (64 does not divide 96), each checkpointed inside a scan."""
    params, x, context = layer
    jaxpr = str(jax.make_jaxpr(lambda p: Attention(**LAYER, kernel="memory_efficient").apply(
        {"params": p}, x, context))(params))
    assert "length=16" in jaxpr and ("remat2" in jaxpr or "checkpoint" in jaxpr)


def test_dot_product_layer_matches_standard_bf16(layer, layer_reference):
    """bf16 compute: standard and dot_product both within bf16 rounding (8 mantissa bits) of the
    fp32 result, and the kernel no further from it than the standard bf16 softmax is."""
    errors = {}
    for kernel in ("standard", "dot_product"):
        got = _layer_value_and_grad(kernel, *layer, dtype=jnp.bfloat16)
        _assert_close(got, layer_reference, rtol=3e-2)
        errors[kernel] = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w)))
                             for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(layer_reference)))
    assert errors["dot_product"] <= 1.5 * errors["standard"], errors


@pytest.mark.parametrize("kernel", sorted(attention.KERNELS))
def test_every_kernel_keeps_the_parameters(layer, kernel):
    params, x, context = layer
    got = jax.eval_shape(lambda: Attention(**LAYER, kernel=kernel).init(
        jax.random.key(0), x, context))["params"]
    assert jax.tree.structure(got) == jax.tree.structure(params)
    assert [g.shape for g in jax.tree.leaves(got)] == [p.shape for p in jax.tree.leaves(params)]


def test_splash_splits_the_batch_over_the_mesh(layer):
    """Under a mesh the Pallas call runs per batch shard (shard_map), with the same result."""
    params, x, context = layer
    module = Attention(**LAYER, kernel="splash_interpret")
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:2])

    def apply(p, x):
        return module.apply({"params": p}, x, context)
    with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(apply)(params, x))
        got = jax.jit(apply)(params, x)
    want = Attention(**LAYER).apply({"params": params}, x, context)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-6 * float(jnp.max(jnp.abs(want))))


# ---- choosing a kernel -----------------------------------------------------------------------------
def test_auto_picks_the_backend_kernel():
    assert attention.resolve("auto", "gpu") == "dot_product"
    assert attention.resolve("auto", "tpu") == "splash"
    assert attention.resolve("auto", "cpu") == "dot_product"
    assert attention.resolve("splash", "tpu") == "splash"
    assert attention.resolve("standard", "cpu") == "standard"
    assert set(ATTENTION_MODES) == {"standard", "memory_efficient", "dot_product", "splash", "auto"}


def test_splash_off_tpu_is_refused_with_the_fix():
    assert jax.default_backend() == "cpu"
    with pytest.raises(ValueError, match=r"model.attention='splash' is JAX's Pallas TPU kernel "
                                         r"and this process runs on 'cpu'; use model.attention='auto'"):
        build_unet("tiny", "float32", attention="splash")
    with pytest.raises(ValueError, match=r"model.attention='cudnn': must be one of"):
        build_unet("tiny", "float32", attention="cudnn")


# ---- the UNet --------------------------------------------------------------------------------------
MICRO_ATTENTION_LAYERS = 2 * (1 + 1 + 2)  # (self + cross) × transformer layers: down, mid, up


@pytest.fixture(scope="module")
def problem():
    """Random float32 TWO_LEVEL params (N(0, 1/fan_in) kernels) and one batch of 2 (16×16, 77 tokens)."""
    params = two_level_params(bias_std=0.1)
    k = jax.random.split(jax.random.key(1), 4)
    inputs = dict(z=jax.random.normal(k[0], (2, 16, 16, 4)), t=jnp.array([10.0, 700.0]),
                  context=jax.random.normal(k[1], (2, 77, TWO_LEVEL["cross_attention_dim"])),
                  pooled=jax.random.normal(k[2], (2, presets.text_g_config("tiny")["projection_dim"])),
                  time_ids=jnp.tile(jnp.array([[128.0, 128, 0, 0, 128, 128]]), (2, 1)))
    return params, inputs, jax.random.normal(k[3], (2, 16, 16, 4))


def _loss_fn(unet, inputs, target):
    def loss(params):
        out = models.unet_apply(unet, params, inputs["z"], inputs["t"], inputs["context"],
                                inputs["pooled"], inputs["time_ids"])
        return jnp.mean((out - target) ** 2)
    return loss


def _unet_value_and_grad(problem, dtype="float32", **variant):
    params, inputs, target = problem
    unet = build_unet(TWO_LEVEL, dtype, **variant)
    return jax.jit(jax.value_and_grad(_loss_fn(unet, inputs, target)))(params)


@pytest.fixture(scope="module")
def unet_reference(problem):
    return _unet_value_and_grad(problem)


def test_unet_with_kernel_matches_standard_fp32(problem, unet_reference):
    """"auto" (dot_product on CPU) under per-layer remat: the kernel swap inside checkpointed
    transformer layers. The other remat modes and bf16 follow from the layer tests above (the
    kernel class computes what diffusers' does, in fp32 and bf16) and the class checks below
    (every attention layer of the UNet is the kernel class, with each remat mode); one UNet
    gradient compile costs ~30 s on 2 CPU cores."""
    loss_ref, grads_ref = unet_reference
    loss, grads = _unet_value_and_grad(problem, remat="blocks", attention="auto")
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-6)
    _assert_close(grads, grads_ref, rtol=1e-5, per_leaf=False)


# the kernel swap with every remat mode, and the TPU kernel's class (its tree only: no TPU here)
@pytest.mark.parametrize("remat,kernel", [("none", "dot_product"), ("blocks", "dot_product"),
                                          ("dots", "dot_product"), ("none", "splash")])
def test_unet_parameter_tree_is_identical(problem, remat, kernel):
    # built directly: build_unet refuses "splash" off a TPU
    unet = UNet2DConditionModel(**TWO_LEVEL, remat=remat, attention=kernel, dtype=jnp.float32)
    got = jax.eval_shape(lambda: unet.init(jax.random.key(0), *dummy_inputs(TWO_LEVEL)))["params"]
    want = problem[0]  # the plain UNet's parameters
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(got)] == \
        [(x.shape, x.dtype) for x in jax.tree.leaves(want)]


@pytest.mark.parametrize("remat", REMAT_MODES)
def test_unet_runs_every_attention_layer_through_the_kernel(problem, remat):
    """Every self- and cross-attention layer of the UNet runs the kernel, with any remat."""
    params, inputs, target = problem
    unet = build_unet(TWO_LEVEL, "float32", remat=remat, attention="dot_product")
    seen = []

    def spy(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, Attention):
            seen.append(context.module.kernel)
        return next_fun(*args, **kwargs)
    with nn.intercept_methods(spy):
        jax.eval_shape(_loss_fn(unet, inputs, target), params)
    assert seen == ["dot_product"] * MICRO_ATTENTION_LAYERS
