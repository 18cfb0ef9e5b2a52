"""In-training evaluation: preview grids (EMA weights) and a deterministic validation loss.

A preview that fails (any error: a bad prompt setting, device memory, a full disk) is logged
as one warning and training goes on; previews are a view of the run, not part of it.

Validation uses fixed timesteps, noise and captions, so curves are comparable across runs and
resumes: sample j of validation batch b gets t = (b·B + j)·T/N_val spread over [0, T) and noise
from PRNGKey(b). Both EMA and raw weights are evaluated with the same compiled function.
"""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from sdxl_jax import parallel
from sdxl_jax.train.step import NUM_T_BINS, StepConfig, per_sample_loss, text_conditioning, timestep_bins

log = logging.getLogger("sdxl_jax.train")

VAL_SEED = 1234


def make_eval_loss(unet, text_l, text_g, sc: StepConfig):
    """`eval_loss(params, frozen, batch, t, eps) -> (B,) losses` with the train step's loss."""
    from sdxl_jax.models import unet_apply

    def eval_loss(params, frozen, batch, t, eps):
        context, pooled = text_conditioning(text_l, text_g, frozen, batch, sc.max_chunks)

        def predict_v(z, tt):
            return unet_apply(unet, params, z, tt, context, pooled, batch["time_ids"])
        return per_sample_loss(predict_v, sc, batch, t, eps)

    return jax.jit(eval_loss)


def fixed_timesteps(batch_index: int, batch_size: int, num_batches: int, num_steps: int) -> np.ndarray:
    n_total = max(batch_size * num_batches, 1)
    pos = batch_index * batch_size + np.arange(batch_size)
    return np.minimum((pos * num_steps) // n_total, num_steps - 1).astype(np.int32)


class Evaluator:
    def __init__(self, cfg, workdir, mesh, unet, text_l, text_g, sc: StepConfig, frozen_all,
                 tokenize_fn, cache_dir, mean, std, writer, view=None):
        """`view(trained tree) -> (UNet params, {"text_l", "text_g"})`: where a run's weights come
        from (default: the tree is the UNet, the text encoders those of `frozen_all`)."""
        self.cfg, self.workdir, self.mesh, self.sc, self.writer = cfg, workdir, mesh, sc, writer
        # the frozen encoders only: a trained one (train.trainable="unet+text") comes from `view`
        self.frozen_text = {k: frozen_all[k] for k in ("text_l", "text_g") if k in frozen_all}
        self.view = view or (lambda tree: (tree, self.frozen_text))
        self.eval_loss = make_eval_loss(unet, text_l, text_g, sc)
        self.tokenize_fn, self.cache_dir = tokenize_fn, cache_dir
        self._val_batches = None
        from sdxl_jax.sampling import ImageSampler, SampleSettings
        from sdxl_jax import prompts
        self.sampler = ImageSampler(cfg, frozen_all, mean, std)
        self.settings = SampleSettings.from_config(cfg.sample)
        # sample.prompts_file (kohya's format, sizes snapped to buckets) or prompts × seeds
        self.jobs = prompts.preview_jobs(cfg.sample, prompts.config_buckets(cfg))

    def _validation_batches(self):
        """The first `sample.val_batches` held-out batches, read once and kept on the host."""
        if self._val_batches is None:
            from sdxl_jax.data import make_val_iterator
            it = make_val_iterator(self.cfg, self.cache_dir, self.tokenize_fn, jax.process_index(),
                                   jax.process_count(), self.cfg.train.global_batch_size,
                                   parallel.data_parallel_size(self.mesh))
            self._val_batches = []
            for _, b in zip(range(int(self.cfg.sample.val_batches)), it):
                self._val_batches.append(b)
            it.close()
        return self._val_batches

    def validation(self, step: int, params_by_name: dict) -> dict:
        batches = self._validation_batches()
        if not batches:
            return {}
        out = {}
        T = self.sc.alphas_cumprod.shape[0]
        for name, tree in params_by_name.items():
            params, text = self.view(tree)
            tot, cnt = np.zeros(NUM_T_BINS), np.zeros(NUM_T_BINS)
            for b, local in enumerate(batches):
                batch = parallel.global_batch(local, self.mesh)
                B = batch["latents"].shape[0]
                t = fixed_timesteps(b, B, len(batches), T)
                eps = jax.random.normal(jax.random.PRNGKey(VAL_SEED + b), batch["latents"].shape)
                losses = np.asarray(jax.device_get(self.eval_loss(params, text, batch,
                                                                  jnp.asarray(t), eps)))
                onehot = np.asarray(timestep_bins(jnp.asarray(t), T))
                tot += losses @ onehot
                cnt += onehot.sum(0)
            out[f"val_{name}/loss"] = float(tot.sum() / max(cnt.sum(), 1))
            width = T // NUM_T_BINS
            for i in np.nonzero(cnt)[0]:
                out[f"val_{name}/loss_t{i * width:03d}-{(i + 1) * width - 1:03d}"] = float(tot[i] / cnt[i])
        return out

    def previews(self, step: int, ema_tree) -> str:
        from sdxl_jax import prompts
        from sdxl_jax.grid import save_png
        unet_params, text = self.view(ema_tree)
        grid = prompts.render_grid(self.sampler, unet_params, self.jobs, text_params=text)
        path = os.path.join(self.workdir, "samples", f"step_{step:07d}.png")
        if jax.process_index() == 0:
            save_png(grid, path)
            if self.writer is not None:
                self.writer.add_image("samples/ema", grid, step, dataformats="HWC")
        return path

    def __call__(self, step: int, state, writer=None) -> None:
        if writer is not None:
            self.writer = writer
        metrics = self.validation(step, {"ema": state.ema_params, "raw": state.params})
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)
        if metrics:
            log.info("step %d | validation loss: ema %.4f, raw %.4f", step,
                     metrics.get("val_ema/loss", float("nan")), metrics.get("val_raw/loss", float("nan")))
        try:
            path = self.previews(step, state.ema_params)
        except Exception as e:  # noqa: BLE001 — a picture is never worth the run
            log.warning("step %d | preview failed, training goes on: %s: %s", step,
                        type(e).__name__, str(e)[:500])
            return
        log.info("step %d | preview grid %s", step, path)
