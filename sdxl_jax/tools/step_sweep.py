"""The trainer's own step on one accelerator, swept over micro-batch × remat × attention:
median step time, samples/s, TFLOP/s and MFU, peak device memory.

    python -m sdxl_jax.tools.bench --models sdxl --backend gpu [--batches 1,2,4,8] [--steps 10]
    python -m sdxl_jax.tools.bench --models tiny --backend cpu      # the same code, CI-sized
    (--models micro: the one-level test UNet, the code path in seconds)

Random full-size weights (UNet trained, CLIP-L and bigG frozen) on ONE device: the program is the
one `train.py` runs (`unet_task.program_spec` + `build_program`), with the run's defaults
(bf16 compute, AdamW, EMA, bf16 weight gathers). Each setting is compiled ahead of time and
checked with the trainer's fit check first; one that cannot fit is reported and skipped, not run.

FLOPs: the *model* FLOPs of a step are XLA's count for the no-remat program at that batch (remat
recomputes forward work that MFU must not credit); the compiled count of each variant is shown
too. The step has no loop at k = 1 (no accumulation), so XLA's cost analysis, which counts a
loop body once, counts everything. MFU = model FLOPs / step time / the chip's dense bf16 peak.
"""
from __future__ import annotations

import itertools
import time

import numpy as np

from sdxl_jax.fit import xla_flops

# dense bf16 peak FLOP/s per chip (vendor figures) by a substring of device_kind
PEAKS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("4090", 165e12),
         ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v4", 275e12),
         ("TPU v6", 918e12))
VARIANTS = (("none", "standard"), ("none", "dot_product"), ("blocks", "dot_product"),
            ("blocks", "memory_efficient"), ("dots", "dot_product"))


def chip_peak(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for key, peak in PEAKS:
        if key.lower() in kind.lower():
            return peak
    return None


def _config(preset: str, remat: str, attention: str, batch: int):
    import os
    from sdxl_jax.config import load_config
    from sdxl_jax.config_sections import offline_preset
    root = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "ztsnr.py")
    cfg = load_config(f"{root}:{'tiny' if offline_preset(preset) else 'sdxl'}")  # the run's defaults
    cfg.model.preset = preset  # model size: sdxl, tiny or micro
    cfg.model.remat, cfg.model.attention = remat, attention
    cfg.mesh.data, cfg.mesh.fsdp = 1, 1
    cfg.train.per_device_batch_size = 0  # the whole (one-device) batch in one micro-step
    cfg.train.global_batch_size = batch
    return cfg


def _random_inputs(prog, batch: int, side: int, seed: int = 0):
    """Random weights placed by the program's shardings, and a device batch (no host data)."""
    import jax
    import jax.numpy as jnp
    state_abs, frozen_abs, batch_abs = prog.abstract_inputs(batch, side, side)

    def rand(tree, key):
        leaves, treedef = jax.tree.flatten(tree)
        keys = jax.random.split(key, len(leaves))
        out = [jnp.zeros(x.shape, x.dtype) if not jnp.issubdtype(x.dtype, jnp.floating)
               else 0.02 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
        return jax.tree.unflatten(treedef, out)
    params = jax.jit(lambda k: rand(prog.spec.abstract_params, k),
                     out_shardings=prog.shardings.params)(jax.random.key(seed))
    state = prog.init_state(params, jax.random.PRNGKey(seed))
    frozen = jax.jit(lambda k: rand(frozen_abs, k), out_shardings=prog.frozen_shardings)(jax.random.key(seed + 1))
    vocab = min(x.shape[0] for p, x in jax.tree_util.tree_flatten_with_path(frozen_abs)[0]
                if "token_embedding" in jax.tree_util.keystr(p))  # the smaller tower's vocabulary

    def make_batch(k):
        k1, k2 = jax.random.split(k)
        out = {}
        for name, x in batch_abs.items():
            if name.startswith("input_ids"):
                out[name] = jax.random.randint(k1, x.shape, 0, vocab, x.dtype)
            elif name == "time_ids":
                out[name] = jnp.tile(jnp.asarray([[side, side, 0, 0, side, side]], x.dtype), (x.shape[0], 1))
            elif name in ("loss_weight", "loss_mask"):
                out[name] = jnp.ones(x.shape, x.dtype)
            else:
                out[name] = jax.random.normal(k2, x.shape, x.dtype)
        return out
    device_batch = jax.jit(make_batch, out_shardings=prog.plan.batch)(jax.random.key(seed + 2))
    return state, frozen, device_batch


def sweep(preset: str, batches, steps: int, side: int, variants=VARIANTS, time_budget_s: float = 480.0):
    """Rows of figures (dicts); prints each as it is measured."""
    import jax
    from sdxl_jax import parallel
    from sdxl_jax.fit import FitError, check_fit, device_limit
    from sdxl_jax.train.program import build_program
    from sdxl_jax.train.unet_task import program_spec

    dev = jax.devices()[0]
    peak, limit = chip_peak(dev), device_limit([dev])
    print(f"jax {jax.__version__}, {dev.platform} {getattr(dev, 'device_kind', '')}, dense bf16 peak "
          f"{peak / 1e12 if peak else float('nan'):.0f} TFLOP/s, memory limit "
          f"{limit / 2**30 if limit else float('nan'):.1f} GiB", flush=True)
    t_start, rows, model_flops = time.perf_counter(), [], {}
    for batch, (remat, attention) in itertools.product(batches, variants):
        if time.perf_counter() - t_start > time_budget_s:
            print(f"time budget of {time_budget_s:.0f} s spent: stopping before batch {batch}, "
                  f"{remat}/{attention}", flush=True)
            break
        cfg = _config(preset, remat, attention, batch)
        plan = parallel.ShardingPlan.from_config(cfg.mesh, [dev])
        row = {"batch": batch, "remat": remat, "attention": attention, "side": side}
        try:
            prog = build_program(program_spec(cfg), plan)
            if batch not in model_flops:  # the no-remat program's FLOPs = the model's work
                base = prog if (remat, attention) == ("none", "standard") else \
                    build_program(program_spec(_config(preset, "none", "standard", batch)), plan)
                model_flops[batch] = xla_flops(base.lower(batch, side, side))
            t0 = time.perf_counter()
            compiled = prog.compile(batch, side, side)
            row["compile_s"] = time.perf_counter() - t0
            row["needed_gib"] = check_fit(compiled, [dev]).needed / 2**30
            state, frozen, dbatch = _random_inputs(prog, batch, side)
            for _ in range(2):  # warm-up
                state, metrics = compiled(state, frozen, dbatch)
            jax.block_until_ready(metrics)
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                state, metrics = compiled(state, frozen, dbatch)
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - t0)
            step_s = float(np.median(times))
            stats = dev.memory_stats() or {}
            row.update(step_s=step_s, samples_s=batch / step_s,
                       xla_tflops=xla_flops(compiled) / step_s / 1e12,
                       model_tflops=model_flops[batch] / step_s / 1e12,
                       peak_gib=stats.get("peak_bytes_in_use", float("nan")) / 2**30,
                       finite=bool(metrics["finite"]))
            row["mfu"] = row["model_tflops"] * 1e12 / peak if peak else float("nan")
            del state, frozen, dbatch
        except Exception as e:  # noqa: BLE001 — a setting that does not fit or run is a row, not a crash
            row["skipped"] = (str(e).split("; to fit")[0] if isinstance(e, FitError) else
                              f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")[:160]
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(r: dict) -> str:
    head = f"batch {r['batch']:>2} | remat {r['remat']:<6} | attention {r['attention']:<16}"
    if "skipped" in r:
        return f"{head} | skipped: {r['skipped']}"
    return (f"{head} | {r['step_s'] * 1e3:8.1f} ms/step | {r['samples_s']:7.2f} samples/s | "
            f"model {r['model_tflops']:.4g} TFLOP/s (MFU {r['mfu']:.1%}) | XLA {r['xla_tflops']:.4g} "
            f"TFLOP/s | peak {r['peak_gib']:.1f} GiB (fit check {r['needed_gib']:.1f}) | "
            f"compile {r['compile_s']:.0f} s")


def markdown(rows, header: str) -> str:
    lines = [header, "", "| per-device batch | remat | attention | ms/step | samples/s | model TFLOP/s | MFU "
             "| peak GiB |", "|---:|:--|:--|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['batch']} | {r['remat']} | {r['attention']} | skipped: {r['skipped']} |||||")
        else:
            lines.append(f"| {r['batch']} | {r['remat']} | {r['attention']} | {r['step_s'] * 1e3:.1f} | "
                         f"{r['samples_s']:.2f} | {r['model_tflops']:.4g} | {r['mfu']:.1%} | {r['peak_gib']:.1f} |")
    return "\n".join(lines) + "\n"
