"""The full-size SDXL UNet against PyTorch diffusers' at one small latent, in float32.

    python -m sdxl_jax.tools.parity_sdxl [--latent 32] [--timesteps 999,500] [--seed 0]
                                         [--weights bfloat16|float32]

Random weights in every parameter (tools/torch_reference.py), diffusers' `UNet2DConditionModel`
of the SDXL base config runs first; its weights then move through our converter one parameter
at a time, each PyTorch tensor freed once converted, so the two copies never coexist; then our
jitted UNet runs on the same inputs. Both compute in float32. `--weights bfloat16` (default)
draws values a bfloat16 holds and stores them so (5.1 GB instead of 10.3 GB): each framework
widens them to float32 exactly where a layer uses them (PyTorch: `float32_on_use`; ours: the
layers' promotion to their float32 compute dtype), so the test suite's other worker keeps room.
Prints one JSON line: max |ours − torch| over the largest output magnitude per timestep (the
parity tests' bound at tiny and mid size is 1e-5), the seconds of each phase, the process's
peak RSS. Exits 1 when a ratio exceeds 1e-5 (tests/test_unet_parity_sdxl.py runs it).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latent", type=int, default=32, help="latent side (pixels / 8)")
    ap.add_argument("--timesteps", default="999,500", help="one batch row per timestep")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", choices=["bfloat16", "float32"], default="bfloat16",
                    help="storage of the random weights (compute is float32 either way)")
    a = ap.parse_args(argv)

    import ctypes
    import gc
    import os

    # glibc raises its mmap threshold as big blocks are freed, after which freed weights stay
    # in the heap: a fixed 1 MiB threshold hands each freed PyTorch weight back to the system
    if sys.platform == "linux":
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD

    # XLA:CPU's default scheduler widens every bfloat16 weight up front (10 GB of float32
    # copies at once); the memory-optimised one widens each where it is used
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED")
    import jax
    import numpy as np
    import torch

    from sdxl_jax import models
    from sdxl_jax.tools.torch_reference import (float32_on_use, our_params, random_torch_unet,
                                                torch_forward, unet_inputs)
    cfg = models.unet_config("sdxl")
    x = unet_inputs(cfg, a.latent, a.latent, [float(t) for t in a.timesteps.split(",")], a.seed)
    t0 = time.perf_counter()
    model = random_torch_unet(cfg, a.seed, getattr(torch, a.weights))
    n_params = sum(p.numel() for p in model.parameters())
    t1 = time.perf_counter()
    with torch.no_grad(), float32_on_use(model):
        want = torch_forward(model, x).numpy()
    t2 = time.perf_counter()
    params = our_params(model, cfg, release=True)
    del model
    gc.collect()
    t3 = time.perf_counter()
    unet = models.build_unet(cfg, "float32")
    fwd = jax.jit(lambda p, b: models.unet_apply(unet, p, b["z"], b["t"], b["context"],
                                                 b["pooled"], b["time_ids"]))
    compiled = fwd.lower(params, x).compile()
    t4 = time.perf_counter()
    got = np.asarray(compiled(params, x))
    t5 = time.perf_counter()
    rows = [{"t": float(t), "max_abs_diff": float(np.abs(g - w).max()), "max_abs_torch": float(np.abs(w).max()),
             "ratio": float(np.abs(g - w).max() / np.abs(w).max())} for t, g, w in zip(x["t"], got, want)]
    out = {"unet_params": n_params, "weights": a.weights, "latent": [a.latent, a.latent], "rows": rows,
           "seconds": {"torch_init": round(t1 - t0, 1), "torch_forward": round(t2 - t1, 1),
                       "convert": round(t3 - t2, 1), "jax_compile": round(t4 - t3, 1),
                       "jax_forward": round(t5 - t4, 1)},
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    sys.exit(0 if all(r["ratio"] <= 1e-5 for r in main()["rows"]) else 1)
