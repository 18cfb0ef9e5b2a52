"""Schedule, ZTSNR, v-prediction algebra, σ ↔ t, sampling schedules, latent normalisation."""
import jax.numpy as jnp
import numpy as np
import pytest

from sdxl_jax.diffusion import (add_noise, denormalize_latents, karras_sigmas, make_schedule,
                                normalize_latents, predict_eps, predict_x0, sigma_max_for_resolution,
                                sigma_to_t, t_to_sigma, trailing_sigmas, trailing_timesteps,
                                v_target, vp_coefficients)


def test_sdxl_schedule_check_values():
    s = make_schedule(ztsnr="off").sigmas
    np.testing.assert_allclose(s[0], 0.029167, rtol=1e-3)
    np.testing.assert_allclose(s[999], 14.6146, rtol=1e-3)
    snr = 1.0 / s**2
    np.testing.assert_allclose([snr[0], snr[999]], [1175.5, 0.00468], rtol=1e-3)


def test_ztsnr_check_values():
    sched = make_schedule(ztsnr="rescale")
    s = sched.sigmas
    for t, expect in [(0, 0.029167), (500, 1.775), (900, 18.35), (990, 245.95), (998, 2254.2)]:
        np.testing.assert_allclose(s[t], expect, rtol=1e-3, err_msg=f"σ_{t}")
    assert sched.alphas_cumprod[999] == 0.0
    assert np.isposinf(s[999])
    assert np.all(np.diff(s) > 0)


def test_unknown_ztsnr_mode_is_rejected():
    with pytest.raises(ValueError, match="schedule.ztsnr"):
        make_schedule(ztsnr="yes")


def test_vpred_round_trip_and_limits():
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(rng.normal(size=(5, 4, 4, 3)), jnp.float32)
    eps = jnp.asarray(rng.normal(size=(5, 4, 4, 3)), jnp.float32)
    sched = make_schedule()
    a, s = vp_coefficients(sched.alphas_cumprod, jnp.array([0, 250, 500, 900, 999]))
    z, v = add_noise(x0, eps, a, s), v_target(x0, eps, a, s)
    np.testing.assert_allclose(np.asarray(predict_x0(z, v, a, s)), np.asarray(x0), atol=1e-6)
    np.testing.assert_allclose(np.asarray(predict_eps(z, v, a, s)), np.asarray(eps), atol=1e-6)
    # SNR → ∞ (a=1, s=0): v → ε; SNR → 0 (a=0, s=1): v → −x0
    np.testing.assert_allclose(np.asarray(v_target(x0, eps, jnp.ones(5), jnp.zeros(5))), np.asarray(eps))
    np.testing.assert_allclose(np.asarray(v_target(x0, eps, jnp.zeros(5), jnp.ones(5))), -np.asarray(x0))


def test_sigma_to_t_interpolates_log_sigma_and_clamps_terminal():
    table = make_schedule().sigmas
    t = np.asarray(sigma_to_t(jnp.array([table[0], table[500], table[998], 5000.0, np.inf]), table))
    np.testing.assert_allclose(t, [0, 500, 999, 999, 999], atol=1e-3)
    mid = float(np.exp(0.5 * (np.log(table[100]) + np.log(table[101]))))
    np.testing.assert_allclose(float(sigma_to_t(mid, table)), 100.5, atol=1e-3)
    np.testing.assert_allclose(float(t_to_sigma(100.5, table)), mid, rtol=1e-5)
    assert np.isposinf(float(t_to_sigma(999.0, table)))
    np.testing.assert_allclose(float(t_to_sigma(998.0, table)), 2254.2, rtol=1e-3)
    off = make_schedule(ztsnr="off").sigmas
    np.testing.assert_allclose(float(sigma_to_t(14.6146, off)), 999.0, atol=1e-2)


def test_karras_trailing_and_resolution_sigma_max():
    k = karras_sigmas(10, 0.03, 14.6, rho=7.0)
    np.testing.assert_allclose([k[0], k[-1]], [14.6, 0.03], rtol=1e-12)
    assert np.all(np.diff(k) < 0)
    np.testing.assert_allclose(k[5], (14.6 ** (1 / 7) + 5 / 9 * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7)
    ts = trailing_timesteps(28)
    assert ts[0] == 999 and ts[-1] == 35 and len(ts) == 28
    np.testing.assert_array_equal(trailing_timesteps(4), [999, 749, 499, 249])
    assert np.isposinf(trailing_sigmas(28, make_schedule().sigmas)[0])
    assert sigma_max_for_resolution(1024, 1024) == pytest.approx(14.6)
    assert sigma_max_for_resolution(2048, 2048) == pytest.approx(29.2)
    assert sigma_max_for_resolution(768, 1344) == pytest.approx(14.6 * np.sqrt(768 * 1344) / 1024)


def test_sigma_max_scaling_keeps_mean_snr_constant_across_resolutions():
    # METHODS §5: the per-channel mean of x0 + σ·ε over an (k·1024)² canvas has noise std σ/(k·1024)
    # (the mean of N i.i.d. noise samples), so SNR of the mean is equal for σ_max(k·1024), k = 1, 2.
    def mean_noise_std(side):
        return sigma_max_for_resolution(side, side) / np.sqrt(side * side)
    np.testing.assert_allclose(mean_noise_std(1024), mean_noise_std(2048), rtol=1e-12)


@pytest.mark.parametrize("mode", ["scale", "per_channel"])
def test_latent_normalisation_inverse(mode):
    rng = np.random.default_rng(2)
    z = jnp.asarray(rng.normal(3.0, 7.0, size=(2, 4, 4, 4)), jnp.float32)
    mean, std = (4.81, 0.16, 1.35, -1.78), (9.92, 6.28, 7.60, 6.00)
    zn = normalize_latents(z, mode, mean=mean, std=std)
    if mode == "scale":
        np.testing.assert_allclose(np.asarray(zn), np.asarray(z) * 0.13025, rtol=1e-6)
    else:
        np.testing.assert_allclose(np.asarray(zn)[..., 2], (np.asarray(z)[..., 2] - 1.35) / 7.60, rtol=1e-5)
    back = denormalize_latents(zn, mode, mean=mean, std=std)
    np.testing.assert_allclose(np.asarray(back), np.asarray(z), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="latents.normalization"):
        normalize_latents(z, "none")
