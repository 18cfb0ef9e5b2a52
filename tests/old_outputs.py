"""Outputs of the tiny VAE and text towers on fixed inputs, for "old weights, same outputs".

`python tests/old_outputs.py OUT.safetensors` wrote tests/golden/old_tiny_vae_text.safetensors
with the code before the model layer was rewritten (diffusers' Flax VAE, transformers' Flax CLIP:
commit fb19154, in that commit's environment). It uses only the public model API that both
versions share (build_*, init_params, vae_encode / vae_decode, encode_text, tokenizers), so the
same function computes today's outputs in tests/test_model_trees.py. The parameters are not
stored: `perturbed_params` regenerates them (numpy only, seeded by path) with non-trivial
biases and norm scales, so every parameter kind reaches the outputs.
"""
import sys
import zlib

import numpy as np

PRESET = "tiny"
CAPTIONS = ["a red circle on a blue background", "two small white squares, dark gray"]


def perturbed_params(name: str):
    """init_params(name, tiny, 0) with every bias and norm scale moved by N(0, 0.1²)."""
    import jax
    from sdxl_jax import models

    def move(path, leaf):
        if path[-1].key not in ("bias", "scale"):
            return leaf
        key = "/".join(p.key for p in path)
        noise = np.random.default_rng(zlib.crc32(key.encode())).standard_normal(leaf.shape)
        return leaf + np.float32(0.1) * noise.astype(np.float32)

    return jax.tree_util.tree_map_with_path(move, models.init_params(name, PRESET, 0))


def outputs() -> dict:
    """{name: float32 array} of the inputs and outputs."""
    from sdxl_jax import models
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    latents = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    vae = models.build_vae(PRESET, "float32")
    vae_params = perturbed_params("vae")
    mean, std = models.vae_encode(vae, vae_params, images)
    decoded = models.vae_decode(vae, vae_params, latents)
    tok_l, tok_g = models.get_tokenizers(PRESET)
    ids_l, ids_g = models.tokenize(tok_l, CAPTIONS, 2), models.tokenize(tok_g, CAPTIONS, 2)
    text_l, text_g = models.build_text_encoders(PRESET, "float32")
    context, pooled = models.encode_text(text_l, text_g, perturbed_params("text_l"),
                                         perturbed_params("text_g"), ids_l, ids_g, 2)
    return {"images": images, "latents": latents, "mean": mean, "std": std, "decoded": decoded,
            "ids_l": ids_l, "ids_g": ids_g, "context": context, "pooled": pooled}


if __name__ == "__main__":
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in outputs().items()}, sys.argv[1])
