"""The PyTorch diffusers UNet as the reference of our own (tests/test_unet_parity.py and
tools/parity_sdxl.py): random weights in every parameter, the same inputs, the converter between.

Imports torch and diffusers: the tests' and tools' dependency only, never the trainer's.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from diffusers import UNet2DConditionModel as TorchUNet


def random_torch_unet(cfg: dict, seed: int = 0, dtype=torch.float32) -> TorchUNet:
    """diffusers' UNet with every parameter drawn (norm scales and biases included: PyTorch's
    init sets them to 1 / 0, which would hide a mismatch in them; conv_out is not zero).
    `dtype`: the storage of the weights; bfloat16 halves the full-size UNet's 10 GB, and its
    values are then exact in float32 (see `float32_on_use`)."""
    with torch.device("meta"):  # no PyTorch init: every parameter is drawn below
        # torch's own `to`: diffusers' override warns about keep-in-float32 modules (the UNet has none)
        model = torch.nn.Module.to(TorchUNet(**cfg), dtype)
    model = model.to_empty(device="cpu").eval()
    assert not list(model.buffers())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or p.ndim == 1:  # biases, norm weights: ~N(0 or 1, 0.1²)
                base = 1.0 if p.ndim == 1 and name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
            else:  # kernels ~N(0, 1/fan_in)
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(fan_in))
    return model


@contextlib.contextmanager
def float32_on_use(model: torch.nn.Module):
    """Run a model whose weights are stored in a narrower dtype in float32: each module's own
    parameters are widened just before its forward and narrowed back right after (exact both
    ways when the values came from that dtype), so one layer at a time holds float32 weights."""
    def widen(module, _args):
        for p in module.parameters(recurse=False):
            p.data = p.data.float()

    def narrow(module, _args, _out):
        for p in module.parameters(recurse=False):
            p.data = p.data.to(stored[module])

    stored = {m: next(m.parameters(recurse=False)).dtype for m in model.modules()
              if next(m.parameters(recurse=False), None) is not None}
    hooks = [h for m in stored for h in (m.register_forward_pre_hook(widen), m.register_forward_hook(narrow))]
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()


def unet_inputs(cfg: dict, h: int, w: int, timesteps, seed: int = 0) -> dict:
    """One batch (channels-last latents, one row per timestep) for both frameworks."""
    rng = np.random.default_rng(seed)
    b = len(timesteps)
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    return dict(z=rng.standard_normal((b, h, w, cfg["in_channels"])).astype(np.float32),
                t=np.asarray(timesteps, np.float32),
                context=rng.standard_normal((b, 77, cfg["cross_attention_dim"])).astype(np.float32),
                pooled=rng.standard_normal((b, pooled)).astype(np.float32),
                time_ids=np.tile(np.array([[8 * h, 8 * w, 0, 0, 8 * h, 8 * w]], np.float32), (b, 1)))


def torch_forward(model: TorchUNet, x: dict, z=None):
    """The PyTorch UNet's output, channels-last (`z`: an NCHW tensor instead of x["z"])."""
    z = torch.from_numpy(x["z"]).permute(0, 3, 1, 2) if z is None else z
    out = model(z, torch.from_numpy(x["t"]), encoder_hidden_states=torch.from_numpy(x["context"]),
                added_cond_kwargs={"text_embeds": torch.from_numpy(x["pooled"]),
                                   "time_ids": torch.from_numpy(x["time_ids"])}).sample
    return out.permute(0, 2, 3, 1)


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's values as numpy, bfloat16 as ml_dtypes' bfloat16 (numpy has none of its
    own): the same bits, no float32 round trip."""
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def our_params(model: TorchUNet, cfg: dict, release: bool = False):
    """The PyTorch UNet's weights in our tree, through our converter (models/convert.py), in
    the dtype they are stored in. `release`: free each PyTorch parameter once converted, so the
    two copies never coexist (the full-size UNet is 10 GB in float32, 5 GB in bfloat16)."""
    import jax
    import jax.numpy as jnp
    from sdxl_jax import models
    from sdxl_jax.models import convert
    from sdxl_jax.models.unet import dummy_inputs
    unet = models.build_unet(cfg, "float32")
    abstract = jax.eval_shape(lambda: unet.init(jax.random.key(0), *dummy_inputs(cfg)))["params"]
    params = dict(model.named_parameters())
    leaves = convert.torch_leaves("unet", abstract)
    assert sorted(lf.key for lf in leaves) == sorted(params), "converter and model disagree on names"
    out = []
    for lf in leaves:
        p = params.pop(lf.key)
        out.append((lf.path, jnp.asarray(convert.torch_to_flax(lf.kind, _numpy(p.detach())))))
        if release:
            p.data = torch.empty(0)
    return convert.unflatten(out)
