"""sdxl_jax.models on the tiny preset: tokenizer chunking, text/VAE/UNet wrappers, init, patches."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdxl_jax import models as M

MAX_CHUNKS = 2


@pytest.fixture(scope="module")
def toks():
    return M.get_tokenizers("tiny")


def _ids(tok, *words):
    return tok.convert_tokens_to_ids([w + "</w>" for w in words])


# ---- tokenizer -----------------------------------------------------------------------------

def test_tiny_vocab_matches_configs_and_sdxl_special_ids(toks):
    tok_l, tok_g = toks
    vocab = M.text_l_config("tiny")["vocab_size"]
    assert len(tok_l) == len(tok_g) == vocab == M.text_g_config("tiny")["vocab_size"]
    # EOS is the highest id (CLIP's argmax pooling), BOS the one below, as in CLIP's vocab
    assert tok_l.eos_token_id == tok_g.eos_token_id == vocab - 1
    assert tok_l.bos_token_id == vocab - 2
    assert tok_l.pad_token_id == vocab - 1  # CLIP-L pads with EOS
    assert tok_g.pad_token_id == 0 and tok_g.pad_token == "!"  # bigG pads with "!"
    for word in ("completely", "black", "white", "background", "circles", "girl", "red"):
        assert tok_l.tokenize(word) == [word + "</w>"]
    assert tok_l.tokenize("1girl, 2 circles") == ["1</w>", "girl</w>", ",</w>", "2</w>",
                                                  "circles</w>"]


def test_tokenize_short_caption_layout(toks):
    tok_l, tok_g = toks
    red, circle = _ids(tok_l, "red", "circle")
    bos, eos = tok_l.bos_token_id, tok_l.eos_token_id
    for tok, pad in ((tok_l, eos), (tok_g, 0)):
        ids = M.tokenize(tok, ["red circle", ""], MAX_CHUNKS)
        assert ids.shape == (2, 154) and ids.dtype == np.int32
        np.testing.assert_array_equal(ids[0, :4], [bos, red, circle, eos])
        assert (ids[0, 4:77] == pad).all()
        empty_chunk = np.array([bos, eos] + [pad] * 75)
        np.testing.assert_array_equal(ids[0, 77:], empty_chunk)  # unused chunk = empty caption
        np.testing.assert_array_equal(ids[1, :77], empty_chunk)
        np.testing.assert_array_equal(ids[1, 77:], empty_chunk)


def test_tokenize_long_caption_chunks_and_truncation(toks):
    _, tok_g = toks
    digits = [str(i % 10) for i in range(80)]  # each digit is one token
    caption = " ".join(digits)
    want = _ids(tok_g, *digits)
    bos, eos = tok_g.bos_token_id, tok_g.eos_token_id
    ids = M.tokenize(tok_g, [caption], 3)[0].reshape(3, 77)
    np.testing.assert_array_equal(ids[0], [bos] + want[:75] + [eos])
    np.testing.assert_array_equal(ids[1, :7], [bos] + want[75:80] + [eos])
    assert (ids[1, 7:] == 0).all()
    np.testing.assert_array_equal(ids[2], [bos, eos] + [0] * 75)
    truncated = M.tokenize(tok_g, [caption], 1)
    assert truncated.shape == (1, 77)
    np.testing.assert_array_equal(truncated[0], ids[0])


def test_tokenize_bad_input(toks):
    tok_l, _ = toks
    assert M.tokenize(tok_l, [], 2).shape == (0, 154)
    with pytest.raises(ValueError, match="max_chunks"):
        M.tokenize(tok_l, ["x"], 0)
    with pytest.raises(TypeError, match="list of captions"):
        M.tokenize(tok_l, "a caption", 1)


# ---- parameters ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_params():
    return M.init_params("text_l", "tiny", 0), M.init_params("text_g", "tiny", 1)


@pytest.mark.parametrize("name", M.MODEL_NAMES)
def test_init_params_match_abstract_and_rules(name):
    abstract = M.abstract_params(name, "tiny")
    params = M.init_params(name, "tiny", jax.random.key(3))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(abstract)
    for (path, p), a in zip(jax.tree_util.tree_leaves_with_path(params),
                            jax.tree_util.tree_leaves(abstract)):
        assert p.shape == a.shape and p.dtype == a.dtype == jnp.float32, path
        leaf, v = path[-1].key, np.asarray(p)
        if leaf == "bias":
            assert (v == 0).all()
        elif leaf == "scale":
            assert (v == 1).all()
        elif leaf == "kernel" and path[0].key != "conv_out" and v.size >= 4096:
            want = 1 / math.sqrt(np.prod(v.shape[:-1]))
            assert abs(v.std() / want - 1) < 0.1, path
            assert abs(v.mean()) < 0.1 * want, path
        elif leaf == "embedding":
            assert abs(v.std() / 0.02 - 1) < 0.1, path


def test_init_params_seeding_given_params_and_sharding():
    a = M.init_params("text_l", "tiny", 0)
    b = M.init_params("text_l", "tiny", jax.random.key(0))
    c = M.init_params("text_l", "tiny", 1)
    emb = lambda p: np.asarray(p["text_model"]["embeddings"]["token_embedding"]["embedding"])
    np.testing.assert_array_equal(emb(a), M.init_params("text_l", "tiny", 0)
                                  ["text_model"]["embeddings"]["token_embedding"]["embedding"])
    assert not np.array_equal(emb(a), emb(c))
    # a key seeds by its words: a typed key and the raw key of the same seed give the same
    # values, and they are not the int seed's (words [0, 0], not [0])
    np.testing.assert_array_equal(emb(b), emb(M.init_params("text_l", "tiny", jax.random.PRNGKey(0))))
    assert not np.array_equal(emb(b), emb(a))
    # given params: checked against the model and placed, values kept
    device = jax.devices()[-1]
    given = jax.tree_util.tree_map(lambda x: np.asarray(x) + 1, a)
    placed = M.init_params("text_l", "tiny", 0, params=given,
                           out_shardings=jax.sharding.SingleDeviceSharding(device))
    np.testing.assert_array_equal(emb(placed), emb(a) + 1)
    assert all(x.devices() == {device} for x in jax.tree_util.tree_leaves(placed))
    bad = dict(given, text_model=dict(given["text_model"], extra={"kernel": np.zeros(2)}))
    with pytest.raises(ValueError, match="unexpected .*text_model/extra/kernel"):
        M.init_params("text_l", "tiny", 0, params=bad)


def test_unet_conv_out_is_zero_initialised():
    params = M.init_params("unet", "tiny", 0)
    assert (np.asarray(params["conv_out"]["kernel"]) == 0).all()
    assert np.asarray(params["conv_in"]["kernel"]).std() > 0


def test_sdxl_unet_parameter_count():
    # real SDXL base 1.0 UNet: 2,567,463,684 parameters (eval_shape only, nothing allocated)
    assert M.count_params(M.abstract_params("unet", "sdxl")) == 2_567_463_684


# ---- text encoding -------------------------------------------------------------------------

def test_encode_text_chunks_and_pooled(toks, text_params):
    tok_l, tok_g = toks
    text_l, text_g = M.build_text_encoders("tiny", "float32")
    head = " ".join(str(i % 10) for i in range(75))  # exactly fills chunk 1
    captions = [head + " red circle", head + " blue square", "red circle", ""]
    ids_l = M.tokenize(tok_l, captions, MAX_CHUNKS)
    ids_g = M.tokenize(tok_g, captions, MAX_CHUNKS)
    encode = jax.jit(functools.partial(M.encode_text, text_l, text_g, max_chunks=MAX_CHUNKS))
    context, pooled = encode(*text_params, ids_l, ids_g)
    hidden = M.text_l_config("tiny")["hidden_size"] + M.text_g_config("tiny")["hidden_size"]
    assert context.shape == (4, 154, hidden) and context.dtype == jnp.float32
    assert pooled.shape == (4, M.text_g_config("tiny")["projection_dim"])
    context, pooled = np.asarray(context), np.asarray(pooled)
    # chunk 2's content does not reach chunk 1's features nor the pooled embedding
    np.testing.assert_array_equal(context[0, :77], context[1, :77])
    np.testing.assert_array_equal(pooled[0], pooled[1])
    assert np.abs(context[0, 77:] - context[1, 77:]).max() > 1e-3
    assert np.abs(pooled[0] - pooled[2]).max() > 1e-3  # first chunk differs → pooled differs
    # a short caption's unused chunk encodes exactly like an empty caption
    np.testing.assert_allclose(context[2, 77:], context[3, :77], atol=1e-6)

    # independent reference: penultimate states and the projected EOS state of chunk 1
    @jax.jit
    def reference(ids_l, ids_g):
        pos = jnp.broadcast_to(jnp.arange(77), ids_l.shape)
        out_l = text_l.apply({"params": text_params[0]}, ids_l, jnp.ones_like(ids_l), pos)
        out_g = text_g.apply({"params": text_params[1]}, ids_g, jnp.ones_like(ids_g), pos)
        return (out_l.hidden_states[-2], out_l.last_hidden_state, out_g.hidden_states[-2],
                out_g.text_embeds)

    pen_l, last_l, pen_g, proj_g = reference(ids_l[:, :77], ids_g[:, :77])
    np.testing.assert_allclose(context[:, :77, :32], pen_l, atol=1e-5)
    np.testing.assert_allclose(context[:, :77, 32:], pen_g, atol=1e-5)
    assert np.abs(context[:, :77, :32] - np.asarray(last_l)).max() > 1e-2
    np.testing.assert_allclose(pooled, proj_g, atol=1e-5)


# ---- VAE and UNet --------------------------------------------------------------------------

def test_vae_encode_decode_shapes():
    vae = M.build_vae("tiny", "bfloat16")
    params = M.init_params("vae", "tiny", 0)
    images = jax.random.uniform(jax.random.key(0), (2, 32, 48, 3), minval=-1, maxval=1)
    mean, std = jax.jit(M.vae_encode, static_argnums=0)(vae, params, images)
    assert mean.shape == std.shape == (2, 4, 6, 4)
    assert mean.dtype == std.dtype == jnp.float32
    assert bool(jnp.all(std > 0)) and bool(jnp.all(jnp.isfinite(mean)))
    decoded = jax.jit(M.vae_decode, static_argnums=0)(vae, params, mean)
    assert decoded.shape == (2, 32, 48, 3) and decoded.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(decoded))) and float(jnp.std(decoded)) > 0


def test_unet_apply_shape_dtype_and_conditioning():
    unet = M.build_unet("tiny", "bfloat16")
    params = M.init_params("unet", "tiny", 0)
    params["conv_out"]["kernel"] = jnp.full_like(params["conv_out"]["kernel"], 0.05)
    cfg = M.unet_config("tiny")
    b = 2
    z = jax.random.normal(jax.random.key(1), (b, 16, 16, 4))
    context = jax.random.normal(jax.random.key(2), (b, 77, cfg["cross_attention_dim"]))
    pooled = jax.random.normal(jax.random.key(3), (b, M.text_g_config("tiny")["projection_dim"]))
    time_ids = jnp.array([[256.0, 256, 0, 0, 256, 256]] * b)
    apply = jax.jit(M.unet_apply, static_argnums=0)
    out = apply(unet, params, z, jnp.array([10, 900]), context, pooled, time_ids)
    assert out.shape == (b, 16, 16, 4) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))
    # the timestep reaches the output (sample 0 vs 1 differ only by t here)
    same = apply(unet, params, z[:1].repeat(2, 0), jnp.array([10, 900]), context[:1].repeat(2, 0),
                 pooled[:1].repeat(2, 0), time_ids)
    assert float(jnp.abs(same[0] - same[1]).max()) > 1e-3


# ---- PyTorch-parity details of the UNet's transformer ------------------------------------------

def test_geglu_uses_exact_erf_gelu():
    from sdxl_jax.models.transformer import GEGLU
    module = GEGLU(inner_dim=16)
    x = 2.0 * np.random.default_rng(0).standard_normal((1, 3, 4)).astype(np.float32)
    params = module.init(jax.random.key(0), x)
    out = np.asarray(module.apply(params, x), np.float64)
    w = np.asarray(params["params"]["proj"]["kernel"], np.float64)
    bias = np.asarray(params["params"]["proj"]["bias"], np.float64)
    h = x.astype(np.float64) @ w + bias
    lin, gate = h[..., :16], h[..., 16:]
    erf = np.vectorize(math.erf)
    np.testing.assert_allclose(out, lin * 0.5 * gate * (1 + erf(gate / math.sqrt(2))),
                               rtol=1e-5, atol=1e-6)
    tanh_gelu = 0.5 * gate * (1 + np.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3)))
    assert np.abs(out - lin * tanh_gelu).max() > 1e-5  # flax's default tanh form is distinguishable


def test_transformer_groupnorm_eps_is_pytorch():
    from sdxl_jax.models.transformer import Transformer2D
    module = Transformer2D(channels=32, heads=1, norm_num_groups=32)
    # 32 channels → 32 groups of one channel; each channel is ±1e-3 over the 2×2 pixels, so
    # its variance 1e-6 is comparable to eps: 1e-6 gives ±0.707, the resnets' 1e-5 gives ±0.30.
    # The norm's output is read back from the module's intermediates.
    x = (1e-3 * np.array([1, -1, -1, 1], np.float32)[:, None] * np.ones(32, np.float32))
    x = x.reshape(1, 2, 2, 32)
    context = np.zeros((1, 1, 32), np.float32)
    params = module.init(jax.random.key(0), x, context)
    _, state = module.apply(params, x, context, capture_intermediates=lambda m, _: m.name == "norm",
                            mutable=["intermediates"])
    normed = np.asarray(state["intermediates"]["norm"]["__call__"][0]).reshape(4, 32)
    pixels = x.reshape(4, 32).astype(np.float64)
    want = (pixels - pixels.mean(0)) / np.sqrt(pixels.var(0) + 1e-6)
    np.testing.assert_allclose(normed, want, rtol=1e-4)
    np.testing.assert_allclose(np.abs(normed), math.sqrt(0.5), rtol=1e-4)


def test_tiny_unet_first_level_keeps_channel_means_through_its_group_norms():
    """The tiny preset keeps SDXL's GroupNorm(32). At 32 channels that is a per-channel
    instance norm, which removes each channel's spatial mean: a flat colour, and the time /
    pooled-text embedding that resnets add before norm2, never reach conv_out (the tiny demo
    sampled speckled textures instead of flat fields). The tiny preset's first level, which
    feeds the output norm, has ≥ 2 channels per group, so per-channel offsets survive."""
    import flax.linen as nn
    from sdxl_jax.models import presets
    cfg = presets.unet_config("tiny")
    channels, groups = cfg["block_out_channels"][0], cfg["norm_num_groups"]
    assert channels % groups == 0 and channels // groups >= 2
    norm = nn.GroupNorm(num_groups=groups, epsilon=cfg["norm_eps"])
    key = jax.random.PRNGKey(0)
    offset = jnp.tile(jnp.asarray([1.0, -1.0]), channels // 2)  # differs inside every group
    x = jax.random.normal(key, (1, 8, 8, channels))
    params = norm.init(key, x)
    assert float(jnp.abs(norm.apply(params, x + offset) - norm.apply(params, x)).max()) > 0.5
    x32 = x[..., :32]  # the same offset at 32 channels: erased
    p32 = norm.init(key, x32)
    np.testing.assert_allclose(norm.apply(p32, x32 + offset[:32]), norm.apply(p32, x32), atol=1e-5)
