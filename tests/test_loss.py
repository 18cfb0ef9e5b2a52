"""MinSNR weighting and the weighted v loss (METHODS §2, §6). Selected by `pytest -k loss`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdxl_jax.diffusion import (add_noise, make_schedule, per_sample_mse, snr, snr_loss_weight,
                                v_target, vp_coefficients, weighted_v_loss)

# METHODS §6 table, γ = 5: SNR → (min_snr, min_snr_plus_one)
GAMMA5_TABLE = [
    (0.0, 0.0, 1.0),
    (1e-4, 1e-4, 1.0),
    (1.0, 0.5, 1.0),
    (4.0, 0.8, 1.0),
    (5.0, 0.8333, 0.8333),
    (9.0, 0.5, 0.5),
    (100.0, 0.049505, 0.049505),
    (1175.5, 0.004250, 0.004250),
]


@pytest.mark.parametrize("snr_value,min_snr,plus_one", GAMMA5_TABLE)
def test_loss_weight_gamma5_table(snr_value, min_snr, plus_one):
    got_min = float(snr_loss_weight(jnp.float32(snr_value), "min_snr", 5.0))
    got_plus = float(snr_loss_weight(jnp.float32(snr_value), "min_snr_plus_one", 5.0))
    np.testing.assert_allclose(got_min, min_snr, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(got_plus, plus_one, rtol=1e-3, atol=1e-6)
    assert float(snr_loss_weight(jnp.float32(snr_value), "none", 5.0)) == 1.0


def test_loss_weight_finite_at_zero_and_infinite_snr():
    s = jnp.array([0.0, jnp.inf], jnp.float32)
    for kind, expect in [("min_snr", [0.0, 0.0]), ("min_snr_plus_one", [1.0, 0.0]), ("none", [1.0, 1.0])]:
        w = np.asarray(snr_loss_weight(s, kind, 5.0))
        assert np.all(np.isfinite(w)), kind
        np.testing.assert_array_equal(w, expect)


def test_loss_weight_rejects_unknown_kind():
    with pytest.raises(ValueError, match="loss.weighting"):
        snr_loss_weight(jnp.ones(2), "min-snr")


def test_loss_default_weighting_trains_the_terminal_step():
    sched = make_schedule(ztsnr="rescale")
    a, s = vp_coefficients(sched.alphas_cumprod, jnp.array([999]))
    assert float(snr(a, s)[0]) == 0.0
    assert float(snr_loss_weight(snr(a, s), "min_snr_plus_one")[0]) == 1.0
    assert float(snr_loss_weight(snr(a, s), "min_snr")[0]) == 0.0


def test_loss_weighted_v_loss_is_per_sample_product():
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(3, 4, 4, 2)).astype(np.float32)
    tgt = rng.normal(size=(3, 4, 4, 2)).astype(np.float32)
    w_snr = np.array([1.0, 0.5, 0.25], np.float32)
    w_tag = np.array([2.0, 1.0, 0.1], np.float32)
    expect = w_tag * w_snr * ((pred.astype(np.float64) - tgt) ** 2).mean(axis=(1, 2, 3))
    got = weighted_v_loss(jnp.asarray(pred), jnp.asarray(tgt), w_snr, w_tag)
    assert got.shape == (3,) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), expect, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(weighted_v_loss(pred, tgt, w_snr)), expect / w_tag, rtol=1e-6)


def test_loss_reduces_in_float32_for_bfloat16_outputs():
    # 4096 equal bf16 errors of 2⁻⁴: a bf16 accumulation would lose the small tail terms.
    pred = jnp.full((1, 64, 64, 1), 1.0 + 2.0**-4, jnp.bfloat16)
    tgt = jnp.ones((1, 64, 64, 1), jnp.float32)
    pred = pred.at[0, 0, 0, 0].set(jnp.bfloat16(3.0))
    expect = ((4095 * (2.0**-4) ** 2) + 4.0) / 4096
    got = per_sample_mse(pred, tgt)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got[0]), expect, rtol=1e-6)


def test_loss_terminal_step_is_exact_and_finite():
    sched = make_schedule(ztsnr="rescale")
    key0, key1 = jax.random.split(jax.random.PRNGKey(0))
    x0 = jax.random.normal(key0, (2, 8, 8, 4))
    eps = jax.random.normal(key1, (2, 8, 8, 4))
    a, s = vp_coefficients(sched.alphas_cumprod, jnp.array([999, 999]))
    z, v = add_noise(x0, eps, a, s), v_target(x0, eps, a, s)
    np.testing.assert_array_equal(np.asarray(z), np.asarray(eps))
    np.testing.assert_array_equal(np.asarray(v), -np.asarray(x0))
    w = snr_loss_weight(snr(a, s))
    loss = weighted_v_loss(jnp.zeros_like(v), v, w)
    np.testing.assert_allclose(np.asarray(loss), np.mean(np.asarray(x0) ** 2, axis=(1, 2, 3)), rtol=1e-6)
