"""Outputs of the tiny VAE and text towers on fixed inputs, for "old weights, same outputs".

`python tests/old_outputs.py OUT.safetensors` wrote tests/golden/old_tiny_vae_text.safetensors
with the code before the model layer was rewritten (diffusers' Flax VAE, transformers' Flax CLIP:
commit fb19154, in that commit's environment); `python tests/old_outputs.py OUT.json.gz` wrote
tests/golden/clip_python_tokenizer_ids.json.gz there, the ids of transformers 4.57's Python
CLIPTokenizer (`fast=False`, gone from transformers 5) on tests/test_tokenizer_fast.py's texts. It uses only the public model API that both
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


def python_tokenizer_ids() -> dict:
    """Ids of the Python CLIPTokenizer (needs fb19154's code and transformers 4.x)."""
    import importlib.metadata
    import tempfile

    import test_tokenizer_fast as T
    from sdxl_jax.models import tokenizer as tk
    bpe = importlib.metadata.distribution("open_clip_torch").locate_file(
        "open_clip/bpe_simple_vocab_16e6.txt.gz")
    files = tk.write_clip_vocab(str(bpe), tempfile.mkdtemp())
    tok_l, tok_g = tk.tokenizers_from_files(*files, fast=False)
    tiny_l, tiny_g = tk.get_tokenizers("tiny", fast=False)
    caps = T.captions()

    def ids(tok, texts):
        return tok(texts, add_special_tokens=False, verbose=False)["input_ids"]

    return {"captions_l": ids(tok_l, caps), "captions_g": ids(tok_g, caps),
            "code_points": ids(tok_g, T.code_point_texts()),
            "tiny_l": ids(tiny_l, caps[:80]), "tiny_g": ids(tiny_g, caps[:80]),
            "chunked_l": tk.tokenize(tok_l, caps[:T.CHUNKED], 3).tolist(),
            "chunked_g": tk.tokenize(tok_g, caps[:T.CHUNKED], 3).tolist()}


if __name__ == "__main__":
    if sys.argv[1].endswith(".json.gz"):
        import gzip
        import json
        with gzip.open(sys.argv[1], "wt", encoding="utf-8") as f:
            json.dump(python_tokenizer_ids(), f, separators=(",", ":"))
    else:
        from safetensors.numpy import save_file
        save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in outputs().items()},
                  sys.argv[1])
