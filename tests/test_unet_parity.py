"""Our UNet against PyTorch diffusers' `UNet2DConditionModel` (the newest release, pinned in
requirements.txt) with the same random weights, moved into our tree by our own converter
(`convert.torch_leaves`): float32 outputs, gradients, and bfloat16 compute.

Every parameter is random, norm scales and biases included (PyTorch initialises GroupNorm /
LayerNorm to 1 / 0, which would hide a mismatch in them). Two presets: "tiny", and "mid"
(models/presets.py: SDXL's 3 levels, 2 resnets per level, transformer depths 1/2/10, at 1/5 of
SDXL's width); two bucket shapes each, timesteps up to 999.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdxl_jax import models
from sdxl_jax.models import convert
from sdxl_jax.tools.torch_reference import (float32_on_use, our_params, random_torch_unet,
                                            torch_forward, unet_inputs)

torch.set_num_threads(2)


def _ours(cfg, dtype="float32"):
    unet = models.build_unet(cfg, dtype)
    return jax.jit(lambda p, x: models.unet_apply(unet, p, x["z"], x["t"], x["context"],
                                                  x["pooled"], x["time_ids"]))


@functools.lru_cache(maxsize=2)
def _models(name: str):
    """(config, PyTorch UNet, our params): built once per preset for the tests of this file."""
    cfg = models.unet_config(name)
    model = random_torch_unet(cfg)
    return cfg, model, our_params(model, cfg)


def output_errors(name: str, shapes, timesteps, dtype="float32") -> list:
    """[(h, w, max |ours - torch fp32|, max |torch|)] per latent shape."""
    cfg, model, params = _models(name)
    apply = _ours(cfg, dtype)
    found = []
    for h, w in shapes:
        x = unet_inputs(cfg, h, w, timesteps)
        with torch.no_grad():
            want = torch_forward(model, x).numpy()
        got = np.asarray(apply(params, x))
        found.append((h, w, float(np.abs(got - want).max()), float(np.abs(want).max())))
    return found


CASES = {  # name: (latent shapes, timesteps of the batch rows)
    "tiny": ([(16, 16), (16, 24)], [1.0, 500.0, 999.0]),
    "mid": ([(8, 8), (8, 12)], [0.0, 999.0]),
}


@pytest.mark.parametrize("name,shape", [(n, hw) for n, (shapes, _) in CASES.items() for hw in shapes])
def test_outputs_match_pytorch_fp32(name, shape):
    """tiny, and mid: SDXL's block structure at reduced width (the 10-layer transformers)."""
    [(h, w, err, scale)] = output_errors(name, [shape], CASES[name][1])
    assert err <= 1e-5 * scale, f"{name} {h}×{w}: max |Δ| {err:.3g} vs output scale {scale:.3g}"


def gradient_errors() -> dict:
    """{torch key or "input": (max |Δgrad|, reference scale)} for ∂(Σ out·r) of the tiny UNet:
    the input's against its own largest gradient, each parameter's against the largest
    parameter gradient."""
    cfg, model, params = _models("tiny")
    model.zero_grad(set_to_none=True)
    x = unet_inputs(cfg, 16, 16, [10.0, 999.0])
    r = np.random.default_rng(1).standard_normal(x["z"].shape[:3] + (cfg["out_channels"],)).astype(np.float32)
    unet = models.build_unet(cfg, "float32")

    def loss(p, z):
        out = models.unet_apply(unet, p, z, x["t"], x["context"], x["pooled"], x["time_ids"])
        return jnp.sum(out * r)
    grads, dz = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x["z"])

    z = torch.from_numpy(x["z"]).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    (torch_forward(model, x, z) * torch.from_numpy(r)).sum().backward()
    want_dz = z.grad.permute(0, 2, 3, 1).numpy()
    found = {"input": (float(np.abs(np.asarray(dz) - want_dz).max()), float(np.abs(want_dz).max()))}

    torch_grads = {k: p.grad.numpy() for k, p in model.named_parameters()}
    leaves = convert.torch_leaves("unet", grads)
    ours = dict(convert.flat_leaves(grads))
    largest = max(float(np.abs(g).max()) for g in torch_grads.values())
    for lf in leaves:
        got = convert.flax_to_torch(lf.kind, np.asarray(ours[lf.path]))
        found[lf.key] = (float(np.abs(got - torch_grads[lf.key]).max()), largest)
    return found


def test_tiny_gradients_match_pytorch_autograd():
    """∂(Σ out·r)/∂(input, every parameter) within 1e-4 of the largest gradient, against torch
    autograd (410 parameters and the input)."""
    found = gradient_errors()
    assert len(found) == 1 + len(jax.tree.leaves(models.abstract_params("unet", "tiny")))
    for key, (err, scale) in found.items():
        assert scale > 0 and err <= 1e-4 * scale, f"{key}: max |Δgrad| {err:.3g} vs {scale:.3g}"


def test_tiny_bfloat16_compute_stays_near_pytorch_fp32():
    """bf16 compute (float32 params, norms and softmax statistics in float32 where flax takes
    them) against the float32 PyTorch output: within 3 % of the output scale. bf16 keeps 8
    mantissa bits (relative rounding 2⁻⁹ ≈ 0.2 %) and the error accumulates over ~40 layers."""
    [(_, _, err, scale)] = output_errors("tiny", [(16, 16)], [1.0, 500.0, 999.0], "bfloat16")
    assert err <= 3e-2 * scale, f"bf16: max |Δ| {err:.3g} vs output scale {scale:.3g}"
    assert err > 1e-5 * scale  # it really computed in bf16


def test_bfloat16_stored_weights_compute_exactly_as_float32_in_both_frameworks():
    """tools/parity_sdxl.py stores its random weights in bfloat16 to fit beside the suite: each
    framework must then compute bitwise as with the same values stored in float32 (PyTorch
    through `float32_on_use`, ours through the layers' promotion to their compute dtype)."""
    cfg = models.unet_config("tiny")
    narrow = random_torch_unet(cfg, seed=3, dtype=torch.bfloat16)
    wide = random_torch_unet(cfg, seed=3, dtype=torch.bfloat16).float()
    x = unet_inputs(cfg, 16, 16, [1.0, 999.0])
    with torch.no_grad():
        with float32_on_use(narrow):
            got = torch_forward(narrow, x).numpy()
        want = torch_forward(wide, x).numpy()
    assert {p.dtype for p in narrow.parameters()} == {torch.bfloat16}  # narrowed back after use
    np.testing.assert_array_equal(got, want)
    ours_narrow, ours_wide = our_params(narrow, cfg), our_params(wide, cfg)
    assert {lf.dtype for lf in jax.tree.leaves(ours_narrow)} == {jnp.dtype(jnp.bfloat16)}
    apply = _ours(cfg)
    np.testing.assert_array_equal(np.asarray(apply(ours_narrow, x)), np.asarray(apply(ours_wide, x)))


if __name__ == "__main__":  # the figures for docs: python tests/test_unet_parity.py
    for name, case in CASES.items():
        for h, w, err, scale in output_errors(name, *case):
            print(f"{name} fp32 {h}x{w}: max|Δ|/max|out| = {err / scale:.2e}")
    [(_, _, err, scale)] = output_errors("tiny", [(16, 16)], [1.0, 500.0, 999.0], "bfloat16")
    print(f"tiny bf16 16x16: max|Δ|/max|out| = {err / scale:.2e}")
    grads = gradient_errors()
    err, scale = grads.pop("input")
    print(f"tiny grads: input max|Δ|/max = {err / scale:.2e}, worst parameter max|Δ|/largest "
          f"= {max(e / s for e, s in grads.values()):.2e}")
