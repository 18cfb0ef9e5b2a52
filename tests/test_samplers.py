"""ZTSNR samplers on a Gaussian toy problem with an exact denoiser, plus schedule and CFG checks.

Toy data: x0 ~ N(μ, s²) independently per dimension. In VE form the exact denoiser is
x̂0(x, σ) = (s²·x + σ²·μ)/(s² + σ²), which tends to μ as σ → ∞ with x = σ·n. Every sampler is
then linear in the deviation x − μ, so the variance it produces with the test's own schedule
follows from a closed-form moment recursion (`predicted_variance`, float64): that is the
discretisation part of the tolerance; the statistical part comes from the sample size.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sdxl_jax.diffusion import (SAMPLERS, cfg_rescale, make_cfg_model, make_schedule,
                                make_v_denoiser, sample, sampling_sigmas, t_to_sigma)

TABLE = make_schedule().sigmas  # ZTSNR: ends in +inf
N, SHAPE = 4096, (2, 2, 4)  # 4096 samples of 16 independent dimensions
MU = np.linspace(-1.5, 1.5, 16).reshape(SHAPE)
SD = np.linspace(0.5, 1.5, 16).reshape(SHAPE)


def exact_ve_denoiser(x, sigma):
    """x̂0 for Gaussian data; at σ = +inf the sampler passes n and the limit is μ."""
    sigma = jnp.asarray(sigma, jnp.float32)
    finite = jnp.where(jnp.isinf(sigma), 1.0, sigma)
    return jnp.where(jnp.isinf(sigma), MU + 0.0 * x,
                     (SD**2 * x + finite**2 * MU) / (SD**2 + finite**2))


def exact_v_model(z, t):
    """The exact v̂(z, t) in VP form (z = a·x0 + s·ε): v̂ = (a·z − x̂0)/s, x̂0 = E[x0 | z]."""
    sigma = t_to_sigma(t, TABLE).reshape(-1, 1, 1, 1)
    a, s = jax.lax.rsqrt(1.0 + sigma**2), jax.lax.rsqrt(1.0 + 1.0 / sigma**2)
    x0 = (a * SD**2 * z + s**2 * MU) / (a**2 * SD**2 + s**2)
    return (a * z - x0) / s


def predicted_variance(sampler, sigmas, s2):
    """Var(x − μ) after sampling, from the sampler's k-diffusion update written as gains on n.

    At σ = ∞ the state is n and x̂0 = μ; elsewhere x̂0 − μ = β·(x − μ), β = s²/(s² + σ²).
    Deterministic samplers give x − μ = g·n (g tracked with the previous x̂0 gain for DPM++ 2M);
    Euler ancestral adds independent noise of variance σ_up² each step.
    """
    g, var, old_den, prev = 1.0, 1.0, 0.0, np.inf
    for sig, nxt in zip(sigmas[:-1], sigmas[1:]):
        if np.isinf(sig):
            g, var, old_den, prev = nxt, nxt**2, 0.0, sig
            continue
        beta = s2 / (s2 + sig**2)
        den, r = beta * g, nxt / sig
        if sampler == "euler":
            g = den + r * (g - den)
        elif sampler == "euler_a":  # k-diffusion's σ_up/σ_down with η = 1
            sigma_up = min(nxt, np.sqrt(nxt**2 * (sig**2 - nxt**2) / sig**2))
            sigma_down = np.sqrt(nxt**2 - sigma_up**2)
            var = (beta + sigma_down / sig * (1 - beta)) ** 2 * var + sigma_up**2
        else:  # DPM++ 2M: t = −log σ, h = t_next − t; first order after ∞ and into σ = 0
            h, den_d = (np.log(sig / nxt) if nxt > 0 else np.inf), den
            if nxt > 0 and np.isfinite(prev):
                c = 1 / (2 * (np.log(prev / sig) / h))  # 1/(2r), r = h_last/h
                den_d = (1 + c) * den - c * old_den
            g = r * g - np.expm1(-h) * den_d
        if sampler != "euler_a":
            var = g * g
        old_den, prev = den, sig
    return var


MESH = Mesh(np.array(jax.devices()[:8]), ("data",))
BATCH_SHARDED = NamedSharding(MESH, P("data"))


@pytest.fixture(scope="module")
def noise():
    """Unit noise, sharded over the batch on 8 devices: every toy run is a batch-sharded run."""
    n = np.random.default_rng(0).standard_normal((N,) + SHAPE).astype(np.float32)
    return jax.device_put(n, BATCH_SHARDED)


def _sampler_fn(denoise, sampler, **kw):
    """One jitted sampler; σ and the key are traced, so new σ or keys reuse the compile."""
    return jax.jit(lambda n, s, key: sample(denoise, n, s, sampler, rng=key, **kw))


def _run(denoise, noise, sigmas, sampler, **kw):
    return _sampler_fn(denoise, sampler, **kw)(noise, jnp.asarray(sigmas, jnp.float32),
                                               jax.random.key(1))


def _check_moments(x, sigmas, sampler, noise):
    x = np.asarray(x, np.float64)
    v_pred = np.vectorize(lambda s2: predicted_variance(sampler, sigmas, s2))(SD**2)
    mean, var = x.mean(0), x.var(0, ddof=1)
    assert np.all(np.abs(mean - MU) <= 5 * np.sqrt(v_pred / N)), (mean - MU) / SD
    stat = 5 * v_pred * np.sqrt(2 / (N - 1))
    assert np.all(np.abs(var - v_pred) <= stat), var / v_pred
    assert np.all(np.abs(var - SD**2) <= stat + np.abs(v_pred - SD**2)), var / SD**2
    if sampler != "euler_a":  # deterministic: x − μ = g·n element by element
        np.testing.assert_allclose(x - MU, np.sqrt(v_pred) * np.asarray(noise), atol=2e-4 * 14.6)
    return v_pred


@pytest.mark.parametrize("kind", ["trailing", "karras"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_toy_gaussian_from_infinite_noise(noise, sampler, kind):
    sigmas = jnp.asarray(sampling_sigmas(TABLE, 28, kind), jnp.float32)
    assert np.isinf(sigmas[0])
    fn = _sampler_fn(make_v_denoiser(exact_v_model, TABLE), sampler)
    x = fn(noise, sigmas, jax.random.key(1))
    assert x.dtype == jnp.float32 and x.sharding.is_equivalent_to(BATCH_SHARDED, x.ndim)
    _check_moments(x, np.asarray(sigmas, np.float64), sampler, noise)
    again = fn(noise, sigmas, jax.random.key(1))  # deterministic for a fixed key
    np.testing.assert_array_equal(np.asarray(again), np.asarray(x))
    if sampler == "euler_a":  # and the key really drives the ancestral noise
        assert float(jnp.abs(fn(noise, sigmas, jax.random.key(2)) - x).max()) > 0.1


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers_converge_to_data_distribution(noise, sampler):
    """With 200 Karras steps the discretisation error is small: mean/var close to μ, s².

    Uses the plain VE denoiser, so both denoiser forms are held to the same closed-form
    moments."""
    sigmas = sampling_sigmas(TABLE, 200, "karras")
    v_pred = _check_moments(_run(exact_ve_denoiser, noise, sigmas, sampler), sigmas, sampler, noise)
    assert np.all(np.abs(v_pred / SD**2 - 1) < 0.05)  # vs 11–25 % at 28 steps (Euler/Euler a)


def nonlinear_model(z, t, dtype=jnp.float32):
    """A fixed nonlinear stand-in for the UNet (v̂ depends on z and t)."""
    w = jnp.asarray(np.linspace(-1.0, 1.0, 16).reshape(4, 4), dtype)
    z, tt = z.astype(dtype), (t.astype(dtype) / 1000).reshape(-1, 1, 1, 1)
    return jnp.tanh(z @ w + tt) - 0.5 * z


def test_infinite_first_step_equals_euler_from_20000(noise):
    n = noise[:64]
    fn = _sampler_fn(make_v_denoiser(nonlinear_model, TABLE), "euler", return_trajectory=True)
    sigmas = sampling_sigmas(TABLE, 8, "trailing")
    standin = sigmas.copy()
    standin[0] = 20000.0
    _, traj_inf = fn(n, jnp.asarray(sigmas, jnp.float32), None)
    _, traj_fin = fn(n, jnp.asarray(standin, jnp.float32), None)
    flat_inf, flat_fin = (np.asarray(t).reshape(len(sigmas) - 1, -1) for t in (traj_inf, traj_fin))
    rel = np.linalg.norm(flat_inf - flat_fin, axis=1) / np.linalg.norm(flat_fin, axis=1)
    assert np.all(rel < 1e-3), rel
    # and the step itself is x̂0(n, t=999) + σ_1·n, with the model seeing n at t = 999
    v = nonlinear_model(n, jnp.full((64,), 999.0))
    np.testing.assert_allclose(traj_inf[0], -v + sigmas[1] * n, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_bf16_model_fp32_state_trajectory_is_finite(noise, sampler):
    denoise = make_v_denoiser(lambda z, t: nonlinear_model(z, t, jnp.bfloat16), TABLE)
    sigmas = sampling_sigmas(TABLE, 28, "trailing", 2048, 2048)
    x, traj = _run(denoise, noise[:256], sigmas, sampler, return_trajectory=True)
    assert traj.dtype == jnp.float32 and traj.shape == (28, 256) + SHAPE
    assert bool(jnp.all(jnp.isfinite(traj))) and bool(jnp.all(jnp.isfinite(x)))
    assert float(jnp.abs(traj[0]).max()) > 50.0  # σ_1 = 115.7 noise really is in the state


def _ctx_model(calls):
    def model_fn(x_in, t, ctx):
        calls.append(x_in.shape[0])
        return nonlinear_model(x_in, t) * ctx["scale"][:, None, None, None] + ctx["shift"]
    return model_fn


def test_cfg_single_2b_batch_and_rescale_identities(noise):
    calls = []
    model_fn = _ctx_model(calls)
    z, t = jnp.asarray(np.asarray(noise[:8])), jnp.full((8,), 500.0)  # eager ops: one device
    cond = {"scale": jnp.full((8,), 2.0), "shift": jnp.ones((8,) + SHAPE)}
    uncond = {"scale": jnp.full((8,), 0.5), "shift": jnp.zeros((8,) + SHAPE)}
    v_c, v_u = model_fn(z, t, cond), model_fn(z, t, uncond)
    calls.clear()
    plain = make_cfg_model(model_fn, cond, uncond, 5.0, 0.0)(z, t)
    assert calls == [16]  # cond and uncond ran as one batch of 2B
    np.testing.assert_allclose(plain, v_u + 5.0 * (v_c - v_u), rtol=1e-5, atol=1e-5)
    full = make_cfg_model(model_fn, cond, uncond, 5.0, 1.0)(z, t)
    np.testing.assert_allclose(jnp.std(full, axis=(1, 2, 3)), jnp.std(v_c, axis=(1, 2, 3)),
                               rtol=1e-5)
    half = make_cfg_model(model_fn, cond, uncond, 5.0, 0.5)(z, t)
    np.testing.assert_allclose(half, cfg_rescale(v_u, v_c, 5.0, 0.5), rtol=1e-6)
    # guidance scale 1 is the conditional model alone, at finite σ and at σ = ∞
    guided = make_v_denoiser(make_cfg_model(model_fn, cond, uncond, 1.0, 0.0), TABLE)
    alone = make_v_denoiser(lambda x, tt: model_fn(x, tt, cond), TABLE)
    for sigma in (0.5, 14.6, np.inf):
        np.testing.assert_allclose(guided(z, sigma), alone(z, sigma), rtol=1e-5, atol=1e-5)


def test_trailing_28_steps_ztsnr():
    s = sampling_sigmas(TABLE, 28, "trailing")
    assert s.shape == (29,) and np.isinf(s[0]) and s[-1] == 0.0
    finite = s[1:-1]
    assert np.all(np.isfinite(finite)) and len(np.unique(finite)) == 27 and np.all(np.diff(s) < 0)
    # t = round(arange(1000, 0, −1000/28)) − 1 = 999, 963, 928, 892, …, 70, 35
    np.testing.assert_allclose(finite[[0, 1, 2, -2, -1]], TABLE[[963, 928, 892, 70, 35]],
                               rtol=1e-12)
    np.testing.assert_allclose(s[1], 57.8674, rtol=1e-5)  # σ_963 (METHODS §3)


def test_resolution_aware_sigma_1():
    for kind, base in (("karras", 14.6), ("trailing", TABLE[963])):
        s1 = sampling_sigmas(TABLE, 28, kind, 1024, 1024)
        s2 = sampling_sigmas(TABLE, 28, kind, 2048, 2048)
        np.testing.assert_allclose(s1[1], base, rtol=1e-12)
        np.testing.assert_allclose(s2[1], 2 * base, rtol=1e-12)
        if kind == "trailing":  # anchored at σ_min: log(σ/σ_min) scales by one common factor
            stretch = np.log(s2[1:-1] / TABLE[0]) / np.log(s1[1:-1] / TABLE[0])
            expected = np.log(2 * base / TABLE[0]) / np.log(base / TABLE[0])
            np.testing.assert_allclose(stretch, expected, rtol=1e-9)
        else:  # ρ = 7 spacing down to the same σ_min
            np.testing.assert_allclose([s1[-2], s2[-2]], TABLE[0], rtol=1e-12)
        assert np.all(np.diff(s2) < 0) and np.isinf(s2[0])
        np.testing.assert_array_equal(sampling_sigmas(TABLE, 28, kind, 2048, 2048,
                                                      sigma_max_scaling=False), s1)
    np.testing.assert_allclose(sampling_sigmas(TABLE, 10, "karras", 768, 1344)[1],
                               14.6 * np.sqrt(768 * 1344) / 1024, rtol=1e-12)


def test_without_ztsnr_starts_at_finite_sigma_max():
    plain = make_schedule(ztsnr="off").sigmas
    for kind in ("trailing", "karras"):
        s = sampling_sigmas(plain, 28, kind, 2048, 2048, ztsnr=False)
        assert s.shape == (29,) and s[-1] == 0.0 and np.all(np.isfinite(s))
        np.testing.assert_allclose(s[0], 14.6146, rtol=1e-5)  # METHODS §1 check value
    with pytest.raises(ValueError, match="ending in \\+inf"):
        sampling_sigmas(plain, 28, ztsnr=True)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="sample.sampler"):
        sample(exact_ve_denoiser, jnp.zeros((1,) + SHAPE), sampling_sigmas(TABLE, 4), "heun")
    with pytest.raises(ValueError, match="rng"):
        sample(exact_ve_denoiser, jnp.zeros((1,) + SHAPE), sampling_sigmas(TABLE, 4), "euler_a")
    with pytest.raises(ValueError, match="sample.schedule"):
        sampling_sigmas(TABLE, 4, "linear")
    with pytest.raises(ValueError, match="too small"):
        sampling_sigmas(TABLE, 4, "karras", 1, 1)
