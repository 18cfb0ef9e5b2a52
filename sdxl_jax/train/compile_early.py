"""The UNet's train step compiled while the run's inputs are still being made.

A run whose latent cache does not exist yet (the demo: its images, then its own VAE, then the
cache) spends minutes in the prepare phase on work that leaves a core idle or competes with the
step's compiles anyway. Its program does not depend on the data unless the latents are
normalised by statistics the cache has not measured yet, and its batch shapes follow from the
images alone: each image's bucket (build_cache's rule, from its header), the held-out split (by
key hash, the loader's rule), and the buckets holding at least one global batch of training
images (the loader's rule). The compiles of those shapes start here, in the pool the loop then
finds (compile_pool.pool_for) and waits on.

Only runs of one stage reading one cache built from an image folder or manifest are predicted;
anything else compiles when the loop starts, as before.
"""
from __future__ import annotations

import logging

import numpy as np

from sdxl_jax import parallel
from sdxl_jax.run_inputs import RunInputs

log = logging.getLogger("sdxl_jax.train")


def predictable(cfg, inputs: RunInputs) -> bool:
    """Whether the run's program and batch shapes follow from its config and images alone."""
    if cfg.task != "unet" or len(inputs.stages) != 1:
        return False
    st = inputs.stages[0]
    if len(st.caches) != 1 or st.sources:
        return False
    c = st.caches[0]
    needs_stats = cfg.latents.normalization == "per_channel" and inputs.latent_mean is None
    return not c.exists and bool(c.images_dir or c.manifest) and not needs_stats


def planned_shapes(cfg, inputs: RunInputs, multiple: int) -> list[tuple[int, int, int]]:
    """(global rows, height, width) of every bucket the run's loader will feed once its cache is
    built, in bucket order (compile_ahead.loader_shapes' order)."""
    from sdxl_jax.data import batch_sizes, buckets_from_config
    from sdxl_jax.data.build import scan_buckets
    from sdxl_jax.data.pipeline import held_out, used_buckets
    st = inputs.stages[0]
    c = st.caches[0]
    bucket_of = scan_buckets(cfg, c.images_dir or None, c.manifest or None)
    keys = sorted(bucket_of)
    train = [bucket_of[k] for k, held in zip(keys, held_out(keys, float(cfg.data.val_fraction))) if not held]
    buckets = buckets_from_config(cfg.data.buckets)
    b = cfg.data.buckets
    sizes = batch_sizes(buckets, st.global_batch_size, multiple, b.scale_batch_by_area, b.max_area)
    counts = np.bincount(np.asarray(train, np.int64), minlength=len(buckets))
    return sorted(((sizes[i], buckets[i][1], buckets[i][0]) for i in used_buckets(counts, sizes)),
                  key=lambda s: (s[1], s[2]))


def start(cfg, inputs: RunInputs):
    """Start compiling the run's train step for every planned shape in the background; the
    pool (None when the run is not predictable or no bucket holds a batch)."""
    if not predictable(cfg, inputs):
        return None
    from sdxl_jax.train import compile_pool
    from sdxl_jax.train.unet_task import program_of
    plan = parallel.ShardingPlan.from_config(cfg.mesh)
    program = program_of(cfg, inputs, plan)
    shapes = planned_shapes(cfg, inputs, program.micro_rows or plan.data_parallel)
    if not shapes:
        return None
    log.info("compiling the train step for %d bucket(s) while the inputs are prepared", len(shapes))
    return compile_pool.start(program, shapes, int(cfg.train.compile_workers))
