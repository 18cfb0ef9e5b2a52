"""Weights of the UNet before the model layer was rewritten give the same outputs in today's modules.

tests/golden/old_tiny_unet.safetensors holds inputs and outputs of the tiny UNet computed by the
code of commit fb19154 (diffusers 0.39's Flax UNet, in that commit's environment), written by
`python tests/test_unet_old_outputs.py OUT.safetensors` there: `outputs` uses only the public
API both versions share (build_unet, init_params, unet_apply). The parameters are not stored:
`old_outputs.perturbed_params` regenerates them (numpy, seeded by path; non-trivial biases and
norm scales) and `_params` gives conv_out, zero-initialised by init_params, random values. With
the parameter tree identical (tests/test_model_trees.py), this is what restoring an old tiny
checkpoint into the new modules gives.
"""
import sys
import zlib

import numpy as np

from old_outputs import perturbed_params

GOLDEN = "tests/golden/old_tiny_unet.safetensors"
# (name, latent height, width): a square and a non-square bucket; t = 0, 500, 999 per batch row
SHAPES = (("square", 16, 16), ("wide", 16, 24))
TIMESTEPS = (0.0, 500.0, 999.0)


def _params():
    import jax.numpy as jnp
    params = perturbed_params("unet")
    shape = params["conv_out"]["kernel"].shape
    rng = np.random.default_rng(zlib.crc32(b"conv_out/kernel"))
    params["conv_out"]["kernel"] = jnp.asarray(0.05 * rng.standard_normal(shape).astype(np.float32))
    return params


def outputs() -> dict:
    """{name: float32 array}: the inputs and the UNet's outputs for each bucket shape."""
    import jax
    from sdxl_jax import models
    cfg = models.unet_config("tiny")
    pooled_dim = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    unet, params = models.build_unet("tiny", "float32"), _params()
    apply = jax.jit(lambda p, *a: models.unet_apply(unet, p, *a))
    rng = np.random.default_rng(30)
    out = {}
    for name, h, w in SHAPES:
        b = len(TIMESTEPS)
        x = dict(z=rng.standard_normal((b, h, w, 4)).astype(np.float32),
                 t=np.array(TIMESTEPS, np.float32),
                 context=rng.standard_normal((b, 77, cfg["cross_attention_dim"])).astype(np.float32),
                 pooled=rng.standard_normal((b, pooled_dim)).astype(np.float32),
                 time_ids=np.tile(np.array([[8 * h, 8 * w, 0, 0, 8 * h, 8 * w]], np.float32), (b, 1)))
        x["out"] = np.asarray(apply(params, *x.values()))
        out.update({f"{name}.{k}": v for k, v in x.items()})
    return out


def test_old_tiny_unet_outputs_are_reproduced():
    from safetensors.numpy import load_file
    want = load_file(GOLDEN)
    got = outputs()
    for name, *_ in SHAPES:
        for k in ("z", "t", "context", "pooled", "time_ids"):  # the same inputs were drawn
            np.testing.assert_array_equal(got[f"{name}.{k}"], want[f"{name}.{k}"])
        ref = want[f"{name}.out"]
        scale = float(np.abs(ref).max())
        assert scale > 0.1, f"{name}: a degenerate reference output ({scale})"
        err = float(np.abs(got[f"{name}.out"] - ref).max())
        assert err <= 1e-5 * scale, f"{name}: max |Δ| {err:.3g} vs output scale {scale:.3g}"


if __name__ == "__main__":
    from safetensors.numpy import save_file
    save_file(outputs(), sys.argv[1])
