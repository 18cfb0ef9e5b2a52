"""Shared test helpers: the tiny configs the engine tests train with, and the UNet program."""
import os
import re

from sdxl_jax.config import apply_overrides, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(name: str, overrides: dict | None = None):
    """configs/<name>.py[:preset] from the repository, with dotted overrides."""
    path, _, preset = name.partition(":")
    return load_config(os.path.join(ROOT, "configs", path + ".py") + (f":{preset}" if preset else ""),
                       overrides)


# The engine tests' model: tiny's text towers and VAE with a one-level UNet (compiles ~2.5x
# faster than tiny's; the loop, checkpoints and sharding do not depend on the UNet's depth).
# Tests of the SDXL layout itself (export, interop, LoRA keys) use the tiny preset.
ENGINE_PRESET = "micro"


def tiny_config(**overrides):
    """configs/ztsnr.py:tiny with the ENGINE_PRESET model, reduced to one 128² bucket, float32
    compute, no previews and a 4×2 data×FSDP mesh, so the engine tests share one compiled train
    step (the persistent XLA cache of conftest.py)."""
    cfg = config("ztsnr:tiny")
    cfg.model.preset = ENGINE_PRESET
    cfg.model.dtype = "float32"
    cfg.data.demo_vae_steps = 0  # the seeded random VAE (the demo's own is tested in test_demo_vae)
    cfg.latents.normalization = "scale"
    cfg.data.buckets.min_side = cfg.data.buckets.max_side = 128
    cfg.data.buckets.max_ar_error = 1.0  # every demo image lands in the one bucket
    cfg.data.val_fraction = 0.1
    cfg.train.global_batch_size = 8
    cfg.train.warmup_steps = 0
    cfg.train.learning_rate, cfg.train.lr_schedule = 3e-4, "constant"  # not the demo's cosine
    cfg.checkpoint.every_steps = 100
    cfg.train.log_every = 1
    cfg.sample.every_steps = 0
    cfg.checkpoint.async_save = False
    cfg.mesh.data, cfg.mesh.fsdp = -1, 2  # 4×2 on the 8 test devices: data parallel and FSDP
    cfg.mesh.min_fsdp_size = 1024  # shard the tiny model's kernels for real
    return override(cfg, overrides)


def override(cfg, overrides: dict):
    """Set dotted keys ("train.steps": 4, …) on a ConfigDict; returns it."""
    return apply_overrides(cfg, overrides)


def unet_program(cfg, devices=None, total_steps=None):
    """The UNet task's train program for `cfg` on `devices` (default: all): what the loop runs."""
    from sdxl_jax import parallel
    from sdxl_jax.train.program import build_program
    from sdxl_jax.train.unet_task import program_spec
    plan = parallel.ShardingPlan.from_config(cfg.mesh, devices)
    return build_program(program_spec(cfg, total_steps=total_steps), plan)


def tokenize_fn(preset: str):
    """Captions → (CLIP-L ids, bigG ids), one 77-token chunk each, with the preset's tokenizers."""
    from sdxl_jax import models
    tok_l, tok_g = models.get_tokenizers(preset)
    return lambda c: (models.tokenize(tok_l, c, 1), models.tokenize(tok_g, c, 1))


def first_train_batch(cfg, rows: int) -> dict:
    """The first `rows`-row training batch of cfg.data.cache_dir (one process, host arrays)."""
    from sdxl_jax.data import make_train_iterator
    it = make_train_iterator(cfg, cfg.data.cache_dir, tokenize_fn(cfg.model.preset), 0, 1, rows, 1)
    batch = next(it)
    it.close()
    return batch


def engine_weights(seed: int = 0):
    """(UNet params on the host, frozen text towers) of ENGINE_PRESET, the towers from seeds
    2 and 3: what the engine tests feed a train step (on the host: init_state donates)."""
    import jax
    from sdxl_jax import models
    params = jax.device_get(models.init_params("unet", ENGINE_PRESET, jax.random.PRNGKey(seed)))
    frozen = {k: models.init_params(k, ENGINE_PRESET, jax.random.PRNGKey(i)) for i, k in ((2, "text_l"), (3, "text_g"))}
    return params, frozen


def held_out_loss(cfg, unet_params, text, seed=0):
    """The evaluator's loss (fixed timesteps, noise from PRNGKey(seed)) on the first held-out batch
    of cfg.data.cache_dir: the same yardstick before and after training."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from sdxl_jax import models
    from sdxl_jax.data import make_val_iterator
    from sdxl_jax.train.evaluate import fixed_timesteps, make_eval_loss
    from sdxl_jax.train.step import StepConfig
    preset = cfg.model.preset
    it = make_val_iterator(cfg, cfg.data.cache_dir, tokenize_fn(preset), 0, 1, 8, 8)
    batch = next(it)
    it.close()
    sc = StepConfig.from_config(cfg)
    text_l, text_g = models.build_text_encoders(preset, "float32")
    fn = make_eval_loss(models.build_unet(preset, "float32"), text_l, text_g, sc)
    t = jnp.asarray(fixed_timesteps(0, 8, 1, sc.alphas_cumprod.shape[0]))
    eps = jax.random.normal(jax.random.PRNGKey(seed), batch["latents"].shape)
    return float(np.mean(fn(unet_params, text, batch, t, eps)))


def _two_level_config():
    from sdxl_jax.models import presets
    return dict(presets.unet_config("tiny"), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64),
                transformer_layers_per_block=(1, 1), attention_head_dim=(1, 2))


# A 2-level cut of the tiny UNet (plain level, then cross-attention with 2 heads, mid block with
# attention): every kind of block the remat and attention options touch, at half the tiny
# preset's compile time.
TWO_LEVEL = _two_level_config()


def two_level_params(bias_std: float | None = None):
    """Random float32 TWO_LEVEL params: kernels N(0, 1/fan_in), norm scales 1, biases 0
    (`bias_std` None) or N(0, bias_std²), drawn in tree order from default_rng(0)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from sdxl_jax.models.build import build_unet
    from sdxl_jax.models.unet import dummy_inputs
    unet = build_unet(TWO_LEVEL, "float32")
    abstract = jax.eval_shape(lambda: unet.init(jax.random.key(0), *dummy_inputs(TWO_LEVEL)))["params"]
    rng = np.random.default_rng(0)

    def value(path, x):
        leaf = jax.tree_util.keystr(path[-1:])
        if "scale" in leaf:
            return jnp.ones(x.shape, jnp.float32)
        if "bias" in leaf and bias_std is None:
            return jnp.zeros(x.shape, jnp.float32)
        std = bias_std if "bias" in leaf else 1.0 / np.sqrt(max(1, int(np.prod(x.shape[:-1]))))
        return jnp.asarray(rng.standard_normal(x.shape, dtype=np.float32) * std)
    return jax.tree_util.tree_map_with_path(value, abstract)


def optimized_hlo(compiled) -> str:
    """A compiled program's text without its source locations: a program traced on a worker
    thread records that thread's Python stack (the persistent cache's key drops them too)."""
    text = re.sub(r", metadata=\{[^}]*\}", "", compiled.as_text())
    head, _, body = text.partition("\nFileNames\n")
    return head + body[body.index("\n%"):] if body else text
