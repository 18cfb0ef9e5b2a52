"""LoRA / LoCon / LoKr adapters (sdxl_jax/adapters): targets, init, the in-step merge, the
factorised in-step LoRA against it, host merges and file round trips, on the tiny preset,
against float64 numpy recomputations.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdxl_jax.adapters import (AdapterConfig, Intercepted, Target, abstract_adapters, adapt,
                               apply_adapters, export_lora, init_adapters, kohya_layout,
                               make_plan, merge_params, read_lora)
from sdxl_jax.models import build_text_encoders, encode_text, init_params, presets, unet_apply
from sdxl_jax.models.remat import build_unet_variant
from sdxl_jax.models.convert import flat_leaves
from sdxl_jax.models.safetensors_io import SafetensorsFile, WeightsError
from configs.ztsnr import get_config

PRESET = "tiny"


@pytest.fixture(scope="module")
def base():
    return {n: init_params(n, PRESET, 0) for n in ("unet", "text_l", "text_g")}


def randomised(adapters, seed, std=0.05):
    """Every adapter leaf random (the zero-initialised up factors too), so ΔW ≠ 0."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32) * std),
                        adapters)


def kernels(tree):
    return {p[:-1]: np.asarray(x) for p, x in flat_leaves(tree) if p[-1] == "kernel"}


def get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


# ---- targets ----------------------------------------------------------------------------------

def test_default_targets_tiny(base):
    plan = make_plan(base, AdapterConfig(models=("unet", "text_l", "text_g")))
    # tiny UNet: 11 transformer blocks × (attn1, attn2: q/k/v/out + ff: 2) + 7 attentions × proj
    # in/out = 124; each 2-layer CLIP: 2 × (q, k, v, out, fc1, fc2) = 12
    assert {n: len(t) for n, t in plan.items()} == {"unet": 124, "text_l": 12, "text_g": 12}
    names = {"/".join(p) for p in plan["unet"]}
    assert "down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_k" in names
    assert "up_blocks_0/attentions_1/proj_out" in names
    assert not any("resnets" in n or "time_emb" in n for n in names)
    conv = make_plan(base, AdapterConfig(conv=True, rank=4, conv_rank=2))
    extra = {"/".join(p): t for p, t in conv["unet"].items() if p not in plan["unet"]}
    # tiny: 11 resnets (down 3, mid 2, up 6) × (conv1, conv2, time_emb_proj), 8 conv_shortcuts
    # (down_blocks_1/resnets_0: 64 → 32, down_blocks_2/resnets_0: 32 → 64, and every up resnet,
    # whose skip-concat input width differs), 2 downsamplers + 2 upsamplers
    assert len(extra) == 11 * 3 + 8 + 4
    assert extra["down_blocks_1/resnets_0/conv_shortcut"].shape == (1, 1, 64, 32)
    assert extra["down_blocks_0/resnets_0/conv1"].rank == 2  # 3×3: conv_rank
    assert extra["down_blocks_2/resnets_0/conv_shortcut"].rank == 4  # 1×1: rank
    assert extra["mid_block/resnets_0/time_emb_proj"].kind == "linear"


def test_bad_config_is_one_clear_error(base):
    with pytest.raises(ValueError, match="match no kernel"):
        make_plan(base, AdapterConfig(targets=("attn3/to_q$",)))
    with pytest.raises(ValueError, match="lora.algo"):
        AdapterConfig(algo="loha")
    with pytest.raises(ValueError, match="Linear layers only"):
        AdapterConfig(algo="lokr", conv=True)


# ---- the in-step merge ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def conv_plan(base):
    return make_plan(base, AdapterConfig(rank=4, alpha=2.0, conv=True, conv_rank=3,
                                         conv_alpha=6.0))


def expected_delta_flax(t, p):
    """float64 ΔW in Flax layout, written from the formulas (not from lora.py)."""
    if t.algo == "lokr":
        a, b, c, d = t.factors
        w2 = np.float64(p["lokr_w2_a"]) @ np.float64(p["lokr_w2_b"])
        # PyTorch W[i·c + k, j·d + l] = w1[i, j]·w2[k, l]
        w = np.einsum("ij,kl->ikjl", np.float64(p["lokr_w1"]), w2).reshape(a * c, b * d)
        return t.alpha / t.rank * w.T
    down, up = np.float64(p["lora_down"]), np.float64(p["lora_up"])
    if t.kind == "linear":  # W = B·A (out, in); Flax kernel (in, out)
        return t.alpha / t.rank * (up @ down).T
    # conv: A (r, in, kh, kw), B (out, r, 1, 1): ΔW[o, i, h, w] = Σ_r B[o, r]·A[r, i, h, w]
    w = np.einsum("or,rihw->oihw", up[:, :, 0, 0], down)
    return t.alpha / t.rank * np.transpose(w, (2, 3, 1, 0))


@pytest.mark.parametrize("algo", ["lora", "lokr"])
def test_merge_equals_base_plus_scaled_delta(base, conv_plan, algo):
    plan = conv_plan if algo == "lora" else make_plan(
        base, AdapterConfig(algo="lokr", rank=2, alpha=3.0, models=("unet", "text_l")))
    adapters = randomised(init_adapters(plan, seed=0), seed=1)
    merged = merge_params(base, adapters, plan, scale=0.7)
    assert merged["text_g"] is base["text_g"]  # no adapter: passed through
    for name, targets in plan.items():
        got, want = kernels(merged[name]), kernels(base[name])
        assert got.keys() == want.keys()
        for path, w in want.items():
            if path not in targets:
                assert np.array_equal(got[path], w), path  # untouched, bitwise
                continue
            t = targets[path]
            p = {k: np.asarray(v) for k, v in get(adapters[name], path).items()}
            expect = np.float64(w) + 0.7 * expected_delta_flax(t, p)
            assert got[path].dtype == np.float32
            np.testing.assert_allclose(got[path], expect, rtol=1e-5, atol=1e-6, err_msg=str(path))
            assert np.max(np.abs(expect - w)) > 1e-4  # the adapter really moved this kernel
        for (p1, x1), (p2, x2) in zip(flat_leaves(merged[name]), flat_leaves(base[name])):
            if p1[-1] != "kernel":
                assert np.array_equal(np.asarray(x1), np.asarray(x2)), p1


def test_in_step_merge_matches_host_merge_and_keeps_dtype(base, conv_plan):
    # one target of each kind under jit (compiling all ~170 merges costs ~20 s on CPU)
    keep = [("mid_block", "attentions_0", "proj_in"), ("mid_block", "resnets_0", "conv1"),
            ("mid_block", "resnets_0", "time_emb_proj")]
    plan = {"unet": {p: conv_plan["unet"][p] for p in keep}}
    assert {t.kind for t in plan["unet"].values()} == {"linear", "conv"}
    adapters = randomised(init_adapters(plan, seed=0), seed=2)
    host = merge_params(base, adapters, plan, scale=1.3)
    traced = jax.jit(lambda b, a: apply_adapters(b, a, plan, 1.3))(base, adapters)
    for (p, x), (_, y) in zip(flat_leaves(traced["unet"]), flat_leaves(host["unet"])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base["unet"])
    out = apply_adapters({"unet": bf16}, adapters, plan)
    assert {x.dtype for x in jax.tree.leaves(out["unet"])} == {jnp.dtype(jnp.bfloat16)}


def test_gradients_reach_only_the_adapter(base, conv_plan):
    """d loss / d adapters through the merged kernels: with B = 0 only B gets a gradient
    (∂ΔW/∂A = B·… = 0), which is what makes LoRA start as the base and still learn."""
    plan = {"unet": {p: t for p, t in conv_plan["unet"].items()
                     if p[:2] == ("mid_block", "attentions_0") and p[-1] in ("proj_in", "proj_out")}}
    adapters = init_adapters(plan, seed=0)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 64)), jnp.float32)

    def loss(ad):
        k = apply_adapters({"unet": base["unet"]}, ad, plan)["unet"]
        w = k["mid_block"]["attentions_0"]["proj_in"]["kernel"]
        return jnp.sum(jnp.tanh(x @ w) ** 2)
    grads = jax.grad(loss)(adapters)
    g = grads["unet"]["mid_block"]["attentions_0"]["proj_in"]
    assert float(jnp.abs(g["lora_up"]).max()) > 0
    assert float(jnp.abs(g["lora_down"]).max()) == 0.0
    other = grads["unet"]["mid_block"]["attentions_0"]["proj_out"]
    assert all(float(jnp.abs(v).max()) == 0.0 for v in other.values())  # unused layer


def test_rank_dropout_drops_whole_rank_components(base):
    plan = make_plan(base, AdapterConfig(rank=8, alpha=8.0, targets=(), models=("text_l",)))
    path = next(iter(plan["text_l"]))
    t = plan["text_l"][path]
    adapters = randomised(init_adapters(plan, seed=0), seed=5)
    p = {k: np.float64(v) for k, v in get(adapters["text_l"], path).items()}
    w0 = np.float64(get(base["text_l"], path)["kernel"])
    fn = jax.jit(lambda a, key: apply_adapters(base, a, plan, rng=key, rank_dropout=0.5))
    kept_sets = set()
    for seed in range(4):
        w = np.float64(get(fn(adapters, jax.random.key(seed))["text_l"], path)["kernel"])
        # ΔW = Σ_k c_k · up[:, k] ⊗ down[k, :]: solve for the coefficients c_k
        basis = np.stack([np.outer(p["lora_down"][k], p["lora_up"][:, k]).ravel()
                          for k in range(t.rank)], axis=1)
        c, *_ = np.linalg.lstsq(basis, (w - w0).ravel(), rcond=None)
        c /= t.alpha / t.rank
        assert np.allclose(c, np.round(c), atol=1e-3) and set(np.round(c)) <= {0.0, 2.0}, c
        kept_sets.add(tuple(np.round(c)))
    assert len(kept_sets) > 1  # a fresh mask per step


# ---- the factorised in-step LoRA --------------------------------------------------------------

class _Toy(nn.Module):
    """A strided 3×3 conv, a 1×1 conv and a Dense: every layer kind LoRA / LoCon targets."""
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(6, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=self.dtype,
                    name="conv")(x)
        h = nn.Conv(5, (1, 1), padding="VALID", dtype=self.dtype, name="shortcut")(h)
        return nn.Dense(7, dtype=self.dtype, name="proj")(h)


def toy_setup():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 9, 4)), jnp.float32)
    params = _Toy().init(jax.random.key(0), x)["params"]
    plan = {"unet": {("conv",): Target("lora", "conv", (3, 3, 4, 6), 2, 3.0),
                     ("proj",): Target("lora", "linear", (5, 7), 3, 1.5),
                     ("shortcut",): Target("lora", "conv", (1, 1, 6, 5), 2, 2.0)}}
    return x, {"unet": params}, plan, randomised(init_adapters(plan, seed=0), seed=6, std=0.3)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_factorised_layers_equal_the_merged_ones(dtype):
    """conv(x; W + ΔW) = conv(x; W) + up(conv(x; down)): the branch keeps the layer's strides
    and padding, and runs in the layer's compute dtype."""
    x, base, plan, ad = toy_setup()
    toy = _Toy(dtype=jnp.dtype(dtype))
    want = toy.apply({"params": apply_adapters(base, ad, plan, 0.8)["unet"]}, x)
    params, branches = adapt(base, ad, plan, 0.8)
    assert params["unet"] is base["unet"]  # no merged kernel
    got = Intercepted(toy, branches["unet"]).apply({"params": params["unet"]}, x)
    assert got.dtype == want.dtype == jnp.dtype(dtype)
    plain = toy.apply({"params": base["unet"]}, x)
    assert float(jnp.max(jnp.abs(want - plain))) > 0.1  # the adapters matter
    tol = 1e-5 if dtype == "float32" else 3e-2
    np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=tol, atol=tol)


# The factorised-vs-merged UNet checks run on the one-level micro UNet (every kind of layer the
# adapters touch: attention, feed-forward, proj_in/out, resnet convs and time projections) at
# 2.5x less compile time than tiny; the target and file tests use tiny's SDXL layout.
UNET_PRESET = "micro"


@pytest.fixture(scope="module")
def perturbed():
    """The micro UNet params with every leaf perturbed (init leaves conv_out at 0: output 0)."""
    rng = np.random.default_rng(0)
    return {"unet": jax.tree.map(
        lambda x: jnp.asarray(np.asarray(x) + 0.02 * rng.standard_normal(x.shape), jnp.float32),
        init_params("unet", UNET_PRESET, 0))}


def unet_inputs():
    rng = np.random.default_rng(2)
    cfg = presets.unet_config(UNET_PRESET)
    return (rng.standard_normal((2, 16, 16, 4)).astype(np.float32), np.array([10.0, 900.0]),
            rng.standard_normal((2, 77, cfg["cross_attention_dim"])).astype(np.float32),
            rng.standard_normal((2, presets.text_g_config(PRESET)["projection_dim"])
                                ).astype(np.float32),
            np.array([[256, 256, 0, 0, 256, 256], [128, 192, 16, 8, 128, 192]], np.float32))


@functools.lru_cache(maxsize=None)
def unet_vjp(remat: str, form: str):
    """jit((base, adapters, plan, cotangent) -> (UNet output, d<output, cotangent>/d adapters))
    with the adapters merged ("merged") or factorised ("factorised")."""
    unet = build_unet_variant(UNET_PRESET, "float32", remat=remat)
    x = unet_inputs()

    def run(base, ad, plan):
        if form == "merged":
            return unet_apply(unet, apply_adapters(base, ad, plan)["unet"], *x)
        params, branches = adapt(base, ad, plan)
        return unet_apply(Intercepted(unet, branches["unet"]), params["unet"], *x)

    def fn(base, ad, plan, ct):
        out, pull = jax.vjp(lambda a: run(base, a, plan), ad)
        return out, pull(ct)[0]
    return jax.jit(fn, static_argnums=2)


class _Static(dict):
    """A plan usable as a jit static argument (hashable by identity)."""
    __hash__ = object.__hash__


@pytest.fixture(scope="module")
def unet_conv_plan(perturbed):
    return _Static(unet=make_plan(perturbed, AdapterConfig(rank=4, alpha=2.0, conv=True, conv_rank=3,
                                                           conv_alpha=6.0))["unet"])


@pytest.mark.parametrize("remat", ["none", "blocks"])
def test_factorised_unet_equals_merged_with_its_gradients(perturbed, unet_conv_plan, remat):
    ad = randomised(init_adapters(unet_conv_plan, seed=0), seed=7)
    ct = jnp.asarray(np.random.default_rng(3).standard_normal((2, 16, 16, 4)), jnp.float32)
    want, g_want = unet_vjp(remat, "merged")(perturbed, ad, unet_conv_plan, ct)
    got, g_got = unet_vjp(remat, "factorised")(perturbed, ad, unet_conv_plan, ct)
    big = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * big)
    g_big = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_want))
    assert g_big > 0
    # atol: float32 sums of ~1e3 terms (the conv adapters' gradients reach ~10); and the
    # resnets' time_emb_proj adapters get ~1e-8 gradients of pure rounding noise (a per-channel
    # shift that the next GroupNorm, one channel per group in micro's 32, removes)
    for (path, g), h in zip(jax.tree_util.tree_flatten_with_path(g_want)[0],
                            jax.tree.leaves(g_got)):
        np.testing.assert_allclose(h, g, rtol=1e-4, atol=1e-5 * g_big,
                                   err_msg=jax.tree_util.keystr(path))


def test_zero_initialised_factorised_unet_is_the_base_bitwise(perturbed, unet_conv_plan):
    """B = 0: every targeted layer returns y + 0 = y. Checked op by op (no jit): compiled, the
    extra add changes how XLA rewrites the ops around a layer (seen with the attn2/to_q targets
    of tiny on CPU, ~1e-6 relative), a last-bit difference that is not the adapter's."""
    ad = init_adapters(unet_conv_plan, seed=0)  # lora_up = 0
    unet = build_unet_variant(UNET_PRESET, "float32")
    x = unet_inputs()
    params, branches = adapt(perturbed, ad, unet_conv_plan)
    with jax.disable_jit():
        got = unet_apply(Intercepted(unet, branches["unet"]), params["unet"], *x)
        plain = unet_apply(unet, perturbed["unet"], *x)
    assert float(jnp.max(jnp.abs(plain))) > 0.1
    np.testing.assert_array_equal(np.asarray(got), np.asarray(plain))


def test_factorised_rank_dropout_equals_merged_in_the_text_encoders(base):
    """Rank dropout masks the r-dim activation (factorised) or the factors (merged): the same
    ΔW, the same draw for one key; through transformers' CLIP towers (default text targets)."""
    plan = _Static(make_plan(base, AdapterConfig(rank=8, alpha=4.0, models=("text_l", "text_g"))))
    ad = randomised(init_adapters(plan, seed=0), seed=8)
    text_l, text_g = build_text_encoders(PRESET, "float32")
    ids = np.random.default_rng(4).integers(3, 1000, (2, 77)).astype(np.int32)

    def run(a, key, form, p_drop):
        kw = dict(rng=key, rank_dropout=p_drop)
        if form == "merged":
            p, tl, tg = apply_adapters(base, a, plan, **kw), text_l, text_g
        else:
            p, branches = adapt(base, a, plan, **kw)
            tl, tg = Intercepted(text_l, branches["text_l"]), Intercepted(text_g, branches["text_g"])
        return encode_text(tl, tg, p["text_l"], p["text_g"], ids, ids, 1)

    @functools.partial(jax.jit, static_argnums=(2, 3))
    def value_and_grad(a, key, form, p_drop):
        return jax.value_and_grad(lambda a: sum(jnp.sum(jnp.sin(o)) for o in run(a, key, form, p_drop)))(a)

    key = jax.random.key(11)
    want, g_want = value_and_grad(ad, key, "merged", 0.5)
    got, g_got = value_and_grad(ad, key, "factorised", 0.5)
    undropped, _ = value_and_grad(ad, key, "factorised", 0.0)
    assert abs(float(undropped) - float(want)) > 1e-3  # the mask did something
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    g_big = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_want))
    for g, h in zip(jax.tree.leaves(g_want), jax.tree.leaves(g_got)):
        np.testing.assert_allclose(h, g, rtol=1e-4, atol=1e-6 * g_big)


# ---- files ------------------------------------------------------------------------------------

@pytest.mark.parametrize("algo", ["lora", "lokr"])
def test_kohya_round_trip_is_exact(base, conv_plan, tmp_path, algo):
    plan = conv_plan if algo == "lora" else make_plan(
        base, AdapterConfig(algo="lokr", rank=2, alpha=3.0, models=("unet", "text_g")))
    if algo == "lora":
        plan = {**plan, **make_plan(base, AdapterConfig(rank=4, alpha=1.0,
                                                        models=("text_l", "text_g")))}
    adapters = randomised(init_adapters(plan, seed=0), seed=3)
    out = export_lora(str(tmp_path / "x.safetensors"), adapters, plan, PRESET, "kohya",
                      np.float32, {"title": "t", "ztsnr": True})
    st = SafetensorsFile(out)
    assert [s.key for s, _ in kohya_layout(abstract_adapters(plan), plan, PRESET)] == list(
        st.tensors)
    md = st.metadata
    assert md["modelspec.prediction_type"] == "v" and md["ss_v_parameterization"] == "True"
    assert md["modelspec.architecture"].endswith("/lora") and md["ss_zero_terminal_snr"] == "True"
    back, plan_back = read_lora(out, PRESET)
    assert plan_back == plan
    assert [p for p, _ in flat_leaves(back)] == [p for p, _ in flat_leaves(adapters)]
    for (p, x), (_, y) in zip(flat_leaves(back), flat_leaves(adapters)):
        assert np.array_equal(x, np.asarray(y)), p


def test_peft_round_trip_keeps_delta(base, conv_plan, tmp_path):
    adapters = randomised(init_adapters(conv_plan, seed=0), seed=4)
    out = export_lora(str(tmp_path / "p.safetensors"), adapters, conv_plan, PRESET, "peft",
                      np.float32)
    keys = list(SafetensorsFile(out).tensors)
    assert "unet.mid_block.attentions_0.proj_in.lora_A.weight".replace("_0", ".0") in keys
    back, plan_back = read_lora(out, PRESET)
    assert all(t.alpha == t.rank for t in plan_back["unet"].values())  # α/r folded into B
    a, b = merge_params(base, adapters, conv_plan), merge_params(base, back, plan_back)
    for (p, x), (_, y) in zip(flat_leaves(a["unet"]), flat_leaves(b["unet"])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7,
                                   err_msg=str(p))


def test_foreign_file_is_one_clear_error(tmp_path):
    from sdxl_jax.models.safetensors_io import TensorSpec, write_safetensors
    path = str(tmp_path / "sd15.safetensors")
    key = "lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"
    write_safetensors(path, [TensorSpec(key, np.float32, (2, 2))],
                      lambda k: np.zeros((2, 2), np.float32))
    with pytest.raises(WeightsError, match="names no layer"):
        read_lora(path, PRESET)


def test_lora_init_reads_our_peft_export_as_the_run_it_came_from(base, conv_plan, tmp_path):
    """A run's own lora-diffusers (PEFT) export records lora_alpha = r with α/r folded into
    lora_B, so every alpha differs from a run with α ≠ r: as model.lora_init it is read with
    the run's alpha and the same ΔW (it used to be refused as "another algo/rank/alpha")."""
    from sdxl_jax.train.trainable import _adapters_from_file
    adapters = randomised(init_adapters(conv_plan, seed=0), seed=5)
    out = export_lora(str(tmp_path / "p.safetensors"), adapters, conv_plan, PRESET, "peft",
                      np.float32)
    cfg = get_config(PRESET)
    cfg.model.lora_init = out
    tree = _adapters_from_file(type("Trainable", (), {"plan": conv_plan}), cfg)
    assert [p for p, _ in flat_leaves(tree)] == [p for p, _ in flat_leaves(adapters)]
    for (p, x), (_, y) in zip(flat_leaves(tree), flat_leaves(adapters)):  # the run's own factors
        np.testing.assert_allclose(x, np.asarray(y), rtol=1e-6, atol=1e-8, err_msg=str(p))
    # what still differs is one line naming a layer with the file's and the run's settings
    from sdxl_jax.adapters import read_lora_init
    other = make_plan(base, AdapterConfig(rank=2, alpha=2.0, conv=True, conv_rank=3, conv_alpha=6.0))
    # rank 4 → 2 on the 124 attention layers, 11 time_emb_proj and 8 1×1 conv_shortcuts
    with pytest.raises(ValueError, match=r"model\.lora_init='.*p\.safetensors': 143 adapted layers "
                                         r"differ .* e\.g\. unet/down_blocks_0/resnets_0/time_emb_proj"
                                         r": file lora rank 4 alpha 4, run lora rank 2 alpha 2; set"):
        read_lora_init(out, PRESET, other)
