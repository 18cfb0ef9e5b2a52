"""The model layer keeps the parameter trees and outputs of the diffusers / transformers Flax
modules it replaced, so checkpoints, converters and adapter files written before still apply.

tests/golden/model_trees.json holds every leaf (path → shape, dtype) of the four models at the
sdxl, tiny and micro presets, taken with `jax.eval_shape` from the old modules;
tests/golden/old_tiny_vae_text.safetensors the old tiny VAE's and text towers' outputs on fixed
inputs (tests/old_outputs.py wrote it with that code).
"""
import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from sdxl_jax.models import build
from sdxl_jax.models.tokenizer import SEQ_LEN

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


def _golden_trees():
    with open(os.path.join(GOLDEN, "model_trees.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("preset", ["sdxl", "tiny", "micro"])
@pytest.mark.parametrize("name", build.MODEL_NAMES)
def test_parameter_tree_equals_golden(name, preset):
    want = _golden_trees()[preset][name]
    got = {"/".join(build._path_names(path)): [list(leaf.shape), str(leaf.dtype)]
           for path, leaf in jax.tree_util.tree_flatten_with_path(
               build.abstract_params(name, preset))[0]}
    assert sorted(set(want) - set(got)) == [], "leaves missing"
    assert sorted(set(got) - set(want)) == [], "leaves not in the golden tree"
    assert {k: v for k, v in got.items() if want[k] != v} == {}, "shape or dtype differs"


def test_text_hidden_states_are_embeddings_then_every_layer():
    from sdxl_jax.models import presets
    text_l, _ = build.build_text_encoders("tiny", "float32")
    params = build.init_params("text_l", "tiny", 0)
    ids = np.arange(2 * SEQ_LEN, dtype=np.int32).reshape(2, SEQ_LEN) % 900
    out = text_l.apply({"params": params}, ids)
    assert len(out.hidden_states) == presets.text_l_config("tiny")["num_hidden_layers"] + 1
    assert out.text_embeds is None and out.last_hidden_state.shape == (2, SEQ_LEN, 32)
    emb = params["text_model"]["embeddings"]
    np.testing.assert_allclose(out.hidden_states[0], emb["token_embedding"]["embedding"][ids]
                               + emb["position_embedding"]["embedding"][None, :SEQ_LEN], rtol=1e-6)
    # legacy eos_token_id 2: the pooled state is the one at the highest id of each row
    rows = np.arange(2)
    np.testing.assert_array_equal(out.pooler_output,
                                  out.last_hidden_state[rows, ids.argmax(-1)])


def test_old_tiny_weights_give_the_old_outputs():
    import old_outputs
    want = load_file(os.path.join(GOLDEN, "old_tiny_vae_text.safetensors"))
    got = old_outputs.outputs()
    for key in ("images", "latents", "ids_l", "ids_g"):  # same inputs, same tokenizers
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    for key in ("mean", "std", "decoded", "context", "pooled"):
        scale = float(np.abs(want[key]).max())
        err = float(np.abs(np.asarray(got[key], np.float64) - want[key]).max())
        assert err <= 1e-5 * scale, f"{key}: max |Δ| {err:.3g} vs max |old| {scale:.3g}"
