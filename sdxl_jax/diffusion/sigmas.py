"""σ ↔ t over the discrete table, sampling schedules and resolution-aware σ_max (METHODS §4, §5).

The σ table is a host constant (numpy); σ values may be traced. Under ZTSNR the table ends in
+inf: every σ at or above the last finite entry (σ_998) maps to the terminal index T−1.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

SDXL_SIGMA_MAX = 14.6  # σ_999 of the unrescaled SDXL schedule, rounded as in the report
SDXL_BASE_SIDE = 1024


def _finite_log_table(sigmas_table):
    table = np.asarray(sigmas_table, np.float64)
    n = int(np.isfinite(table).sum())
    if not np.all(np.isfinite(table[:n])) or n < 2:
        raise ValueError("σ table must be finite except for a trailing +inf")
    return table, n, np.log(table[:n])


def sigma_to_t(sigma, sigmas_table):
    """Continuous timestep for σ by linear interpolation of log σ over the table."""
    table, n, log_tab = _finite_log_table(sigmas_table)
    sigma = jnp.asarray(sigma, jnp.float32)
    log_sigma = jnp.log(jnp.clip(sigma, table[0], None))
    t = jnp.interp(log_sigma, jnp.asarray(log_tab, jnp.float32), jnp.arange(n, dtype=jnp.float32))
    if n < table.shape[0]:  # ZTSNR: above σ_{n−1} lies only the infinite terminal step
        t = jnp.where(sigma >= table[n - 1], float(table.shape[0] - 1), t)
    return t


def t_to_sigma(t, sigmas_table):
    """σ for a (possibly fractional) timestep by log-linear interpolation; +inf past the table."""
    table, n, log_tab = _finite_log_table(sigmas_table)
    t = jnp.asarray(t, jnp.float32)
    sigma = jnp.exp(jnp.interp(t, jnp.arange(n, dtype=jnp.float32), jnp.asarray(log_tab, jnp.float32)))
    if n < table.shape[0]:
        sigma = jnp.where(t > n - 1, jnp.inf, sigma)
    return sigma


def karras_sigmas(num: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 ρ-spaced σ from σ_max down to σ_min (num values, no trailing 0)."""
    ramp = np.linspace(0.0, 1.0, num)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def trailing_timesteps(num: int, num_train_steps: int = 1000) -> np.ndarray:
    """"Trailing" spacing: t = round(arange(T, 0, −T/N)) − 1; starts at T−1."""
    return (np.round(np.arange(num_train_steps, 0, -num_train_steps / num)) - 1).astype(np.int64)


def trailing_sigmas(num: int, sigmas_table) -> np.ndarray:
    table = np.asarray(sigmas_table, np.float64)
    return table[trailing_timesteps(num, table.shape[0])]


def sigma_max_for_resolution(height: int, width: int, base_sigma: float = SDXL_SIGMA_MAX,
                             base_side: int = SDXL_BASE_SIDE) -> float:
    """σ_max(H, W) = 14.6·√(H·W)/1024 in pixel units: 1024² → 14.6, 2048² → 29.2."""
    return float(base_sigma * np.sqrt(float(height) * float(width)) / base_side)
