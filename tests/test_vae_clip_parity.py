"""The VAE and both CLIP text towers against the PyTorch models of diffusers / transformers.

The same random (perturbed) weights of diffusers' AutoencoderKL and transformers'
CLIPTextModel / CLIPTextModelWithProjection are moved into our modules by our own converter
(`convert.torch_leaves`, `torch_to_flax`: what loading a diffusers folder uses), for the tiny
preset and a mid-size config with SDXL's structure at reduced width (VAE: 4 levels, 2 resnets
per level, 32 groups; text: 12 layers like CLIP-L, 8 like a shortened bigG). float32 outputs agree
within 1e-5 of the largest output magnitude; with bfloat16 compute within BF16_TOL of it.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdxl_jax.models import presets
from sdxl_jax.models.autoencoder import DiagonalGaussian, autoencoder
from sdxl_jax.models.clip import text_tower
from sdxl_jax.models.convert import torch_key_variants, torch_leaves, torch_to_flax, unflatten
from sdxl_jax.models.tokenizer import get_tokenizers, tokenize

import torch  # noqa: E402  (test-only dependency, pinned in requirements.txt)
from diffusers import AutoencoderKL  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

TOL = 1e-5
# bfloat16 keeps 8 mantissa bits (relative rounding 2^-9 ≈ 2e-3); measured worst cases (of the
# largest output): 3.3e-2 for the mid-size VAE decode, 1.5e-2 for the 12-layer text tower.
BF16_TOL = 5e-2

VAE_CONFIGS = {
    "tiny": presets.vae_config("tiny"),
    "mid": dict(presets.vae_config("sdxl"), block_out_channels=(32, 64, 64, 64),
                norm_num_groups=32),
}
TEXT_CONFIGS = {
    "tiny": (presets.text_l_config("tiny"), presets.text_g_config("tiny")),
    "mid": (dict(presets.text_l_config("tiny"), hidden_size=128, intermediate_size=512,
                 num_hidden_layers=12, num_attention_heads=8, projection_dim=128),
            dict(presets.text_g_config("tiny"), hidden_size=160, intermediate_size=640,
                 num_hidden_layers=8, num_attention_heads=10, projection_dim=96)),
}


def _perturbed(model):
    """Eval mode, every parameter moved by N(0, 0.02²): default init leaves norms at (1, 0) and
    biases at 0, where a swapped scale/bias or a dropped bias would go unnoticed."""
    torch.manual_seed(1)
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _flax_params(name: str, module, torch_model, *init_args):
    """Our converter applied to the PyTorch state dict."""
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *init_args))["params"]
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}

    def stored(key):
        return state[next(k for k in torch_key_variants(name, key) if k in state)]
    return unflatten([(lf.path, jnp.asarray(torch_to_flax(lf.kind, stored(lf.key))))
                      for lf in torch_leaves(name, abstract)])


def _check(got: dict, want: dict, tol: float) -> dict:
    """Max |Δ| / max |want| per output; asserts each ≤ tol."""
    errs = {}
    for key, w in want.items():
        g = np.asarray(got[key], np.float64)
        assert g.shape == w.shape, (key, g.shape, w.shape)
        errs[key] = float(np.abs(g - w).max() / np.abs(w).max())
    print({k: f"{v:.2e}" for k, v in errs.items()})  # the figures docs/ quote (pytest -s)
    assert max(errs.values()) <= tol, errs
    return errs


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(x):
    return np.transpose(x.detach().numpy(), (0, 2, 3, 1)).astype(np.float64)


@pytest.fixture(scope="module", params=sorted(VAE_CONFIGS))
def vae_case(request):
    cfg = VAE_CONFIGS[request.param]
    torch.manual_seed(0)
    ref = _perturbed(AutoencoderKL(**cfg))
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 48, 32, 3)).astype(np.float32)
    latents = rng.standard_normal((2, 6, 4, 4)).astype(np.float32)
    with torch.no_grad():
        post = ref.encode(_nchw(images)).latent_dist
        want = {"mean": _nhwc(post.mean), "std": _nhwc(post.std),
                "decoded": _nhwc(ref.decode(_nchw(latents)).sample)}
    params = _flax_params("vae", autoencoder(cfg, jnp.float32), ref, jnp.zeros((1, 16, 16, 3)))
    return cfg, params, images, latents, want


def _vae_outputs(cfg, params, images, latents, dtype):
    vae = autoencoder(cfg, dtype)

    @jax.jit  # one compile instead of one per op
    def run(params, images, latents):
        moments = vae.apply({"params": params}, images.astype(dtype), method="encode")
        post = DiagonalGaussian(moments.astype(jnp.float32))
        decoded = vae.apply({"params": params}, latents.astype(dtype), method="decode")
        return {"mean": post.mean, "std": post.std, "decoded": decoded.astype(jnp.float32)}
    return run(params, images, latents)


def test_vae_matches_diffusers_float32(vae_case):
    cfg, params, images, latents, want = vae_case
    _check(_vae_outputs(cfg, params, images, latents, jnp.float32), want, TOL)


# bfloat16 at the mid size only: its rounding is the same story at both sizes
@pytest.mark.parametrize("vae_case", ["mid"], indirect=True)
def test_vae_matches_diffusers_bfloat16(vae_case):
    cfg, params, images, latents, want = vae_case
    _check(_vae_outputs(cfg, params, images, latents, jnp.bfloat16), want, BF16_TOL)


CAPTIONS = ["a red circle on a blue background", "", "two small white squares, dark gray, "
            "a green triangle in the upper left corner"]


@pytest.fixture(scope="module", params=sorted(TEXT_CONFIGS))
def text_case(request):
    cfg_l, cfg_g = TEXT_CONFIGS[request.param]
    tok_l, tok_g = get_tokenizers("tiny")  # the configs keep the tiny vocabulary
    cases = []
    for name, cfg, cls, tok in (("text_l", cfg_l, CLIPTextModel, tok_l),
                                ("text_g", cfg_g, CLIPTextModelWithProjection, tok_g)):
        torch.manual_seed(0)
        ref = _perturbed(cls(CLIPTextConfig(**cfg)))
        ids = tokenize(tok, CAPTIONS, 1)
        with torch.no_grad():
            out = ref(torch.from_numpy(ids).long(), output_hidden_states=True)
        want = {"penultimate": out.hidden_states[-2], "last_layer": out.hidden_states[-1],
                "last_hidden_state": out.last_hidden_state}
        want["pooled"] = out.text_embeds if name == "text_g" else out.pooler_output
        want = {k: v.numpy().astype(np.float64) for k, v in want.items()}
        assert len(out.hidden_states) == cfg["num_hidden_layers"] + 1
        tower = text_tower(cfg, name == "text_g", jnp.float32)
        cases.append((cfg, name, _flax_params(name, tower, ref, ids), ids, want))
    return cases


def _text_outputs(cfg, name, params, ids, dtype):
    tower = text_tower(cfg, name == "text_g", dtype)

    @jax.jit
    def run(params, ids):
        out = tower.apply({"params": params}, ids)
        pooled = out.text_embeds if name == "text_g" else out.pooler_output
        got = {"penultimate": out.hidden_states[-2], "last_layer": out.hidden_states[-1],
               "last_hidden_state": out.last_hidden_state, "pooled": pooled}
        return {k: v.astype(jnp.float32) for k, v in got.items()}
    return run(params, ids)


def test_text_towers_match_transformers_float32(text_case):
    for cfg, name, params, ids, want in text_case:
        _check(_text_outputs(cfg, name, params, ids, jnp.float32), want, TOL)


@pytest.mark.parametrize("text_case", ["mid"], indirect=True)
def test_text_towers_match_transformers_bfloat16(text_case):
    for cfg, name, params, ids, want in text_case:
        _check(_text_outputs(cfg, name, params, ids, jnp.bfloat16), want, BF16_TOL)
