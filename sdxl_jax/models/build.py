"""Build the SDXL modules and their parameters without ever compiling a module's init.

`module.init` of the UNet costs ~30 s of compilation even for the tiny preset; the parameter
*shapes* come from `jax.eval_shape` in about a second, and random values for those shapes are
drawn per leaf on the host (`init_params`), optionally straight into a sharded layout
(`out_shardings`), so a full-size model never sits whole on one device.
"""
from __future__ import annotations

import functools
import logging
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from sdxl_jax.models import attention as attention_kernels
from sdxl_jax.models import presets
from sdxl_jax.models import unet as unet_module
from sdxl_jax.models.autoencoder import autoencoder
from sdxl_jax.models.clip import text_tower
from sdxl_jax.models.tokenizer import SEQ_LEN

MODEL_NAMES = ("unet", "vae", "text_l", "text_g")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Leaves initialised to zero besides biases: the UNet's last conv, so a freshly initialised
# model predicts v = 0 and the first steps do not fight random output noise.
_ZERO_INIT = {"unet": (("conv_out", "kernel"),)}
# nn.Embed tables (token / position embeddings): N(0, 0.02²) like CLIP's own initialisation.
_EMBED_STD = 0.02


def _dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown model dtype {dtype!r}; choose one of {tuple(_DTYPES)}")
        return _DTYPES[dtype]
    return jnp.dtype(dtype)


def build_unet(preset, dtype="bfloat16", *, remat: str = "none", attention: str = "standard",
               split_head_dim: bool = False, ff_chunks: int = 1):
    """The SDXL UNet of `preset` (a preset name, or a UNet config dict such as
    `presets.unet_config` returns); compute in `dtype`, params float32. The options are the
    `model.*` keys of the same names; none of them changes the parameters. "auto" attention is
    resolved for the backend of this process (`attention.resolve`)."""
    if remat not in unet_module.REMAT_MODES:  # before attention: one bad key at a time, this first
        raise ValueError(f"model.remat={remat!r}: must be one of {unet_module.REMAT_MODES}")
    kernel = attention_kernels.resolve(attention)
    if isinstance(ff_chunks, bool) or not isinstance(ff_chunks, int) or ff_chunks < 1:
        raise ValueError(f"model.ff_chunks={ff_chunks!r}: must be an integer ≥ 1 (1 = unchunked)")
    sizes = presets.unet_config(preset) if isinstance(preset, str) else dict(preset)
    return unet_module.UNet2DConditionModel(
        **sizes, dtype=_dtype(dtype), remat=remat, attention=kernel,
        split_head_dim=bool(split_head_dim), ff_chunks=ff_chunks)


def build_unet_from_config(cfg):
    """The UNet described by `cfg.model` (preset, dtype, remat, attention, split_head_dim,
    ff_chunks)."""
    m = cfg.model
    return build_unet(m.preset, m.dtype, remat=m.remat, attention=m.attention,
                      split_head_dim=m.split_head_dim, ff_chunks=int(m.get("ff_chunks", 1)))


def vae_dtype(model_dtype) -> jnp.dtype:
    """The VAE's compute dtype for a `model.dtype`: float16 becomes bfloat16.

    The SDXL VAE's activations exceed float16's range (65504) in its decoder (the known black /
    NaN decodes of the original SDXL VAE in fp16); bfloat16 has float32's exponent range, so it
    cannot overflow there, and it is the TPU/GPU tensor-core dtype. Logged once per process."""
    dt = _dtype(model_dtype)
    if dt == jnp.float16:
        _log_vae_dtype_once()
        return jnp.dtype(jnp.bfloat16)
    return dt


@functools.lru_cache(maxsize=None)
def _log_vae_dtype_once() -> None:
    logging.getLogger("sdxl_jax.models").warning(
        "model.dtype='float16': the VAE runs in bfloat16 instead (the SDXL VAE overflows float16)")


def build_vae(preset: str, dtype="bfloat16"):
    """The VAE (`autoencoder.AutoencoderKL`); compute in `vae_dtype(dtype)` (never float16),
    params float32."""
    return autoencoder(presets.vae_config(preset), vae_dtype(dtype))


def build_text_encoders(preset: str, dtype="bfloat16"):
    """(CLIP-L text tower, bigG text tower with projection): `clip.CLIPTextTower` modules."""
    dt = _dtype(dtype)
    return (text_tower(presets.text_l_config(preset), False, dt),
            text_tower(presets.text_g_config(preset), True, dt))


def _module_and_inputs(name: str, preset: str):
    """A module and minimal dummy inputs for tracing its init (params do not depend on sizes)."""
    if name == "unet":
        return build_unet(preset, "float32"), unet_module.dummy_inputs(presets.unet_config(preset))
    if name == "vae":
        return build_vae(preset, "float32"), (jnp.zeros((1, 16, 16, 3)),)
    if name in ("text_l", "text_g"):
        module = build_text_encoders(preset, "float32")[name == "text_g"]
        return module, (jnp.zeros((1, SEQ_LEN), jnp.int32),)
    raise ValueError(f"unknown model name {name!r}; choose one of {MODEL_NAMES}")


def abstract_params(name: str, preset: str):
    """Parameter tree of ShapeDtypeStruct (float32) via jax.eval_shape: no compile, no memory."""
    # fresh containers for every caller, so mutating the returned dict cannot poison the cache
    return jax.tree_util.tree_map(lambda leaf: leaf, _abstract_params(name, preset))


@functools.lru_cache(maxsize=None)
def _abstract_params(name: str, preset: str):
    # cached: tracing the full SDXL UNet takes seconds
    module, args = _module_and_inputs(name, preset)
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))
    return variables["params"]


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _leaf_value(name: str, names: tuple[str, ...], shape, seed_words) -> np.ndarray:
    """Value of one parameter: kernels N(0, 1/fan_in), embeddings N(0, 0.02²), bias 0, scale 1.

    Seeded by (seed, crc32 of the path), so a leaf's values do not depend on any other leaf,
    and every host of a multi-host run computes the same values.
    """
    leaf = names[-1]
    if leaf == "bias" or any(names[-len(z):] == z for z in _ZERO_INIT.get(name, ())):
        return np.zeros(shape, np.float32)
    if leaf == "scale":
        return np.ones(shape, np.float32)
    if leaf == "kernel":  # Dense (in, out) / Conv (kh, kw, in, out): fan_in = all but last axis
        std = 1.0 / math.sqrt(max(1, int(np.prod(shape[:-1]))))
    elif leaf == "embedding":
        std = _EMBED_STD
    else:
        raise ValueError(f"{name}: no initialisation rule for parameter {'/'.join(names)}")
    gen = np.random.default_rng(
        np.random.SeedSequence([*seed_words, zlib.crc32("/".join(names).encode())]))
    values = gen.standard_normal(shape, dtype=np.float32)
    values *= np.float32(std)
    return values


def _seed_words(rng) -> list[int]:
    if isinstance(rng, (int, np.integer)):
        return [int(rng) & 0xFFFFFFFF]
    data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    return [int(w) for w in np.asarray(jax.device_get(data), np.uint32).ravel()]


def _place(value, sharding):
    """Put one leaf on devices: default device, or `sharding` (each host slices its shards)."""
    if sharding is None:
        return jnp.asarray(value, jnp.float32)
    if isinstance(value, jax.Array):
        return jax.device_put(value.astype(jnp.float32), sharding)
    value = np.asarray(value, np.float32)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _check_given(name: str, params, abstract):
    given = jax.tree_util.tree_flatten_with_path(params)[0]
    want = jax.tree_util.tree_flatten_with_path(abstract)[0]
    got_shapes = {_path_names(p): tuple(np.shape(v)) for p, v in given}
    want_shapes = {_path_names(p): tuple(v.shape) for p, v in want}
    missing = sorted(set(want_shapes) - set(got_shapes))
    extra = sorted(set(got_shapes) - set(want_shapes))
    wrong = sorted(k for k in set(want_shapes) & set(got_shapes) if got_shapes[k] != want_shapes[k])
    if missing or extra or wrong:
        def show(keys):
            return ", ".join("/".join(k) for k in keys[:5]) + (" …" if len(keys) > 5 else "")
        raise ValueError(
            f"given {name} params do not match the model: missing [{show(missing)}], "
            f"unexpected [{show(extra)}], wrong shape [{show(wrong)}]")
    return {_path_names(p): v for p, v in given}


def init_params(name: str, preset: str, rng, *, out_shardings=None, params=None):
    """Float32 parameters for model `name` ("unet" | "vae" | "text_l" | "text_g").

    Random from `rng` (a jax PRNG key or an int seed) by the per-leaf rule of `_leaf_value`,
    generated on the host with numpy: XLA's compile time grows with the number of RNG ops (a
    jitted per-leaf init of the tiny UNet compiles for 40-90 s on 2 CPU cores), numpy has none.
    When `params` is given (e.g. converted from a checkpoint) those values are checked against
    the model's shapes instead. Either way each leaf is placed by `out_shardings` (a pytree
    matching the params, or one sharding for all leaves) when given; every host computes the
    full leaf and keeps only its own shards, so no device ever holds more than its share.
    """
    abstract = abstract_params(name, preset)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    if out_shardings is None or isinstance(out_shardings, jax.sharding.Sharding):
        shardings = [out_shardings] * len(leaves)
    else:
        shardings = treedef.flatten_up_to(out_shardings)
    given = _check_given(name, params, abstract) if params is not None else None
    seed_words = _seed_words(rng) if given is None else None
    values = []
    for (path, spec), sharding in zip(leaves, shardings):
        names = _path_names(path)
        value = (given[names] if given is not None
                 else _leaf_value(name, names, tuple(spec.shape), seed_words))
        values.append(_place(value, sharding))
    return jax.tree_util.tree_unflatten(treedef, values)


def count_params(tree) -> int:
    """Number of scalars in a (possibly abstract) parameter tree."""
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
