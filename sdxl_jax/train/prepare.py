"""The prepare phase: make what a run's inputs lack — the generated demo dataset, the demo's own
VAE, the latent caches to build — before any task is built, then resolve them again. The UNet's
train step compiles beside that work when its shapes follow from the images (compile_early.py).

    inputs = prepare_run(cfg, workdir, command)   # what train.py does before loop.train
    loop.train(cfg, workdir, inputs, command=command)

Everything here writes; `sdxl_jax.run_inputs` only reads. The task build that follows is a
function of (cfg, inputs, plan) alone.
"""
from __future__ import annotations

import logging

import jax

from sdxl_jax import paths
from sdxl_jax.run_inputs import Command, RunInputs, check_one_source_per_cache, demo_vae_dir, resolve_run
from sdxl_jax.train import compile_early, demo_vae
from sdxl_jax.train.common import demo_images, use_compilation_cache
from sdxl_jax.workdir_lock import workdir_lock

log = logging.getLogger("sdxl_jax.train")


def prepare_run(cfg, workdir: str, command: Command | None = None) -> RunInputs:
    """The run's inputs with nothing missing (made here, holding the workdir's lock)."""
    paths.makedirs(workdir)  # a local directory or a gs:// prefix
    use_compilation_cache(workdir)  # the demo VAE's and the run's compiles share it
    inputs = resolve_run(cfg, workdir)
    if not inputs.missing:
        return inputs
    with workdir_lock(workdir, jax.process_index()):  # a lock object on gs://
        if inputs.demo_images:
            demo_images(cfg, workdir)
        # the step's compiles run beside the VAE's training and the cache build (the loop
        # finds the pool); a failure here drops the compiles not started
        pool = compile_early.start(cfg, inputs)
        try:
            if not inputs.vae.ready:
                train_demo_vae(cfg, workdir, inputs.demo_images)
                inputs = resolve_run(cfg, workdir)
            built = _build_missing_caches(cfg, inputs)
        except BaseException:
            if pool is not None:
                pool.close(finish_running=False)
            raise
    return resolve_run(cfg, workdir) if built else inputs


def demo_vae_run(unet_cfg, workdir: str, images_dir: str) -> str:
    """The run directory of a finished demo VAE of these settings, trained here if none is."""
    path = demo_vae_dir(unet_cfg, workdir)
    return path if demo_vae.finished(path) else train_demo_vae(unet_cfg, workdir, images_dir)


def train_demo_vae(unet_cfg, workdir: str, images_dir: str) -> str:
    """Train the demo VAE of these settings in <workdir>/demo_vae/<hash> (resumed when a
    preemption stopped it) and mark it finished; returns its run directory."""
    from sdxl_jax.train.loop import train
    steps = int(unet_cfg.data.demo_vae_steps)
    if steps <= 0:
        raise ValueError(f"data.demo_vae_steps={steps}: the demo VAE needs training steps (800 "
                         "reach 22 dB held-out PSNR)")
    local, _ = demo_vae.locations(unet_cfg, workdir)
    vcfg = demo_vae.vae_config(unet_cfg, images_dir)
    log.info("training the demo VAE from scratch (%d steps) in %s", steps, local)
    summary = train(vcfg, local)
    if summary["end_step"] < steps:  # preempted: the next run resumes it
        raise InterruptedError(f"the demo VAE stopped at step {summary['end_step']}; rerun to resume")
    demo_vae.mark_finished(local, steps)
    demo_vae.share(local)
    return local


def _build_missing_caches(cfg, inputs: RunInputs) -> bool:
    """Build every missing cache from its images / manifest / TFDS input with the run's VAE."""
    from sdxl_jax.data import build_cache
    from sdxl_jax.data.tfds_source import tfds_from_config
    check_one_source_per_cache(inputs)  # before building one source into another's folder
    todo, seen = [], set()
    for st in inputs.stages:
        for c in st.caches:
            if not c.exists and c.cache_dir not in seen:
                seen.add(c.cache_dir)
                todo.append((c, tfds_from_config(cfg.data) if not st.sources else None))
    if not todo:
        return False
    vae = inputs.weights.load(("vae",))["vae"]
    for c, tfds in todo:
        if not (c.images_dir or c.manifest or tfds):
            what = f"data source {c.name!r}: no" if c.name != "data" else "no"
            raise FileNotFoundError(
                f"{what} latent cache at {c.cache_dir} and no images_dir / manifest to build one "
                "from: set data.cache_dir to a built cache, or data.images_dir / data.manifest "
                "to build one")
        of = f" of data source {c.name!r}" if c.name != "data" else ""
        log.info("building the latent cache%s in %s", of, c.cache_dir)
        build_cache(cfg, images_dir=c.images_dir or None, manifest=c.manifest or None, out=c.cache_dir,
                    tfds=tfds if not (c.images_dir or c.manifest) else None, vae_params=vae)
    return True
