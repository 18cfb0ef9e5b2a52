"""The discrete SDXL noise schedule and its Zero-Terminal-SNR rescale (METHODS §1, §3).

Tables are built once on the host in float64: near ᾱ → 0 the ZTSNR rescale subtracts nearly
equal numbers, and a float32 cumprod would move σ_998 by ~1e-4 relative. Everything after
this (noising, loss, samplers) consumes the tables as ordinary float32 arrays.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

ZTSNR_MODES = ("rescale", "off")
SIGMA_INF_STANDIN = 20000.0  # the report's finite stand-in for σ = ∞ (METHODS §3)


class Schedule(NamedTuple):
    """Per-timestep tables, index t = 0 … T−1 (float64 numpy)."""

    betas: np.ndarray
    alphas_cumprod: np.ndarray  # ᾱ_t
    sigmas: np.ndarray  # σ_t = √((1−ᾱ)/ᾱ); +inf where ᾱ_t = 0

    @property
    def num_steps(self) -> int:
        return int(self.betas.shape[0])


def scaled_linear_betas(num_steps: int = 1000, beta_start: float = 0.00085,
                        beta_end: float = 0.012) -> np.ndarray:
    """SDXL's "scaled linear" betas: linspace(√β_start, √β_end, T)²."""
    return np.linspace(np.sqrt(beta_start), np.sqrt(beta_end), num_steps, dtype=np.float64) ** 2


def alphas_cumprod_from_betas(betas: np.ndarray) -> np.ndarray:
    return np.cumprod(1.0 - np.asarray(betas, np.float64))


def ztsnr_rescale_betas(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Alg. 1: shift and scale √ᾱ so √ᾱ_T = 0 while √ᾱ_0 is unchanged."""
    r = np.sqrt(alphas_cumprod_from_betas(betas))
    r0, r_t = r[0], r[-1]
    r = (r - r_t) * r0 / (r0 - r_t)
    ac = r**2
    alphas = np.concatenate([ac[:1], ac[1:] / ac[:-1]])
    return 1.0 - alphas


def sigmas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    ac = np.asarray(alphas_cumprod, np.float64)
    with np.errstate(divide="ignore"):
        return np.where(ac > 0, np.sqrt((1.0 - ac) / np.where(ac > 0, ac, 1.0)), np.inf)


def make_schedule(num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                  ztsnr: str = "rescale") -> Schedule:
    """The training schedule. `ztsnr="rescale"` gives ᾱ_{T−1} == 0 exactly (σ = ∞)."""
    if ztsnr not in ZTSNR_MODES:
        raise ValueError(f"schedule.ztsnr must be one of {ZTSNR_MODES}, got {ztsnr!r}")
    betas = scaled_linear_betas(num_steps, beta_start, beta_end)
    if ztsnr == "rescale":
        betas = ztsnr_rescale_betas(betas)
    ac = alphas_cumprod_from_betas(betas)
    if ztsnr == "rescale":
        ac[-1] = 0.0  # exact: the rescale makes it 0 up to rounding of a product; pin it
    return Schedule(betas=betas, alphas_cumprod=ac, sigmas=sigmas_from_alphas_cumprod(ac))


def schedule_from_config(cfg) -> Schedule:
    """Build from a `schedule` ConfigDict (num_train_timesteps, beta_start, beta_end, ztsnr)."""
    return make_schedule(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.ztsnr)
