"""Time the trainer's ahead-of-time compiles of N bucket shapes in the compile pool.

    python -m sdxl_jax.tools.compile_bench --preset tiny --shapes 4 --workers 1   # one after another
    python -m sdxl_jax.tools.compile_bench --preset tiny --shapes 4 --workers 2   # two at once
    python -m sdxl_jax.tools.compile_bench ... --cache DIR   # persistent cache: fill, then reload

One process per measurement (an executable compiled once is kept for the whole process). The
program is the demo's (configs/ztsnr.py:tiny defaults, one device, `unet_task.program_spec` +
`build_program`); the shapes are the first N of its buckets × `--batches` (stages' batch sizes).
Prints one JSON line: wall and CPU time of the compiles, each shape's seconds, the workers used.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time


def _cpu_s() -> float:
    """CPU seconds of this process (all threads): on a shared machine the wall time of a pool
    depends on what else runs, its CPU time does not."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", help="model size: tiny, micro, mid or sdxl")
    ap.add_argument("--shapes", type=int, default=4, help="(bucket, batch) shapes to compile")
    ap.add_argument("--batches", default="8,16", help="global batch sizes (one per stage)")
    ap.add_argument("--workers", type=int, default=0, help="compile threads (0 = auto)")
    ap.add_argument("--cache", default="", help="persistent compilation cache folder (default none)")
    args = ap.parse_args(argv)

    import jax
    if args.cache:
        jax.config.update("jax_compilation_cache_dir", args.cache)
    from sdxl_jax import parallel
    from sdxl_jax.config import load_config
    from sdxl_jax.data.buckets import buckets_from_config
    from sdxl_jax.train import compile_pool
    from sdxl_jax.train.program import build_program
    from sdxl_jax.train.unet_task import program_spec

    root = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "ztsnr.py")
    cfg = load_config(f"{root}:tiny")
    cfg.model.preset = args.preset
    cfg.mesh.data, cfg.mesh.fsdp = 1, 1
    plan = parallel.ShardingPlan.from_config(cfg.mesh, jax.devices()[:1])
    t0 = time.perf_counter()
    prog = build_program(program_spec(cfg), plan)
    buckets = buckets_from_config(cfg.data.buckets)
    shapes = [(int(rows), h, w) for rows in args.batches.split(",") for w, h in buckets][:args.shapes]
    if len(shapes) < args.shapes:
        raise SystemExit(f"{len(buckets)} buckets × batches {args.batches} give only {len(shapes)} shapes")
    t1, cpu1 = time.perf_counter(), _cpu_s()
    pool = compile_pool.start(prog, shapes, args.workers)
    pool.wait_all()
    wall, cpu = time.perf_counter() - t1, _cpu_s() - cpu1
    pool.close()
    out = {"preset": args.preset, "shapes": len(shapes), "workers": pool.workers_used,
           "build_s": round(t1 - t0, 1), "compile_wall_s": round(wall, 1), "compile_cpu_s": round(cpu, 1),
           "compile_s": {k: round(v, 1) for k, v in pool.seconds().items()},
           "cores": compile_pool.host_cores(), "cache": bool(args.cache)}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
