"""The VAE never computes in float16 (it overflows there): model.dtype="float16" gives a bfloat16
VAE in every builder, and a decode whose activations exceed 65504 stays finite and correct."""
import jax
import jax.numpy as jnp
import numpy as np

from sdxl_jax import models
from sdxl_jax.models import build, presets
from sdxl_jax.models.autoencoder import autoencoder


def test_vae_dtype_rule():
    assert build.vae_dtype("float16") == jnp.bfloat16
    assert build.vae_dtype(jnp.float16) == jnp.bfloat16
    assert build.vae_dtype("bfloat16") == jnp.bfloat16
    assert build.vae_dtype("float32") == jnp.float32
    assert models.build_vae("tiny", "float16").dtype == jnp.bfloat16


def test_decode_that_overflows_float16_is_finite_through_the_project_path():
    params = models.init_params("vae", "tiny", 0)
    # latents of std 2·10⁴: representable in fp16, but the decoder's first convolution sums them
    # to ~8·10⁴ (> 65504, fp16's largest value), as the SDXL VAE's decoder does in real decodes
    z = 2e4 * jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
    fp16_module = autoencoder(presets.vae_config("tiny"), jnp.float16)

    def raw_fp16(p, z):  # the module as built, in float16
        return fp16_module.apply({"params": p}, z.astype(jnp.float16), method="decode")

    @jax.jit
    def decodes(p, z):
        return (raw_fp16(p, z),
                models.vae_decode(models.build_vae("tiny", "float16"), p, z),  # model.dtype=float16
                models.vae_decode(fp16_module, p, z),  # a module built in fp16 elsewhere
                models.vae_decode(models.build_vae("tiny", "float32"), p, z))
    overflowed, ours, given_fp16, want = decodes(params, z)
    assert not bool(jnp.isfinite(overflowed).all())
    scale = float(jnp.max(jnp.abs(want)))
    assert np.isfinite(scale) and scale > 0.1
    for got in (ours, given_fp16):
        assert got.dtype == jnp.float32 and bool(jnp.isfinite(got).all())
        # bf16 compute: within a few bf16 roundings (2⁻⁸) of the float32 decode
        assert float(jnp.max(jnp.abs(got - want))) <= 2e-2 * scale
