"""Independent float64 numpy re-derivation of the recipe's formulas, compared with the package.

Nothing here calls the code under test to build its expectations: the schedule, the ZTSNR
rescale, the v target, SNR and CFG rescale are written out again from the papers' definitions.
"""
import jax.numpy as jnp
import numpy as np

from sdxl_jax.diffusion import (add_noise, cfg_rescale, make_schedule, snr, v_target,
                                vp_coefficients)


def _reference_tables():
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alpha_bar = np.cumprod(1.0 - betas)
    # Lin et al. 2023, Algorithm 1, written step by step
    sqrt_ab = np.sqrt(alpha_bar)
    first, last = sqrt_ab[0].copy(), sqrt_ab[-1].copy()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab_z = sqrt_ab**2
    alphas = np.empty_like(ab_z)
    alphas[0] = ab_z[0]
    alphas[1:] = ab_z[1:] / ab_z[:-1]
    ab_z2 = np.cumprod(alphas)
    return alpha_bar, ab_z2


def test_crosscheck_schedule_and_ztsnr_float64():
    ab_ref, abz_ref = _reference_tables()
    np.testing.assert_allclose(make_schedule(ztsnr="off").alphas_cumprod, ab_ref, rtol=1e-12)
    got = make_schedule(ztsnr="rescale").alphas_cumprod
    np.testing.assert_allclose(got[:-1], abz_ref[:-1], rtol=1e-9)
    assert got[-1] == 0.0 and abs(abz_ref[-1]) < 1e-30
    sig_ref = np.sqrt((1 - abz_ref[:-1]) / abz_ref[:-1])
    np.testing.assert_allclose(make_schedule().sigmas[:-1], sig_ref, rtol=1e-9)


def test_crosscheck_v_target_and_snr():
    _, abz = _reference_tables()
    rng = np.random.default_rng(3)
    t = np.array([0, 10, 500, 998, 999])
    x0 = rng.normal(size=(5, 6, 6, 4))
    eps = rng.normal(size=(5, 6, 6, 4))
    a = np.sqrt(abz[t]).clip(0)
    a[-1] = 0.0
    s = np.sqrt(1.0 - a**2)
    z_ref = a[:, None, None, None] * x0 + s[:, None, None, None] * eps
    v_ref = a[:, None, None, None] * eps - s[:, None, None, None] * x0
    snr_ref = a**2 / s**2
    ja, js = vp_coefficients(make_schedule().alphas_cumprod, jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(add_noise(jnp.asarray(x0, jnp.float32), jnp.asarray(eps, jnp.float32), ja, js)), z_ref, atol=2e-6)
    np.testing.assert_allclose(np.asarray(v_target(jnp.asarray(x0, jnp.float32), jnp.asarray(eps, jnp.float32), ja, js)), v_ref, atol=2e-6)
    np.testing.assert_allclose(np.asarray(snr(ja, js)), snr_ref, rtol=1e-5, atol=1e-12)


def test_crosscheck_cfg_rescale():
    rng = np.random.default_rng(4)
    u = rng.normal(size=(3, 4, 5, 5))
    c = rng.normal(0.2, 1.5, size=(3, 4, 5, 5))
    w, phi = 5.0, 0.7
    x = u + w * (c - u)
    std_c = c.reshape(3, -1).std(axis=1)[:, None, None, None]
    std_x = x.reshape(3, -1).std(axis=1)[:, None, None, None]
    ref = phi * (x * std_c / std_x) + (1 - phi) * x
    got = cfg_rescale(jnp.asarray(u, jnp.float32), jnp.asarray(c, jnp.float32), w, phi)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(cfg_rescale(jnp.asarray(u), jnp.asarray(c), w, 0.0)), x, rtol=1e-4, atol=1e-4)
