"""Shared test helpers: the tiny config the engine tests train with."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))


def tiny_config(**overrides):
    """configs/ztsnr.py:tiny reduced to one 256² bucket, float32 compute, no previews and a 4×2
    data×FSDP mesh, so the engine tests share one compiled train step (the persistent XLA cache
    of conftest.py)."""
    import ztsnr
    cfg = ztsnr.get_config("tiny")
    cfg.model.dtype = "float32"
    cfg.data.buckets.min_side = cfg.data.buckets.max_side = 256
    cfg.data.buckets.max_ar_error = 1.0  # every demo image lands in the one bucket
    cfg.data.val_fraction = 0.1
    cfg.train.global_batch_size = 8
    cfg.train.warmup_steps = 0
    cfg.train.log_every = 1
    cfg.sample.every_steps = 0
    cfg.checkpoint.async_save = False
    cfg.mesh.data, cfg.mesh.fsdp = -1, 2  # 4×2 on the 8 test devices: data parallel and FSDP
    cfg.mesh.min_fsdp_size = 1024  # shard the tiny model's kernels for real
    return override(cfg, overrides)


def override(cfg, overrides: dict):
    """Set dotted keys ("train.steps": 4, …) on a ConfigDict; returns it."""
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg
