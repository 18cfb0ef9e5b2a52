"""The VAE task, as a `loop.Task`: NAI-v3 decoder finetuning (METHODS §11), or training the
whole VAE (encoder and decoder) for a new, small latent space.

Decoder finetuning (`model.train_encoder=False`, the recipe): the VAE tree is split in two. The
encoder part (encoder + quant_conv) is frozen — sharded on the mesh, passed to the step as a
constant, never in the optimizer or the checkpoint — and the decoder part (post_quant_conv +
decoder) trains, with the PatchGAN discriminator, in one TrainState: params = {"generator":
decoder part, "discriminator": …}, optax.multi_transform giving each its optimizer. The
checkpoint holds only what trains; the encoder is rebuilt from its source (model.pretrained, or
the seeded random VAE) and fingerprinted, so a decoder is only ever paired with the encoder it
was trained against.

Whole-VAE training (`model.train_encoder=True`): the generator is the full VAE tree, the latent
is sampled from the posterior and a KL term (`loss.kl_weight`, [ours] 1e-6) keeps it near
N(0, I). For the demo's tiny latent space and anyone training a VAE from nothing; the SDXL recipe
stays decoder-only.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sdxl_jax import parallel
from sdxl_jax.models.vae_parts import encoder_fingerprint, merge_vae_params, split_vae_params
from sdxl_jax.train import optim
from sdxl_jax.train import vae_losses as L
from sdxl_jax.run_inputs import RunInputs
from sdxl_jax.train.common import config_json, package_versions
from sdxl_jax.train.program import ProgramSpec, cached_program
from sdxl_jax.train.state import init_state
from sdxl_jax.train.task import Stage, Task
from sdxl_jax.train.update import per_sample_keys

log = logging.getLogger("sdxl_jax.train")

TASK = "vae_decoder"


# ---------------------------------------------------------------------------------------------
# Loss and optimizer
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
    train_encoder: bool
    kl_weight: float

    @classmethod
    def from_config(cls, cfg):
        return cls(float(cfg.loss.l1_weight), float(cfg.loss.mse_weight),
                   float(cfg.loss.perceptual_weight) if cfg.loss.perceptual_weights else 0.0,
                   bool(cfg.disc.enabled), int(cfg.disc.start_step), float(cfg.disc.weight),
                   float(cfg.disc.max_adaptive_weight),
                   bool(cfg.model.sample_posterior or cfg.model.train_encoder),
                   bool(cfg.model.train_encoder), float(cfg.loss.kl_weight))


def make_vae_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
    """train.* optimizer (with its schedule and clipping) for the generator, Adam(disc.*) for the
    discriminator; one update of both per optimizer step."""
    txs = {"generator": optim.make_optimizer(cfg.train, total_steps)}
    if cfg.disc.enabled:
        txs["discriminator"] = optax.adam(float(cfg.disc.learning_rate), b1=float(cfg.disc.b1),
                                          b2=float(cfg.disc.b2))
    return optax.multi_transform(txs, lambda params: {k: k for k in params})


def _last_layer(generator_grads):
    """The decoder's last layer (taming's `last_layer`): the RGB output conv's kernel."""
    return generator_grads["decoder"]["conv_out"]["kernel"]


def vae_grad_fn(vae, ls: LossSettings):
    """`grad_fn(params, frozen, micro_batch, ctx) -> (loss, grads, metrics)` (train/update.py);
    frozen = {"encoder": encoder part (decoder finetuning), "perceptual": net (when used)},
    batch = {"images": (B, H, W, 3) in [−1, 1]}."""
    from sdxl_jax.models import vae_decode, vae_encode

    def grad_fn(params, frozen, batch, ctx):
        x = batch["images"]
        pixels = x.shape[1] * x.shape[2] * x.shape[3]

        def encode(encoder):
            mean, std = vae_encode(vae, encoder, x)
            if not ls.sample_posterior:
                return mean, mean, std
            noise = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:]))(per_sample_keys(ctx))
            return mean + std * noise, mean, std

        if not ls.train_encoder:  # the encoder is frozen: no gradient reaches it
            z_frozen = jax.lax.stop_gradient(encode(frozen["encoder"])[0])

        def generate(gen):  # generator params → (reconstruction, KL of the posterior)
            if not ls.train_encoder:
                return vae_decode(vae, gen, z_frozen), jnp.zeros((), jnp.float32)
            enc, dec = split_vae_params(gen)
            z, mean, std = encode(enc)
            return vae_decode(vae, dec, z), jnp.mean(L.kl_loss(mean, std, pixels))

        # one generator forward; its pull-back serves the adaptive weight and the update
        (y, kl), pull = jax.vjp(generate, params["generator"])
        pull_y = lambda ct: pull((ct, jnp.zeros_like(kl)))  # noqa: E731  (∂/∂gen through y only)

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
        kl_weight = ls.kl_weight if ls.train_encoder else 0.0
        if ls.train_encoder:
            metrics["kl"] = kl
        grads, loss, cotangent = {}, rec + kl_weight * kl, g_rec
        d_loss = jnp.zeros((), jnp.float32)
        if ls.disc_enabled:
            active = ctx.step >= ls.disc_start
            d_loss, d_grads, g_loss, g_gan, real, fake = L.gan_losses(params["discriminator"], x, y)
            last = lambda g: _last_layer(split_vae_params(g)[1] if ls.train_encoder else g)  # noqa: E731
            weight = jnp.where(active, ls.disc_weight * L.last_layer_weight(
                pull_y, g_rec, g_gan, last, ls.max_adaptive_weight), 0.0)
            gan_term = jnp.where(active, weight * g_loss, 0.0)  # exactly 0 during the warm-up
            cotangent = g_rec + weight * g_gan
            d_loss = jnp.where(active, d_loss, 0.0)
            grads["discriminator"] = jax.tree.map(lambda g: jnp.where(active, g, 0.0), d_grads)
            loss = loss + gan_term
            metrics.update(gan_term=gan_term, disc_loss=d_loss, gan_weight=weight,
                           logits_real=real, logits_fake=fake)
        grads["generator"] = pull((cotangent, jnp.asarray(kl_weight, kl.dtype)))[0]
        metrics["finite_disc"] = d_loss  # the update's non-finite guard checks it too
        return loss, grads, metrics

    return grad_fn


def program_spec(cfg, total_steps: int | None = None, perceptual=None) -> ProgramSpec:
    """The VAE task's step from the config (`perceptual`: the loaded net when configured)."""
    from sdxl_jax import models
    preset = cfg.model.preset
    vae = models.build_vae(preset, cfg.model.dtype)
    ls = LossSettings.from_config(cfg)
    enc_abs, dec_abs = split_vae_params(models.abstract_params("vae", preset))
    trained = {"generator": merge_vae_params(enc_abs, dec_abs) if ls.train_encoder else dec_abs}
    if cfg.disc.enabled:
        trained["discriminator"] = jax.eval_shape(lambda: L.init_discriminator(
            [int(cfg.train.seed), 0xD15C], int(cfg.disc.channels), int(cfg.disc.layers)))
    frozen = {} if ls.train_encoder else {"encoder": enc_abs}
    if perceptual is not None:
        frozen["perceptual"] = jax.eval_shape(lambda: perceptual)

    def batch_spec(rows, height, width):
        return {"images": jax.ShapeDtypeStruct((rows, height, width, 3), jnp.float32)}

    return ProgramSpec(
        name=TASK, abstract_params=trained, abstract_frozen=frozen,
        tx=make_vae_optimizer(cfg, int(total_steps or cfg.train.steps)),
        make_grad_fn=lambda _: vae_grad_fn(vae, ls), ema=cfg.ema,
        per_device_batch=int(cfg.train.per_device_batch_size), batch_spec=batch_spec,
        norm_of=lambda g: g["generator"])


# ---------------------------------------------------------------------------------------------
# Reconstruction samples and held-out error
# ---------------------------------------------------------------------------------------------
class ReconEvaluator:
    """Held-out reconstruction error (EMA and raw weights) and an input | reconstruction PNG grid
    (EMA) under <workdir>/samples and in TensorBoard. One compiled function, fixed images."""

    def __init__(self, workdir, vae, mesh, encoder, images: np.ndarray, keys):
        from sdxl_jax.models import vae_decode, vae_encode
        self.workdir, self.encoder, self.keys = workdir, encoder, keys
        self.images = jax.device_put(images, parallel.replicated(mesh))
        self._host_images = images

        def recon(enc, dec, x):
            y = vae_decode(vae, dec, vae_encode(vae, enc, x)[0])
            l1, mse = L.pixel_losses(x, y)
            return y, l1, mse
        # replicated outputs: every host can read the whole reconstruction
        self._fn = jax.jit(recon, out_shardings=parallel.replicated(mesh))

    def reconstruct(self, generator):
        enc, dec = split_vae_params(generator) if self.encoder is None else (self.encoder, generator)
        y, l1, mse = jax.device_get(self._fn(enc, dec, self.images))
        return np.asarray(y), np.asarray(l1), np.asarray(mse)

    def __call__(self, step: int, state, writer=None) -> dict:
        from sdxl_jax.grid import make_grid, save_png, to_uint8
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
            if writer is not None:
                writer.add_image("recon/ema", grid, step, dataformats="HWC")
                for k, v in out.items():
                    writer.add_scalar(k, v, step)
        log.info("step %d | held-out reconstruction: ema l1 %.4f mse %.5f psnr %.2f dB, raw mse "
                 "%.5f | %s", step, out["val_ema/l1"], out["val_ema/mse"], out["val_ema/psnr"],
                 out["val_raw/mse"], path)
        return out


# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------
def _log_line(s: int, o: dict) -> str:
    kl = f" | kl {o['kl']:.2f}" if "kl" in o else ""
    return (f"step {s} | loss {o.get('loss', np.nan):.4f} | l1 {o.get('l1', np.nan):.4f} | "
            f"mse {o.get('mse', np.nan):.5f}{kl} | gan {o.get('gan_term', 0.0):.4f} | "
            f"disc {o.get('disc_loss', 0.0):.4f} | grad_norm {o.get('grad_norm', np.nan):.3f} | "
            f"lr {o['lr']:.2e} | {o['steps_per_s']:.2f} steps/s | skipped {o['nonfinite']}")


def build(cfg, inputs: RunInputs, plan: parallel.ShardingPlan, cleanup: contextlib.ExitStack) -> Task:
    """The task from the config and the run's resolved inputs (its images, its source VAE)."""
    from sdxl_jax import models
    from sdxl_jax.data.pixels import make_pixel_iterator, square_images

    workdir = inputs.workdir
    preset, total_steps = cfg.model.preset, int(cfg.train.steps)
    perceptual = L.load_perceptual(cfg.loss.perceptual_weights) if cfg.loss.perceptual_weights else None
    shapes = jax.tree.map(lambda x: [list(x.shape), str(x.dtype)], perceptual)
    program = cached_program(["vae_decoder", config_json(cfg), total_steps, shapes],
                             lambda: program_spec(cfg, total_steps, perceptual), plan)
    train_encoder = bool(cfg.model.train_encoder)

    vae_sh = plan.shardings(models.abstract_params("vae", preset))
    source = inputs.weights.load(("vae",), {"vae": vae_sh})["vae"]
    encoder, decoder = split_vae_params(source)
    frozen = {} if train_encoder else {"encoder": encoder}
    if perceptual is not None:
        frozen["perceptual"] = jax.device_put(perceptual, program.frozen_shardings["perceptual"])
    fingerprint = None if train_encoder else encoder_fingerprint(encoder)

    images_dir, manifest = inputs.images_dir or None, inputs.manifest or None
    multiple = program.micro_rows or plan.data_parallel

    def open_pixels():
        return make_pixel_iterator(cfg, images_dir, manifest, jax.process_index(), jax.process_count(),
                                   int(cfg.train.global_batch_size), multiple)

    probe = open_pixels()  # the held-out split and the skip count, known before training
    cleanup.callback(probe.close)
    rng = jax.random.PRNGKey(cfg.train.seed)

    def fresh_state():
        trainable = {"generator": source if train_encoder else decoder}
        if cfg.disc.enabled:
            trainable["discriminator"] = jax.device_put(L.init_discriminator(
                [int(cfg.train.seed), 0xD15C], int(cfg.disc.channels), int(cfg.disc.layers)),
                program.shardings.params["discriminator"])
        return init_state(trainable, program.spec.tx, jax.random.fold_in(rng, 99), program.shardings)

    def check_restored(restored):
        saved = restored.meta.get("encoder_fingerprint")
        if saved and fingerprint and saved != fingerprint:
            raise ValueError(f"the checkpoints in {os.path.join(workdir, 'checkpoints')} were trained "
                             f"against another encoder (fingerprint {saved}, now {fingerprint}): "
                             "model.pretrained or train.seed changed; use a new workdir")

    vae = models.build_vae(preset, cfg.model.dtype)
    meta = {"task": TASK, "versions": package_versions(), "model_preset": preset,
            "train_encoder": train_encoder,
            "source_vae": cfg.model.pretrained or f"random init (train.seed={cfg.train.seed})",
            "encoder_fingerprint": fingerprint, "data_skipped": len(probe.skipped)}
    evaluate = None
    if cfg.sample.every_steps:
        images, keys = square_images(probe.held_out, int(cfg.sample.num_images),
                                     int(cfg.sample.image_size), int(cfg.data.max_image_pixels))
        evaluate = ReconEvaluator(workdir, vae, plan.mesh, None if train_encoder else encoder,
                                  images, keys)
        meta["held_out"] = keys

    return Task(
        name=TASK, program=program, stages=(Stage(0, total_steps, lambda: probe),),
        frozen=frozen, fresh_state=fresh_state,
        lr_schedule=optim.learning_rate_schedule(cfg.train, total_steps), log_line=_log_line,
        metadata=meta, lr_hint="train.learning_rate / disc.learning_rate",
        check_restored=check_restored, evaluate=evaluate, eval_every=int(cfg.sample.every_steps),
        eval_at_start=True, summary={"encoder": encoder})

