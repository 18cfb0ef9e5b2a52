"""Loss options of METHODS §15: debiased weighting and (scheduled) pseudo-Huber. `pytest -k loss`."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from sdxl_jax.diffusion import (elementwise_loss, huber_threshold, make_schedule, pseudo_huber,
                                snr, snr_loss_weight, vp_coefficients, weighted_v_loss)

# SNR → √SNR/(SNR+1), by hand: 0/1, 0.5/1.25, 1/2, 2/5, 3/10, 10/101
DEBIASED_TABLE = [(0.0, 0.0), (0.25, 0.4), (1.0, 0.5), (4.0, 0.4), (9.0, 0.3), (100.0, 10 / 101)]


@pytest.mark.parametrize("snr_value,expect", DEBIASED_TABLE)
def test_loss_debiased_weight_table(snr_value, expect):
    got = float(snr_loss_weight(jnp.float32(snr_value), "debiased"))
    np.testing.assert_allclose(got, expect, rtol=1e-6, atol=0)


def test_loss_debiased_is_zero_at_snr_zero_and_infinity():
    w = np.asarray(snr_loss_weight(jnp.array([0.0, jnp.inf], jnp.float32), "debiased"))
    np.testing.assert_array_equal(w, [0.0, 0.0])
    # the ZTSNR terminal step (t = 999, SNR exactly 0) gets no weight, like min_snr
    a, s = vp_coefficients(make_schedule(ztsnr="rescale").alphas_cumprod, jnp.array([999]))
    assert float(snr_loss_weight(snr(a, s), "debiased")[0]) == 0.0


@pytest.mark.parametrize("d,c,expect", [
    (0.0, 1.0, 0.0),
    (1.0, 1.0, 2 * (math.sqrt(2) - 1)),      # 0.828427…
    (3.0, 1.0, 2 * (math.sqrt(10) - 1)),     # 4.324555…
    (1.2, 0.5, 0.8),                          # 2·0.5·(√1.69 − 0.5) = 1.3 − 0.5
    (-1.2, 0.5, 0.8),                         # symmetric in d
    (1000.0, 0.1, 199.98),                    # 0.2·(√(10⁶ + 0.01) − 0.1) = 199.98000…1
])
def test_loss_pseudo_huber_literal_values(d, c, expect):
    np.testing.assert_allclose(float(pseudo_huber(jnp.float32(d), c)), expect, rtol=2e-6, atol=0)


def test_loss_pseudo_huber_limits():
    c = 1.0
    small = np.array([1e-3, -2e-3, 5e-4], np.float32)
    got = np.asarray(pseudo_huber(jnp.asarray(small), c))
    # ≈ d² to relative order d²/(4c²) ≤ 1e-6; a naive √(d²+c²) − c in float32 is ~20 % off here
    np.testing.assert_allclose(got, small.astype(np.float64) ** 2, rtol=2e-6)
    large = np.array([1e3, -4e3], np.float32)
    got = np.asarray(pseudo_huber(jnp.asarray(large), 0.05))
    # 2c|d| − 2c² + O(c³/|d|)
    np.testing.assert_allclose(got, 2 * 0.05 * np.abs(large) - 2 * 0.05 ** 2, rtol=1e-6)
    assert np.all(np.abs(got / (2 * 0.05 * np.abs(large)) - 1) < 1e-4)


def test_loss_huber_threshold_schedules_literal():
    a = jnp.array([0.0, 1.0, 1 / math.sqrt(2), 0.6], jnp.float32)
    s = jnp.array([1.0, 0.0, 1 / math.sqrt(2), 0.8], jnp.float32)
    # c + (1−c)/(1+σ)², σ = s/a: terminal (σ=∞) → c; σ=0 → 1; σ=1 → c + (1−c)/4; σ=4/3 → c + (1−c)·9/49
    np.testing.assert_allclose(np.asarray(huber_threshold(a, s, 0.1, "snr")),
                               [0.1, 1.0, 0.325, 0.1 + 0.9 * 9 / 49], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(huber_threshold(a, s, 0.1, "constant")),
                                  np.full(4, 0.1, np.float32))


def test_loss_huber_snr_schedule_matches_sigma_form_on_the_sdxl_table():
    sched = make_schedule(ztsnr="rescale")
    t = np.array([0, 250, 500, 750, 998, 999])
    a, s = vp_coefficients(sched.alphas_cumprod, jnp.asarray(t))
    got = np.asarray(huber_threshold(a, s, 0.1, "snr"))
    ac = sched.alphas_cumprod.astype(np.float64)[t]
    with np.errstate(divide="ignore"):
        sigma = np.sqrt((1 - ac) / ac)  # ∞ at the terminal step
    np.testing.assert_allclose(got, 0.1 + 0.9 / (1 + sigma) ** 2, rtol=1e-5)
    assert got[-1] == np.float32(0.1) and np.all(np.diff(got) < 0)  # large c at low noise


def test_loss_weighted_v_loss_huber_per_sample():
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(3, 4, 4, 2)).astype(np.float32)
    tgt = rng.normal(size=(3, 4, 4, 2)).astype(np.float32)
    c = np.array([1.0, 0.3, 0.05], np.float32)
    w_snr = np.array([1.0, 0.5, 0.25], np.float32)
    w_tag = np.array([2.0, 1.0, 0.1], np.float32)
    d = pred.astype(np.float64) - tgt
    cc = c.astype(np.float64)[:, None, None, None]
    expect = w_tag * w_snr * (2 * cc * (np.sqrt(d ** 2 + cc ** 2) - cc)).mean(axis=(1, 2, 3))
    got = weighted_v_loss(jnp.asarray(pred), jnp.asarray(tgt), w_snr, w_tag, loss_type="huber",
                          huber_c=jnp.asarray(c))
    assert got.shape == (3,) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), expect, rtol=1e-5)
    # the default stays the squared error, and mse through elementwise_loss agrees with it
    mse = (d ** 2).mean(axis=(1, 2, 3)) * w_snr
    np.testing.assert_allclose(np.asarray(weighted_v_loss(pred, tgt, w_snr)), mse, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(elementwise_loss(pred, tgt)).mean(axis=(1, 2, 3)) * w_snr,
                               mse, rtol=1e-6)


def test_loss_option_errors_name_the_key():
    x = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match="loss.type"):
        elementwise_loss(x, x, "l1")
    with pytest.raises(ValueError, match="huber_c"):
        elementwise_loss(x, x, "huber")
    with pytest.raises(ValueError, match="loss.huber_schedule"):
        huber_threshold(jnp.ones(1), jnp.ones(1), 0.1, "exponential")
    with pytest.raises(ValueError, match="loss.huber_c"):
        huber_threshold(jnp.ones(1), jnp.ones(1), 0.0, "constant")
    with pytest.raises(ValueError, match="loss.weighting"):
        snr_loss_weight(jnp.ones(1), "debias")
