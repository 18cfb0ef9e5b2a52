"""VAE decoder finetuning (METHODS §11): the frozen encoder makes the latents, the decoder learns
to turn them back into the images.

The VAE parameters are split in two trees: the encoder part (encoder + quant_conv) is frozen —
sharded on the mesh, passed to the step as a constant, never in the optimizer or the checkpoint —
and the decoder part (post_quant_conv + decoder) is trained, with the PatchGAN discriminator,
in one TrainState: params = {"generator": decoder part, "discriminator": …}, optax.multi_transform
giving each its optimizer (the EMA covers the whole tree too; only its generator part is ever
used, and the discriminator is tiny next to the decoder). The checkpoint therefore holds only what trains; the encoder is
rebuilt from its source (model.pretrained, or the seeded random VAE) and fingerprinted, so
`load_finetuned_vae` pairs a decoder with exactly the encoder it was trained against.

Phases (banner comments below): config → mesh → VAE split → data → state (fresh or restored) →
loop. As in the UNet loop (loop.py) the host reads each step's metrics one step late, so it
never waits on the device except at checkpoint and sample boundaries.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sdxl_jax import checkpoint as ckpt_lib
from sdxl_jax import parallel
from sdxl_jax.config import (ConfigError, _choice, _positive, check_buckets, check_devices,
                             check_pretrained)
from sdxl_jax.train import optim
from sdxl_jax.train import vae_losses as L
from sdxl_jax.train.common import (MetricReader, Preemption, ScalarMeans, config_json, demo_images,
                                   package_versions, progress, use_compilation_cache)
from sdxl_jax.train.state import TrainState, create_state, init_state, state_shardings
from sdxl_jax.train.step import CompiledStep

log = logging.getLogger("sdxl_jax.train")

ENCODER_KEYS = ("encoder", "quant_conv")  # frozen
DECODER_KEYS = ("post_quant_conv", "decoder")  # trained
TASK = "vae_decoder"


# ---------------------------------------------------------------------------------------------
# The VAE split and its source
# ---------------------------------------------------------------------------------------------
def split_vae_params(vae_params) -> tuple[dict, dict]:
    """(encoder part, decoder part) of a full VAE parameter tree (no copies)."""
    missing = [k for k in ENCODER_KEYS + DECODER_KEYS if k not in vae_params]
    if missing or len(vae_params) != 4:
        raise ValueError(f"not a VAE parameter tree: top-level keys {sorted(vae_params)}, expected "
                         f"{sorted(ENCODER_KEYS + DECODER_KEYS)}")
    return ({k: vae_params[k] for k in ENCODER_KEYS}, {k: vae_params[k] for k in DECODER_KEYS})


def merge_vae_params(encoder_part: dict, decoder_part: dict) -> dict:
    """The full VAE tree (what export, sampling and the cache builder take)."""
    return {**encoder_part, **decoder_part}


def source_vae_params(config, shardings=None) -> dict:
    """The VAE a run starts from: `model.pretrained`, else the seeded random init.

    Same contract as `sdxl_jax.models.weights.frozen_params` (init_params("vae", preset,
    fold_in(PRNGKey(train.seed), 1))) but without building the text encoders, which decoder
    finetuning never needs. `config` is a ConfigDict or the dict saved in a checkpoint.
    """
    from sdxl_jax.models import init_params
    from sdxl_jax.models.weights import load_pretrained
    preset, pretrained = config["model"]["preset"], config["model"]["pretrained"]
    if pretrained:
        return load_pretrained(pretrained, preset, ("vae",),
                               {"vae": shardings} if shardings is not None else None)["vae"]
    key = jax.random.fold_in(jax.random.PRNGKey(int(config["train"]["seed"])), 1)
    return init_params("vae", preset, key, out_shardings=shardings)


def encoder_fingerprint(encoder_part) -> str | None:
    """sha256 of the frozen encoder (None when its arrays are not all on this host)."""
    from sdxl_jax.data.encode import params_fingerprint
    if not all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(encoder_part)):
        return None
    return params_fingerprint(encoder_part)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
def validate_vae_config(cfg, num_devices: int | None = None) -> None:
    """Raise ConfigError naming the first bad key of a configs/vae_decoder.py config."""
    if cfg.get("task") != TASK:
        raise ConfigError(f"task={cfg.get('task')!r}: the VAE decoder trainer needs task={TASK!r}")
    _choice(cfg, "model.preset", ("sdxl", "tiny"))
    _choice(cfg, "model.dtype", ("bfloat16", "float32", "float16"))
    _choice(cfg, "train.optimizer", optim.OPTIMIZERS)
    _choice(cfg, "train.lr_schedule", optim.LR_SCHEDULES)
    _choice(cfg, "data.buckets.crop", ("random", "center"))
    for key in ("train.steps", "train.global_batch_size", "train.grad_accum_steps", "train.log_every",
                "train.max_nonfinite", "checkpoint.every_steps", "checkpoint.keep", "ema.inv_gamma",
                "ema.power", "ema.every", "disc.channels", "disc.layers", "disc.learning_rate",
                "disc.max_adaptive_weight", "sample.num_images", "sample.image_size",
                "data.read_threads"):
        _positive(cfg, key)
    for key in ("train.learning_rate", "train.warmup_steps", "train.grad_clip", "sample.every_steps",
                "loss.l1_weight", "loss.mse_weight", "loss.perceptual_weight", "disc.weight",
                "disc.start_step", "data.crop_size", "data.prefetch"):
        _positive(cfg, key, allow_zero=True)
    if not 0.0 <= cfg.ema.decay < 1.0:
        raise ConfigError(f"ema.decay={cfg.ema.decay}: must be in [0, 1)")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction}: must be in [0, 1)")
    if not (cfg.loss.l1_weight or cfg.loss.mse_weight or
            (cfg.loss.perceptual_weights and cfg.loss.perceptual_weight)):
        raise ConfigError("loss.l1_weight, loss.mse_weight and the perceptual loss are all off: "
                          "nothing to train the decoder on")
    check_buckets(cfg)
    b, crop = cfg.data.buckets, int(cfg.data.crop_size)
    if crop % 8 or crop > b.min_side:
        raise ConfigError(f"data.crop_size={crop}: must be a multiple of 8 (the VAE's downsampling) "
                          f"and ≤ data.buckets.min_side={b.min_side} (0 = whole buckets)")
    if cfg.sample.image_size % 8:
        raise ConfigError(f"sample.image_size={cfg.sample.image_size}: must be a multiple of 8")
    for key in ("images_dir", "manifest"):
        if cfg.data[key] and not os.path.exists(cfg.data[key]):
            raise ConfigError(f"data.{key}={cfg.data[key]!r}: no such file or directory")
    if cfg.data.images_dir and cfg.data.manifest:
        raise ConfigError("data.images_dir and data.manifest are both set: give one")
    if cfg.loss.perceptual_weights and not os.path.isfile(cfg.loss.perceptual_weights):
        raise ConfigError(f"loss.perceptual_weights={cfg.loss.perceptual_weights!r}: no such file "
                          "(set '' to train without the perceptual loss)")
    check_pretrained(cfg, "finetunes a real SDXL VAE")
    check_devices(cfg, num_devices)


# ---------------------------------------------------------------------------------------------
# Optimizer and step
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossSettings:
    """The static numbers of the step, resolved from the config once."""
    l1_weight: float
    mse_weight: float
    perceptual_weight: float  # 0 when no perceptual weights file is configured
    disc_enabled: bool
    disc_start: int
    disc_weight: float
    max_adaptive_weight: float
    sample_posterior: bool
    ema: Any
    ema_enabled: bool

    @classmethod
    def from_config(cls, cfg):
        return cls(float(cfg.loss.l1_weight), float(cfg.loss.mse_weight),
                   float(cfg.loss.perceptual_weight) if cfg.loss.perceptual_weights else 0.0,
                   bool(cfg.disc.enabled), int(cfg.disc.start_step), float(cfg.disc.weight),
                   float(cfg.disc.max_adaptive_weight), bool(cfg.model.sample_posterior),
                   cfg.ema, bool(cfg.ema.enabled))


def make_vae_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
    """train.* optimizer (with its schedule and clipping) for the decoder, Adam(disc.*) for the
    discriminator; gradient accumulation wraps both, so they step together."""
    gen_cfg = ml_collections.ConfigDict(cfg.train.to_dict())
    gen_cfg.grad_accum_steps = 1
    txs = {"generator": optim.make_optimizer(gen_cfg, total_steps)}
    if cfg.disc.enabled:
        txs["discriminator"] = optax.adam(float(cfg.disc.learning_rate), b1=float(cfg.disc.b1),
                                          b2=float(cfg.disc.b2))
    tx = optax.multi_transform(txs, lambda params: {k: k for k in params})
    if int(cfg.train.grad_accum_steps) > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=int(cfg.train.grad_accum_steps))
    return tx


def _last_layer(decoder_grads):
    """The decoder's last layer (taming's `last_layer`): the RGB output conv's kernel."""
    return decoder_grads["decoder"]["conv_out"]["kernel"]


def make_vae_train_step(vae, tx: optax.GradientTransformation, ls: LossSettings):
    """`train_step(state, frozen, batch) -> (state, metrics)`; frozen = {"encoder": encoder part,
    "perceptual": net (when used)}, batch = {"images": (B, H, W, 3) in [−1, 1]}."""
    from sdxl_jax.models import vae_decode, vae_encode

    def train_step(state: TrainState, frozen, batch):
        x = batch["images"]
        rng, k_z = jax.random.split(state.rng)
        mean, std = vae_encode(vae, frozen["encoder"], x)
        z = mean + std * jax.random.normal(k_z, mean.shape) if ls.sample_posterior else mean
        z = jax.lax.stop_gradient(z)  # the encoder is frozen: no gradient reaches it
        # one decoder forward; its pull-back serves the adaptive weight and the update
        y, pull = jax.vjp(lambda g: vae_decode(vae, g, z), state.params["generator"])

        def rec_loss(y):
            l1, mse = L.pixel_losses(x, y)
            parts = {"l1": jnp.mean(l1), "mse": jnp.mean(mse)}
            total = ls.l1_weight * parts["l1"] + ls.mse_weight * parts["mse"]
            if ls.perceptual_weight:
                parts["perceptual"] = jnp.mean(L.perceptual_distance(frozen["perceptual"], x, y))
                total = total + ls.perceptual_weight * parts["perceptual"]
            return total, parts

        (rec, parts), g_rec = jax.value_and_grad(rec_loss, has_aux=True)(y)
        metrics = dict(parts, rec_loss=rec)
        grads, loss, cotangent, d_loss = {}, rec, g_rec, jnp.zeros((), jnp.float32)
        if ls.disc_enabled:
            active = state.step >= ls.disc_start
            d_loss, d_grads, g_loss, g_gan, real, fake = L.gan_losses(
                state.params["discriminator"], x, y)
            weight = jnp.where(active, ls.disc_weight * L.last_layer_weight(
                pull, g_rec, g_gan, _last_layer, ls.max_adaptive_weight), 0.0)
            gan_term = jnp.where(active, weight * g_loss, 0.0)  # exactly 0 during the warm-up
            cotangent = g_rec + weight * g_gan
            d_loss = jnp.where(active, d_loss, 0.0)
            grads["discriminator"] = jax.tree.map(lambda g: jnp.where(active, g, 0.0), d_grads)
            loss = rec + gan_term
            metrics.update(gan_term=gan_term, disc_loss=d_loss, gan_weight=weight,
                           logits_real=real, logits_fake=fake)
        grads["generator"] = pull(cotangent)[0]
        grad_norm = optax.global_norm(grads["generator"])
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        step = state.step + 1
        ema = optim.ema_update(state.ema_params, params, step, ls.ema) if ls.ema_enabled \
            else state.ema_params

        # Non-finite guard (as in the UNet step): a NaN/Inf leaves params, EMA and optimizer
        # state untouched; the RNG still advances.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(d_loss)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = TrainState(
            step=jnp.where(finite, step, state.step), params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state), ema_params=keep(ema, state.ema_params),
            rng=rng, nonfinite=jnp.where(finite, 0, state.nonfinite + 1).astype(jnp.int32))
        metrics.update(loss=loss, grad_norm=grad_norm, finite=finite)
        return new_state, metrics

    return train_step


# ---------------------------------------------------------------------------------------------
# Reconstruction samples and held-out error
# ---------------------------------------------------------------------------------------------
class ReconEvaluator:
    """Held-out reconstruction error (EMA and raw decoder) and an input | reconstruction PNG grid
    (EMA) under <workdir>/samples and in TensorBoard. One compiled function, fixed images."""

    def __init__(self, workdir, vae, mesh, encoder, images: np.ndarray, keys, writer):
        from sdxl_jax.models import vae_decode, vae_encode
        self.workdir, self.writer, self.encoder, self.keys = workdir, writer, encoder, keys
        self.images = jax.device_put(images, parallel.replicated(mesh))
        self._host_images = images

        def recon(enc, gen, x):
            y = vae_decode(vae, gen, vae_encode(vae, enc, x)[0])
            l1, mse = L.pixel_losses(x, y)
            return y, l1, mse
        # replicated outputs: every host can read the whole reconstruction
        self._fn = jax.jit(recon, out_shardings=parallel.replicated(mesh))

    def reconstruct(self, generator):
        y, l1, mse = jax.device_get(self._fn(self.encoder, generator, self.images))
        return np.asarray(y), np.asarray(l1), np.asarray(mse)

    def __call__(self, step: int, state) -> dict:
        from sdxl_jax.sample import make_grid, save_png, to_uint8
        out = {}
        trees = {"ema": state.ema_params["generator"], "raw": state.params["generator"]}
        for name, gen in trees.items():
            y, l1, mse = self.reconstruct(gen)
            out[f"val_{name}/l1"] = float(l1.mean())
            out[f"val_{name}/mse"] = float(mse.mean())
            out[f"val_{name}/psnr"] = float(np.mean(10 * np.log10(4.0 / np.maximum(mse, 1e-12))))
            if name == "ema":
                pairs = np.stack([self._host_images, np.clip(y, -1, 1)], axis=1)  # (n, 2, H, W, 3)
                grid = make_grid(to_uint8(pairs.reshape(-1, *pairs.shape[2:])), len(y), 2)
        path = os.path.join(self.workdir, "samples", f"recon_{step:07d}.png")
        if jax.process_index() == 0:
            save_png(grid, path)
            if self.writer is not None:
                self.writer.add_image("recon/ema", grid, step, dataformats="HWC")
                for k, v in out.items():
                    self.writer.add_scalar(k, v, step)
        log.info("step %d | held-out reconstruction: ema l1 %.4f mse %.5f psnr %.2f dB, raw mse "
                 "%.5f | %s", step, out["val_ema/l1"], out["val_ema/mse"], out["val_ema/psnr"],
                 out["val_raw/mse"], path)
        return out


# ---------------------------------------------------------------------------------------------
# Train
# ---------------------------------------------------------------------------------------------
def _data_source(cfg, workdir: str) -> tuple[str | None, str | None]:
    """(images_dir, manifest); the tiny preset falls back to the generated demo dataset."""
    if cfg.data.images_dir or cfg.data.manifest:
        return cfg.data.images_dir or None, cfg.data.manifest or None
    if cfg.model.preset != "tiny":
        raise FileNotFoundError("no training images: set data.images_dir (a folder of images) or "
                                "data.manifest (JSONL of {\"path\", \"caption\"})")
    return demo_images(cfg, workdir), None


def train_vae_decoder(cfg, workdir: str, max_steps: int | None = None,
                      metrics_log: list | None = None) -> dict:
    """Finetune (or resume finetuning) the VAE decoder in `workdir`; returns a summary.

    Summary keys: start_step, end_step, stopped ("done" | "preempted"), compiles (train-step
    shapes compiled), losses, eval ({step: held-out metrics}), state, encoder. `max_steps`
    stops early after a checkpoint (as a preemption would); `metrics_log`, when given, collects
    (step, host metrics) for every step.
    """
    from sdxl_jax import models
    from sdxl_jax.data.pixels import make_pixel_iterator, square_images

    validate_vae_config(cfg, jax.device_count())
    os.makedirs(workdir, exist_ok=True)
    use_compilation_cache(workdir)
    with contextlib.ExitStack() as cleanup:  # closes whatever was opened, on any exit
        is_main = jax.process_index() == 0

        # ---- mesh, VAE split ---------------------------------------------------------------------
        mesh = parallel.make_mesh(cfg.mesh)
        if cfg.train.global_batch_size % parallel.data_parallel_size(mesh):
            raise ValueError(f"train.global_batch_size={cfg.train.global_batch_size} is not divisible "
                             f"by the {parallel.data_parallel_size(mesh)} data-parallel devices")
        preset = cfg.model.preset
        vae = models.build_vae(preset, cfg.model.dtype)
        vae_sh = parallel.param_shardings(models.abstract_params("vae", preset), mesh, cfg.mesh.min_fsdp_size)
        encoder, decoder = split_vae_params(source_vae_params(cfg, vae_sh))
        frozen = {"encoder": encoder}
        frozen_sh = {"encoder": split_vae_params(vae_sh)[0]}
        if cfg.loss.perceptual_weights:
            perceptual = L.load_perceptual(cfg.loss.perceptual_weights)
            frozen_sh["perceptual"] = parallel.param_shardings(perceptual, mesh, cfg.mesh.min_fsdp_size)
            frozen["perceptual"] = jax.device_put(perceptual, frozen_sh["perceptual"])
        fingerprint = encoder_fingerprint(encoder)

        # ---- data --------------------------------------------------------------------------------
        images_dir, manifest = _data_source(cfg, workdir)
        it = make_pixel_iterator(cfg, images_dir, manifest, jax.process_index(), jax.process_count(),
                                 int(cfg.train.global_batch_size), parallel.data_parallel_size(mesh))
        cleanup.callback(it.close)

        # ---- state -------------------------------------------------------------------------------
        total_steps = int(cfg.train.steps)
        tx = make_vae_optimizer(cfg, total_steps)
        rng = jax.random.PRNGKey(cfg.train.seed)
        trainable = {"generator": decoder}
        if cfg.disc.enabled:
            trainable["discriminator"] = L.init_discriminator(
                [int(cfg.train.seed), 0xD15C], int(cfg.disc.channels), int(cfg.disc.layers))
        abstract_state = jax.eval_shape(lambda p, r: create_state(p, tx, r), trainable, rng)
        shardings = state_shardings(abstract_state, mesh, cfg.mesh.min_fsdp_size)
        ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint.keep,
                                     cfg.checkpoint.async_save)
        cleanup.callback(ckpt.close)  # waits for a pending async save
        restored = ckpt.restore_latest_good(ckpt_lib.abstract_with_shardings(abstract_state, shardings)) \
            if ckpt.steps else None
        if restored is not None:
            saved = restored.meta.get("encoder_fingerprint")
            if saved and fingerprint and saved != fingerprint:
                raise ValueError(f"the checkpoints in {ckpt.directory} were trained against another "
                                 f"encoder (fingerprint {saved}, now {fingerprint}): model.pretrained or "
                                 "train.seed changed; use a new workdir")
            state = restored.state
            it.set_state(restored.data_state["iterator"])
            log.info("resumed from step %d in %s", restored.step, ckpt.directory)
        else:
            if cfg.disc.enabled:
                trainable["discriminator"] = jax.device_put(trainable["discriminator"],
                                                            shardings.params["discriminator"])
            state = init_state(trainable, tx, jax.random.fold_in(rng, 99), shardings)
        del trainable, decoder
        step_fn = CompiledStep(make_vae_train_step(vae, tx, LossSettings.from_config(cfg)), shardings,
                               frozen_sh, mesh)
        meta = {"task": TASK, "versions": package_versions(), "model_preset": preset,
                "source_vae": cfg.model.pretrained or f"random init (train.seed={cfg.train.seed})",
                "encoder_fingerprint": fingerprint, "data_skipped": len(it.skipped)}
        cfg_json = config_json(cfg)

        # ---- logging -----------------------------------------------------------------------------
        writer = None
        if is_main:
            from tensorboardX import SummaryWriter
            writer = SummaryWriter(os.path.join(workdir, "tb"))
            cleanup.callback(writer.close)
        evaluator = None
        if cfg.sample.every_steps:
            images, keys = square_images(it.held_out, int(cfg.sample.num_images),
                                         int(cfg.sample.image_size), int(cfg.data.max_image_pixels))
            evaluator = ReconEvaluator(workdir, vae, mesh, encoder, images, keys, writer)
            meta["held_out"] = keys
        schedule_fn = optim.learning_rate_schedule(cfg.train, total_steps)
        preempt = Preemption()
        cleanup.callback(preempt.restore)

        step = int(jax.device_get(state.step))
        stop_at = total_steps if max_steps is None else min(total_steps, max_steps)
        summary = {"start_step": step, "losses": [], "eval": {}, "compiles": 0, "stopped": "done"}
        pending = None  # (step, metrics) of the last dispatched step, read one step late
        acc = ScalarMeans()
        pbar = progress(is_main, step, stop_at)
        if pbar is not None:
            cleanup.callback(pbar.close)
        read_metrics = MetricReader(
            cfg, acc, ckpt, schedule_fn, writer, pbar, is_main, stop_at, summary["losses"],
            lambda s, o: (f"step {s} | loss {o.get('loss', np.nan):.4f} | l1 {o.get('l1', np.nan):.4f} | "
                          f"mse {o.get('mse', np.nan):.5f} | gan {o.get('gan_term', 0.0):.4f} | "
                          f"disc {o.get('disc_loss', 0.0):.4f} | grad_norm {o.get('grad_norm', np.nan):.3f} | "
                          f"lr {o['lr']:.2e} | {o['steps_per_s']:.2f} steps/s | skipped {o['nonfinite']}"),
            lr_hint="train.learning_rate / disc.learning_rate",
            host=lambda m: {k: float(v) if k != "finite" else bool(v) for k, v in m.items()},
            metrics_log=metrics_log)

        def save(s):
            ckpt.save(s, state, {"iterator": it.get_state()}, cfg_json, meta)

        def evaluate(s):
            summary["eval"][s] = evaluator(s, state)

        # ---- loop --------------------------------------------------------------------------------
        if evaluator is not None and step == 0:
            evaluate(0)  # the "before" figure of a fresh run
        while step < stop_at:
            batch = parallel.global_batch(next(it), mesh)
            state, metrics = step_fn(state, frozen, batch)
            step += 1
            if pending is not None:
                read_metrics(*pending)
            pending = (step, metrics)
            saved = step % cfg.checkpoint.every_steps == 0 or step == stop_at
            if saved:
                save(step)
            if evaluator is not None and step % cfg.sample.every_steps == 0:
                evaluate(step)
            if preempt.should_stop(step):
                if not saved:
                    save(step)
                summary["stopped"] = "preempted"
                break
        if pending is not None:
            read_metrics(*pending)
        summary.update(end_step=step, compiles=step_fn.compile_count, state=state, encoder=encoder)
        return summary


# ---------------------------------------------------------------------------------------------
# Using the result
# ---------------------------------------------------------------------------------------------
def load_finetuned_vae(workdir: str, step: int | None = None, weights: str = "ema") -> dict:
    """Full VAE params (frozen encoder from the run's source + the trained decoder) of a decoder
    finetuning run, on one device: a drop-in for `frozen_params(config)["vae"]` in export or
    sampling. `weights` is "ema" (default) or "raw"; `step` defaults to the latest checkpoint."""
    from sdxl_jax import models
    from sdxl_jax.sample import resolve_checkpoint
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    ckdir, step = resolve_checkpoint(workdir, None, step)
    ck = ckpt_lib.Checkpointer(ckdir, async_save=False)
    try:
        cfg = ck.read_json(step, "config")
        if cfg.get("task") != TASK:
            raise ValueError(f"{workdir} is not a VAE decoder run (its config has task="
                             f"{cfg.get('task')!r}); give the workdir of configs/vae_decoder.py")
        if weights == "ema" and not cfg["ema"]["enabled"]:
            raise ValueError("this run trained with ema.enabled=False, so its EMA weights are the "
                             "initial ones; use weights='raw'")
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        _, dec_abstract = split_vae_params(models.abstract_params("vae", cfg["model"]["preset"]))
        abstract = {"generator": jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), dec_abstract)}
        tree, _, meta = ck.restore_params(step, abstract, "ema_params" if weights == "ema" else "params")
    finally:
        ck.close()
    encoder, _ = split_vae_params(source_vae_params(cfg))
    saved, now = meta.get("encoder_fingerprint"), encoder_fingerprint(encoder)
    if saved and saved != now:
        source = cfg["model"]["pretrained"] or "the seeded random init"
        raise ValueError(f"the encoder rebuilt from the run's source ({source}) is not the one the "
                         f"decoder was trained against (fingerprint {now} ≠ {saved}): the "
                         "pretrained weights changed since training")
    log.info("loaded the finetuned VAE decoder (%s weights, step %d) from %s", weights, step, ckdir)
    return merge_vae_params(encoder, tree["generator"])
