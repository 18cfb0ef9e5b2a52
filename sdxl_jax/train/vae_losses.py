"""Losses of VAE decoder finetuning (METHODS §11, the choices marked [ours] there).

- pixel L1 + MSE;
- an LPIPS-style perceptual distance, from a weights file only (a feature net with random
  weights is not a perceptual metric, so there is no built-in default and no silent zero);
- a PatchGAN discriminator (pix2pix / taming-transformers layout) with the hinge loss, switched
  on after a warm-up, its generator term scaled by taming's adaptive weight
  ‖∇_last L_rec‖ / (‖∇_last L_gan‖ + 10⁻⁴), clipped, on the decoder's last layer.

Everything here is a pure function of arrays and plain parameter dicts (no Flax modules): the
perceptual net comes from a file and the discriminator is a handful of convolutions, so both
initialise on the host with numpy and add no module-init compile.

Perceptual weights file (.safetensors, float32; `save_perceptual` writes one):
    shift, scale          (3,)              input normalisation x ← (x − shift)/scale, x in [−1, 1]
    conv_{i}.kernel       (3, 3, Cin, Cout) stage i: 3×3 conv (stride 1, same padding) + ReLU;
    conv_{i}.bias         (Cout,)           stages after the first start with a 2×2 average pool
    lin_{i}.kernel        (Cout,)           non-negative per-channel weights of stage i's head
for i = 0 … L−1, Cin of stage 0 = 3 and Cin of stage i = Cout of stage i−1. The distance of two
images is Σ_i mean_{h,w} Σ_c lin_i[c]·(f̂_i(x) − f̂_i(y))², f̂ the features unit-normalised
over channels (LPIPS's form).
"""
from __future__ import annotations

import os
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_DN = ("NHWC", "HWIO", "NHWC")


def _conv(x, kernel, bias, stride: int = 1, padding: int | str = "SAME"):
    pad = padding if isinstance(padding, str) else [(padding, padding)] * 2
    y = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), (stride, stride), pad,
                                     dimension_numbers=_DN)
    return y + bias.astype(x.dtype)


# ---- pixel losses --------------------------------------------------------------------------------

def pixel_losses(x_BHWC, y_BHWC):
    """(l1, mse) of reconstructions y against targets x, each a (B,) per-image mean, float32."""
    d = (y_BHWC.astype(jnp.float32) - x_BHWC.astype(jnp.float32)).reshape(x_BHWC.shape[0], -1)
    return jnp.mean(jnp.abs(d), axis=1), jnp.mean(d * d, axis=1)


# ---- KL of the posterior (training a VAE from scratch) -------------------------------------------

KL_WEIGHT = 1e-6  # [ours] the LDM / SD autoencoder weight, on the normalisation of kl_loss


def kl_loss(mean_BHWC, std_BHWC, image_values: int):
    """(B,) KL(N(μ, σ²) ‖ N(0, I)) of each image's diagonal Gaussian posterior, float32:
    ½ Σ (μ² + σ² − 1 − log σ²) over the latent's h·w·c elements, divided by `image_values`
    (H·W·3 of the encoded image).

    The division puts the term on the scale of `pixel_losses`, which are per-pixel means:
    `KL_WEIGHT · kl_loss` then stands to the mean L1/MSE exactly as latent-diffusion's KL
    weight 10⁻⁶ stands to its per-image *summed* reconstruction loss, so the usual weight
    keeps its usual meaning at any image size. Only the encoder-training mode uses it: with a
    frozen encoder the term is a constant.
    """
    mean = mean_BHWC.astype(jnp.float32).reshape(mean_BHWC.shape[0], -1)
    std = std_BHWC.astype(jnp.float32).reshape(std_BHWC.shape[0], -1)
    var = std * std
    # log σ² from σ (not log of the product): the encoder clips log σ² at −30, where σ² ≈ 1e-13
    # is still a normal float32 but its log loses nothing this way
    kl = 0.5 * jnp.sum(mean * mean + var - 1.0 - 2.0 * jnp.log(std), axis=1)
    return kl / float(image_values)


# ---- perceptual ----------------------------------------------------------------------------------

class PerceptualWeightsError(ValueError):
    """The perceptual weights file is missing or malformed; the message names it."""


def init_perceptual(seed, channels: Sequence[int] = (16, 32, 64)) -> dict:
    """A perceptual net of the file format above with random conv weights (He init) and uniform
    non-negative heads: for tests and as a template for converted weights, not a metric."""
    rng = np.random.default_rng(seed)
    params = {"shift": np.zeros(3, np.float32), "scale": np.ones(3, np.float32)}
    cin = 3
    for i, cout in enumerate(channels):
        std = np.sqrt(2.0 / (9 * cin))
        params[f"conv_{i}"] = {"kernel": (rng.standard_normal((3, 3, cin, cout)) * std).astype(np.float32),
                               "bias": np.zeros(cout, np.float32)}
        params[f"lin_{i}"] = {"kernel": np.full(cout, 1.0 / cout, np.float32)}
        cin = cout
    return params


def save_perceptual(path: str, params: dict) -> None:
    """Write `params` (the layout of init_perceptual) as a .safetensors file."""
    from safetensors.numpy import save_file
    flat = {"shift": params["shift"], "scale": params["scale"]}
    for name, sub in params.items():
        if isinstance(sub, dict):
            flat.update({f"{name}.{k}": np.asarray(v, np.float32) for k, v in sub.items()})
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}, path)


def load_perceptual(path: str) -> dict:
    """Read and check a perceptual weights file; every problem raises PerceptualWeightsError
    naming the file and the tensor (a missing file is an error, never a zero loss)."""
    if not os.path.isfile(path):
        raise PerceptualWeightsError(
            f"loss.perceptual_weights={path!r}: no such file. Give a .safetensors of the LPIPS-style "
            "net described in sdxl_jax/train/vae_losses.py, or set loss.perceptual_weights='' "
            "to train without the perceptual loss")
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        flat = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise PerceptualWeightsError(f"loss.perceptual_weights={path!r}: not a readable "
                                     f".safetensors file ({e})") from None
    params: dict = {}
    for key, value in flat.items():
        m = re.fullmatch(r"(conv_\d+|lin_\d+)\.(kernel|bias)", key)
        if key in ("shift", "scale"):
            params[key] = value
        elif m:
            params.setdefault(m.group(1), {})[m.group(2)] = value
        else:
            raise PerceptualWeightsError(f"{path}: unexpected tensor {key!r} (expected shift, scale, "
                                         "conv_<i>.kernel/.bias, lin_<i>.kernel)")
    check_perceptual(params, path)
    return {k: (np.asarray(v, np.float32) if not isinstance(v, dict)
                else {kk: np.asarray(vv, np.float32) for kk, vv in v.items()}) for k, v in params.items()}


def check_perceptual(params: dict, where: str = "perceptual params") -> None:
    """Shapes chain as the format says; raises PerceptualWeightsError naming the first problem."""
    def need(key, shape_ok, what):
        node = params
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise PerceptualWeightsError(f"{where}: missing tensor {key!r}")
            node = node[part]
        if not shape_ok(np.shape(node)):
            raise PerceptualWeightsError(f"{where}: tensor {key!r} has shape {np.shape(node)}, "
                                         f"expected {what}")
        return node
    need("shift", lambda s: s == (3,), "(3,)")
    need("scale", lambda s: s == (3,), "(3,)")
    stages = sorted(int(k.split("_")[1]) for k in params if k.startswith("conv_"))
    if not stages or stages != list(range(len(stages))):
        raise PerceptualWeightsError(f"{where}: conv stages must be conv_0 … conv_<L-1>, found {stages}")
    cin = 3
    for i in stages:
        k = need(f"conv_{i}.kernel", lambda s, c=cin: len(s) == 4 and s[:3] == (3, 3, c),
                 f"(3, 3, {cin}, Cout)")
        cout = np.shape(k)[3]
        need(f"conv_{i}.bias", lambda s, c=cout: s == (c,), f"({cout},)")
        lin = need(f"lin_{i}.kernel", lambda s, c=cout: s == (c,), f"({cout},)")
        if np.any(np.asarray(lin) < 0):
            raise PerceptualWeightsError(f"{where}: lin_{i}.kernel has negative entries (the "
                                         "head weights of an LPIPS-style net are non-negative)")
        cin = cout
    if any(k.startswith("lin_") and int(k.split("_")[1]) not in stages for k in params):
        raise PerceptualWeightsError(f"{where}: a lin_<i> head has no conv_<i> stage")


def _unit(f, eps: float = 1e-10):
    # sqrt(Σf² + eps), not sqrt(Σf²) + eps: finite gradient where a ReLU zeroes every channel
    return f * jax.lax.rsqrt(jnp.sum(f * f, axis=-1, keepdims=True) + eps)


def perceptual_distance(params: dict, x_BHWC, y_BHWC):
    """(B,) LPIPS-style distances between image batches in [−1, 1], float32."""
    n = len([k for k in params if k.startswith("conv_")])
    shift = jnp.asarray(params["shift"], jnp.float32)
    scale = jnp.asarray(params["scale"], jnp.float32)
    h = (jnp.concatenate([x_BHWC, y_BHWC]).astype(jnp.float32) - shift) / scale
    batch = x_BHWC.shape[0]
    total = jnp.zeros((batch,), jnp.float32)
    for i in range(n):
        if i:
            h = jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4.0
        h = jax.nn.relu(_conv(h, params[f"conv_{i}"]["kernel"], params[f"conv_{i}"]["bias"]))
        fx, fy = _unit(h[:batch]), _unit(h[batch:])
        per_pos = jnp.sum(jnp.asarray(params[f"lin_{i}"]["kernel"]) * (fx - fy) ** 2, axis=-1)
        total = total + jnp.mean(per_pos, axis=(1, 2))
    return total


# ---- PatchGAN discriminator ----------------------------------------------------------------------

def disc_widths(channels: int, layers: int) -> list[int]:
    """Output widths of the discriminator's convolutions (the last is the 1-channel logit map)."""
    return [channels * min(2 ** i, 8) for i in range(layers + 1)] + [1]


def init_discriminator(seed, channels: int, layers: int) -> dict:
    """PatchGAN weights: conv kernels N(0, 0.02²) and bias 0 as in pix2pix/taming; norm scale 1.
    `seed` is anything np.random.default_rng takes (an int or a list of ints)."""
    rng = np.random.default_rng(seed)
    widths = disc_widths(channels, layers)
    params, cin = {}, 3
    for i, cout in enumerate(widths):
        params[f"conv_{i}"] = {"kernel": (rng.standard_normal((4, 4, cin, cout)) * 0.02).astype(np.float32),
                               "bias": np.zeros(cout, np.float32)}
        if 0 < i < len(widths) - 1:
            params[f"norm_{i}"] = {"scale": np.ones(cout, np.float32), "bias": np.zeros(cout, np.float32)}
        cin = cout
    return params


def _group_norm(x, scale, bias, groups: int = 32, eps: float = 1e-5):
    """GroupNorm instead of taming's BatchNorm: no running statistics to carry in the state, and
    per-sample, so it is the same on any number of devices."""
    b, h, w, c = x.shape
    g = groups if c % groups == 0 else 1
    xg = x.reshape(b, h, w, g, c // g)
    mean = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)
    var = jnp.var(xg, axis=(1, 2, 4), keepdims=True)
    return ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(b, h, w, c) * scale + bias


def discriminator_logits(params: dict, x_BHWC):
    """Patch logits (B, h, w, 1): 4×4 convs, stride 2 for the first `layers` (+1) then stride 1,
    GroupNorm + LeakyReLU(0.2) between them (none after the first conv)."""
    n = len([k for k in params if k.startswith("conv_")])
    layers = n - 2
    h = x_BHWC.astype(jnp.float32)
    for i in range(n):
        p = params[f"conv_{i}"]
        h = _conv(h, p["kernel"], p["bias"], stride=2 if i < layers else 1, padding=1)
        if i == n - 1:
            break
        if i:
            h = _group_norm(h, params[f"norm_{i}"]["scale"], params[f"norm_{i}"]["bias"])
        h = jax.nn.leaky_relu(h, 0.2)
    return h


def hinge_d_loss(logits_real, logits_fake):
    """½(mean relu(1 − D(x)) + mean relu(1 + D(x̂)))."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def hinge_g_loss(logits_fake):
    """−mean D(x̂): the generator's side of the hinge GAN."""
    return -jnp.mean(logits_fake)


def gan_losses(disc_params: dict, real_BHWC, fake_BHWC):
    """Both sides of the hinge GAN from one discriminator forward over [real; fake].

    Returns (d_loss, ∇_params d_loss, g_loss, ∇_fake g_loss, mean real logit, mean fake logit).
    The fake images' gradient is only taken for g_loss and the parameters' only for d_loss (as
    if the fakes were stop-gradient in d_loss and the discriminator frozen in g_loss), by
    pulling two different logit cotangents back through the same forward pass.
    """
    b = real_BHWC.shape[0]
    logits, pull = jax.vjp(discriminator_logits, disc_params,
                           jnp.concatenate([real_BHWC.astype(jnp.float32), fake_BHWC.astype(jnp.float32)]))
    d_loss, d_cot = jax.value_and_grad(lambda lg: hinge_d_loss(lg[:b], lg[b:]))(logits)
    g_loss, g_cot = jax.value_and_grad(lambda lg: hinge_g_loss(lg[b:]))(logits)
    d_grads = pull(d_cot)[0]
    g_fake = pull(g_cot)[1][b:]
    return d_loss, d_grads, g_loss, g_fake, jnp.mean(logits[:b]), jnp.mean(logits[b:])


# ---- adaptive weight -----------------------------------------------------------------------------

def adaptive_weight(rec_last_grad, gan_last_grad, max_weight: float = 1e4, eps: float = 1e-4):
    """taming-transformers: clip(‖∇_last L_rec‖ / (‖∇_last L_gan‖ + eps), 0, max_weight),
    without gradient (a scale, not part of the objective)."""
    num = jnp.sqrt(jnp.sum(jnp.square(rec_last_grad.astype(jnp.float32))))
    den = jnp.sqrt(jnp.sum(jnp.square(gan_last_grad.astype(jnp.float32)))) + eps
    return jax.lax.stop_gradient(jnp.clip(num / den, 0.0, max_weight))


def last_layer_weight(vjp_fn: Callable, rec_cotangent, gan_cotangent, last: Callable,
                      max_weight: float = 1e4):
    """The adaptive weight from one decoder forward pass.

    `vjp_fn` is the pull-back of the decoder output w.r.t. its params (jax.vjp), the cotangents
    are ∂L_rec/∂output and ∂L_gan/∂output, and `last(param_grads)` picks the last layer's
    kernel. Only that leaf of each pull-back is used, so XLA drops the rest of both backward
    passes: the cost is two small correlations, not two extra decoder backward passes.
    """
    return adaptive_weight(last(vjp_fn(rec_cotangent)[0]), last(vjp_fn(gan_cotangent)[0]), max_weight)
