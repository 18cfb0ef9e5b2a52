"""Sample images from a trained run with the ZTSNR-aware samplers (METHODS §4, §5).

    python -m sdxl_jax.sample --workdir runs/demo --prompt "completely black" \
        --width 256 --height 256 --steps 28 --cfg 5 --sampler euler --seed 0 --out black.png

EMA weights by default (`--weights raw` for the trained params). Several --prompt / --seed values
make a grid: one row per prompt, one column per seed. Latents are decoded with the VAE after
undoing the checkpoint's own latent normalisation (scale or per-channel statistics).

Every model is the run's as trained (`runs.Run.params`: trained text encoders, a LoRA run's
adapters merged). `--lora FILE` (a kohya / A1111 / ComfyUI or diffusers / PEFT .safetensors)
merges one more adapter into them at `--lora-scale S` (W + S·ΔW in float32, METHODS §14).

Images are sampled in batches of at most `--batch-size` (prompts with the same settings share a
batch). `--out DIR/` (a trailing slash, or an existing folder) writes one PNG per image,
`<row>-s<seed>.png` (row: the prompt file's line, or the --prompt's position), as each batch
finishes, so a long prompt file is a long run that keeps what it has drawn; any other --out is
one grid PNG written at the end.

Without --step the newest step is read; when a trainer rotates it away mid-read
(checkpoint.keep), the then newest step is read instead.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import jax
import numpy as np

from sdxl_jax import cli
from sdxl_jax.grid import make_grid, save_png, to_uint8  # noqa: F401 (re-exported)
from sdxl_jax.sampling import (ImageSampler, SampleSettings, check_settings,  # noqa: F401 (re-exported)
                               size_multiple)
from sdxl_jax.diffusion import samplers
from sdxl_jax.prompts import DEFAULT_BATCH, PromptJob, check_seed

log = logging.getLogger("sdxl_jax.sample")


def _open(workdir, checkpoint, step):
    from sdxl_jax import paths
    from sdxl_jax.runs import open_run
    if checkpoint:
        path = paths.absolute(checkpoint.rstrip("/"))
        if not os.path.basename(path).isdigit() or not paths.isdir(path):
            raise FileNotFoundError(f"--checkpoint {path!r} is not a checkpoint step directory "
                                    f"(expected <workdir>/checkpoints/<step>)")
        return open_run(path, step)
    return open_run(workdir, step)


GRID_WARN = 64  # images in one --out grid beyond which the folder output is suggested
ROTATION_RETRIES = 5  # a trainer saving every step can rotate a few chosen steps in a row


def _step_names(workdir) -> set:
    from sdxl_jax import paths
    folder = paths.join(workdir, "checkpoints")  # a local folder or a gs:// prefix
    return {n for n in paths.listdir(folder) if n.isdigit()} if paths.isdir(folder) else set()


def load_run(workdir=None, checkpoint=None, step=None, weights: str | None = "ema", *,
             lora: str = "", lora_scale: float = 1.0, all_models: bool = False):
    """`_load_run`, read again from the then newest step when the step it chose (no `step`
    given) disappeared while it was read: a trainer with checkpoint.keep removes old steps as
    it saves new ones."""
    from sdxl_jax.checkpoint import CheckpointError
    retries = 0
    while True:
        before = _step_names(workdir) if workdir and step is None else None
        try:
            return _load_run(workdir, checkpoint, step, weights, lora=lora,
                             lora_scale=lora_scale, all_models=all_models)
        except CheckpointError:
            if before is None or retries == ROTATION_RETRIES or _step_names(workdir) == before:
                raise
            retries += 1
            log.warning("the checkpoint steps in %s changed while being read (a trainer rotating "
                        "them?); reading the newest step again", workdir)


def _load_run(workdir=None, checkpoint=None, step=None, weights: str | None = "ema", *,
              lora: str = "", lora_scale: float = 1.0, all_models: bool = False):
    """(config dict, params, meta) of a saved run on one device, reading only the chosen
    weights (None: EMA when the run kept one); config and meta are those of the step read.

    params: the UNet as trained, or with `all_models` {"unet", "vae", "text_l", "text_g"} as
    trained (what `sampler_for_run(cfg, meta, frozen=…)` takes the last three from). `lora`: an
    adapter file merged into them at `lora_scale` (text-encoder adapters need `all_models`)."""
    run = _open(workdir, checkpoint, step)
    file = None
    if lora:  # the file's keys and shapes checked against the run's preset before any weights
        from sdxl_jax.adapters import read_lora
        file = read_lora(lora, run.config["model"]["preset"])
        if not all_models and set(file[1]) - {"unet"}:
            raise ValueError(f"--lora {lora} adapts {sorted(file[1])}: its text encoders need "
                             "load_run(all_models=True)")
    params = run.all_params(weights) if all_models else {"unet": run.params("unet", weights)}
    if file is not None:
        params = merge_lora_file(params, *file, lora_scale)
        log.info("merged %s at scale %g into %s", lora, lora_scale, sorted(file[1]))
    log.info("loaded %s weights of step %d from %s", weights or run.default_weights(), run.step,
             run.directory)
    return run.config, params if all_models else params["unet"], run.meta


def merge_lora_file(params: dict, adapters: dict, plan: dict, scale: float) -> dict:
    """`params` ({name: tree}) with the adapters of a LoRA file (`adapters.read_lora`) merged at
    `scale`: W + scale·ΔW in float32 on the host, cast back to W's dtype, placed like W was."""
    from sdxl_jax.adapters import merge_params
    if not np.isfinite(scale):
        raise ValueError(f"--lora-scale {scale}: must be a finite number")
    merged = merge_params(jax.device_get({n: params[n] for n in plan}), adapters, plan, scale)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return dict(params, **{n: jax.device_put(merged[n], device) for n in plan})


def sampler_for_run(cfg: dict, meta: dict, frozen: dict | None = None) -> ImageSampler:
    """The run's sampler; `frozen` ({"vae", "text_l", "text_g"}, e.g. a run's trained text
    encoders) default: the run's source models (runs.source_params: model.vae_workdir's VAE
    when the run names one, as the tiny demo does)."""
    from sdxl_jax.runs import source_params
    lat = meta.get("latents", {})
    frozen = source_params(cfg) if frozen is None else frozen
    return ImageSampler(cfg, frozen, lat.get("mean"), lat.get("std"))


@cli.entry_point  # user errors: one line `error: …`; --debug shows the traceback
def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="python -m sdxl_jax.sample", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="run directory (latest checkpoint unless --step)")
    src.add_argument("--checkpoint", help="a checkpoint step directory <workdir>/checkpoints/<step>")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--prompt", action="append", help="repeat for a grid row each")
    p.add_argument("--prompts-file", default="", help="kohya-style prompt file, one grid row per "
                   "line (--n --w --h --d --l --s options); instead of --prompt")
    p.add_argument("--negative", default="")
    p.add_argument("--seed", type=int, action="append", help="repeat for a grid column each")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the run's sample.width)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--rescale", type=float, default=0.0, help="CFG rescale φ")
    p.add_argument("--sampler", choices=samplers.SAMPLERS, default="euler")
    p.add_argument("--schedule", choices=samplers.SCHEDULE_KINDS, default="trailing")
    p.add_argument("--no-sigma-max-scaling", action="store_true")
    p.add_argument("--lora", default="", help="a LoRA .safetensors (kohya / A1111 / ComfyUI or "
                   "diffusers / PEFT layout) merged into the run's weights for sampling")
    p.add_argument("--lora-scale", type=float, default=None,
                   help="its strength S: W + S·ΔW (default 1; needs --lora)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"images per sampling call (default {DEFAULT_BATCH}); lower it if the "
                   "device runs out of memory")
    p.add_argument("--out", required=True, help="grid PNG path, or DIR/ for one PNG per image "
                   "written as each batch finishes")
    a = p.parse_args(argv)
    if a.lora_scale is not None and not a.lora:
        p.error("--lora-scale needs --lora FILE")
    lora_scale = 1.0 if a.lora_scale is None else a.lora_scale
    if not np.isfinite(lora_scale):
        p.error(f"--lora-scale {lora_scale}: must be a finite number")
    if bool(a.prompt) == bool(a.prompts_file):
        p.error("give either --prompt (repeatable) or --prompts-file")
    if a.prompts_file:
        from sdxl_jax import prompts as prompt_file
        specs = prompt_file.read_prompt_file(a.prompts_file)  # errors before loading the run
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # what can be checked before loading anything (the run's own sizes are checked after)
    check_settings(SampleSettings(width=1 if a.width is None else a.width,
                                  height=1 if a.height is None else a.height, steps=a.steps,
                                  cfg=a.cfg, rescale=a.rescale))
    batch_size = DEFAULT_BATCH if a.batch_size is None else a.batch_size
    if batch_size < 1:
        p.error(f"--batch-size {batch_size}: must be at least 1")
    seeds = [check_seed(s, "--seed") for s in a.seed or [0]]
    folder = check_out(a.out)  # before loading anything: the path must be writable as given
    cfg, trees, meta = load_run(a.workdir, a.checkpoint, a.step, a.weights, lora=a.lora,
                                lora_scale=lora_scale, all_models=True)
    settings = SampleSettings(width=a.width or int(cfg["sample"]["width"]),
                              height=a.height or int(cfg["sample"]["height"]), steps=a.steps,
                              cfg=a.cfg, rescale=a.rescale, sampler=a.sampler, schedule=a.schedule,
                              sigma_max_scaling=not a.no_sigma_max_scaling, negative=a.negative)
    check_settings(settings, cfg["model"]["preset"])  # before any compile
    params = trees["unet"]
    sampler = sampler_for_run(cfg, meta, frozen={k: trees[k] for k in ("vae", "text_l", "text_g")})
    if a.prompts_file:
        jobs = prompt_file.resolve_prompts(specs, settings, seeds, prompt_file.config_buckets(cfg))
        rows = [spec.line for spec in specs]
        what = f"{len(jobs)} prompts from {a.prompts_file}"
    else:
        jobs = [PromptJob(prompt, tuple(seeds), settings) for prompt in a.prompt]
        rows = list(range(1, len(jobs) + 1))
        what = f"{len(jobs)}×{len(seeds)} grid, {settings.width}×{settings.height}"
    if folder:
        written = write_images(sampler, params, jobs, rows, a.out, batch_size)
        print(f"wrote {written} images to {a.out} ({what})")
        return 0
    from sdxl_jax.prompts import render_grid
    images = sum(len(job.seeds) for job in jobs)
    if images > GRID_WARN:
        log.warning("%d images in one grid are kept in memory and written at the end; --out DIR/ "
                    "writes each image as its batch finishes", images)
    save_png(render_grid(sampler, params, jobs, batch_size=batch_size), a.out)
    print(f"wrote {a.out} ({what})")
    return 0


def check_out(out: str) -> bool:
    """Whether `out` names a folder (a trailing slash, or an existing folder); NotADirectoryError
    naming the first existing parent that is not a folder, before any work."""
    from sdxl_jax import paths
    if paths.is_remote(out):  # a bucket has only key prefixes: the trailing slash says "folder"
        return out.endswith("/")
    folder = out.endswith(("/", os.sep)) or os.path.isdir(out)
    parent = os.path.abspath(out if folder else os.path.dirname(os.path.abspath(out)))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"--out {out!r}: {parent} is a file, not a folder; choose "
                                 "another --out")
    return folder


def write_images(sampler, params, jobs, rows, folder: str, batch_size: int) -> int:
    """One PNG per image, `<row>-s<seed>.png` in `folder`, each job's written when its last
    batch finishes; the number written."""
    from sdxl_jax import paths
    from sdxl_jax.prompts import render_jobs
    paths.makedirs(folder)  # a local folder or a gs:// prefix (save_png writes either)
    count = 0

    def save(i, images):
        nonlocal count
        for seed, image in zip(jobs[i].seeds, images):
            save_png(image, os.path.join(folder, f"{rows[i]:05d}-s{seed}.png"))
        count += len(images)
        log.info("%d of %d images written to %s", count, sum(len(j.seeds) for j in jobs), folder)

    render_jobs(sampler, params, jobs, batch_size=batch_size, on_done=save)
    return count


if __name__ == "__main__":
    sys.exit(main())
