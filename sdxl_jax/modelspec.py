"""The header metadata every exported file carries (Stability AI's modelspec 1.0 keys plus the
run facts sdxl_jax's readers use): what the model is (SDXL, v-prediction, zero terminal SNR,
its latent normalisation), so other tools sample it right. A module of its own because both
the full-model exports (export.py) and the adapter files (adapters/formats.py) write it, and
the adapters sit below export in the import graph."""
from __future__ import annotations

import datetime
import json


def modelspec_metadata(preset: str, meta: dict) -> dict:
    """{header key: string} from `meta` (export.export_meta's keys: title, resolution, ztsnr,
    latent_normalization, scaling_factor, step, latents_mean / latents_std)."""
    md = {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ("stable-diffusion-xl-v1-base" if preset == "sdxl"
                                   else f"stable-diffusion-xl-v1-base/sdxl_jax-{preset}"),
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": meta.get("title", "sdxl_jax export"),
        "modelspec.resolution": meta.get("resolution", "1024x1024" if preset == "sdxl" else
                                         "256x256"),
        "modelspec.prediction_type": "v",
        "modelspec.date": datetime.date.today().isoformat(),
        "modelspec.description": ("SDXL trained with sdxl_jax: v-prediction"
                                  + (", zero terminal SNR" if meta.get("ztsnr", True) else "")),
        "sdxl_jax.ztsnr": json.dumps(bool(meta.get("ztsnr", True))),
        "sdxl_jax.latent_normalization": meta.get("latent_normalization", "scale"),
        "sdxl_jax.scaling_factor": json.dumps(meta.get("scaling_factor", 0.13025)),
    }
    if "step" in meta:
        md["sdxl_jax.step"] = str(meta["step"])
    if meta.get("latent_normalization") == "per_channel":
        md["sdxl_jax.latents_mean"] = json.dumps(meta["latents_mean"])
        md["sdxl_jax.latents_std"] = json.dumps(meta["latents_std"])
    return md
