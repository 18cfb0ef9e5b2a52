"""Per-device memory and FLOPs of the real train step, compiled ahead of time on simulated devices.

    python -m sdxl_jax.tools.memory_report --config configs/ztsnr.py --devices 8 --mesh fsdp=8 \
        --per-device-batch 1 --bucket 1024x1024 [--remat blocks] [--attention memory_efficient]
    python -m sdxl_jax.tools.memory_report --table      # FSDP × batch × remat grid → docs/memory.md

The step (UNet + AdamW + EMA + frozen CLIP-L/bigG, exactly what `train.loop` runs) is lowered
from `jax.ShapeDtypeStruct`s carrying the run's shardings and compiled for N simulated CPU
devices (`--xla_force_host_platform_device_count`, set before JAX is imported), so no weight is
ever allocated and `model.pretrained` plays no part. XLA then reports, per device, the bytes
of arguments (state, frozen encoders, batch), outputs, temporaries and argument/output
aliasing (the donated state), and the step's FLOPs. The simulated compile uses XLA:CPU's
memory-optimised scheduler (SIMULATION_OPTIONS): its default one orders for concurrency and
keeps forward values alive across remat boundaries, which no accelerator compiler does.
`--until-buffers` reads the same figures from XLA's buffer-assignment dump and stops there,
skipping code generation (half of a full-size CPU compile); `--table` runs that way.

Caveat: this is XLA:CPU's buffer assignment. TPU/GPU compilers fuse differently, choose other
layouts (TPU pads minor dimensions to tiles) and schedule FSDP all-gathers differently (TPU's
latency-hiding scheduler bounds how many gathered weights are live at once), so treat the
figures as an estimate of the order of magnitude and the trends, not an exact HBM budget.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from sdxl_jax import cli, fit
from sdxl_jax.config_sections import REMAT_MODES

GIB = 1024 ** 3
ACCELERATORS = (("TPU v5e", 16), ("TPU v4", 32), ("H100", 80), ("TPU v5p", 95))
# A device is counted as fitting when the estimate leaves this share of its memory free: the
# runtime reserves some, and the CPU estimate is approximate (see the module docstring).
FIT_MARGIN = 0.9
TABLE_DEVICES = (8, 16, 32)
TABLE_BATCHES = (1, 2, 4)
# (model.remat, model.attention) rows of the table: no checkpointing, and per-layer checkpointing
# with chunked attention (no materialised attention probabilities), the setting that fits 16 GiB
# (remat with standard attention, 8 devices, batch 1: 16.50 GiB; docs/memory.md)
TABLE_VARIANTS = (("none", "standard"), ("blocks", "memory_efficient"))
# Compiler options of the simulated compile. XLA:CPU's default scheduler orders for concurrency
# and keeps forward values alive into the backward, which undoes remat (tiny UNet at 1024², one
# device: temporaries 1087.0 MiB with remat none, 1086.5 MiB with blocks); the memory-optimised
# scheduler orders for memory as the TPU/GPU compilers do (951.9 and 759.7 MiB). The step never
# runs, so LLVM's optimisations are skipped: buffer assignment happens before them.
SIMULATION_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
                      "xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# XLA:CPU has no bfloat16 kernels for dots, convolutions or collectives: its pass
# float-normalization-bf16 rewrites each such op to float32 (converts around it), and the converts
# then move ahead of the FSDP all-gathers. TPU and GPU run those ops in bfloat16. Left on, the
# simulated SDXL step gathered every weight in float32 (all 1,796 all-gathers f32, though the step
# casts each shard to bf16 before gathering). An --until-buffers compile skips it: code
# generation, which needs it, is never reached. (Also skipping cse_barrier_expander, which drops
# remat's optimization barriers early on XLA:CPU, made the batch-2 row worse, 23.47 GiB: not done.)
ACCELERATOR_PASSES_SKIPPED = ("float-normalization-bf16",)


def simulation_options(until_buffers: bool) -> dict:
    """Compiler options of a simulated compile (SIMULATION_OPTIONS); with `until_buffers` also
    without ACCELERATOR_PASSES_SKIPPED, so bfloat16 ops keep their dtype."""
    skip = {"xla_disable_hlo_passes": ",".join(ACCELERATOR_PASSES_SKIPPED)} if until_buffers else {}
    return dict(SIMULATION_OPTIONS, **skip)


# ---- pure helpers (no JAX) -----------------------------------------------------------------------
def parse_mesh(spec: str) -> dict:
    """"fsdp=8" / "data=2,fsdp=4" → {"data": …, "fsdp": …}; an unnamed axis is -1 (fills)."""
    out = {"data": -1, "fsdp": 1}
    named = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = re.fullmatch(r"(data|fsdp)=(-?\d+)", part)
        if not m:
            raise ValueError(f"--mesh {spec!r}: expected comma-separated data=N / fsdp=N")
        out[m.group(1)] = int(m.group(2))
        named.add(m.group(1))
    if named == {"data"}:
        out["fsdp"] = -1
    return out


def parse_bucket(spec: str) -> tuple[int, int]:
    """"1024x1024" (width x height in pixels, multiples of 8) → (height, width) in pixels."""
    m = re.fullmatch(r"(\d+)x(\d+)", spec)
    if not m or int(m.group(1)) % 8 or int(m.group(2)) % 8:
        raise ValueError(f"--bucket {spec!r}: expected WIDTHxHEIGHT in pixels, multiples of 8")
    return int(m.group(2)), int(m.group(1))


def peak_bytes(stats: dict) -> int:
    """Live bytes at the step's peak: arguments + outputs not aliased to arguments + temps
    (fit.needed_bytes: the trainer's fit check)."""
    return fit.needed_bytes(stats)


def fits(total_bytes: int, margin: float = FIT_MARGIN) -> dict:
    """{accelerator: "yes" | "tight" | "no"}: "tight" = within the memory but above `margin`."""
    out = {}
    for name, gib in ACCELERATORS:
        cap = gib * GIB
        out[name] = "yes" if total_bytes <= margin * cap else "tight" if total_bytes <= cap else "no"
    return out


def fmt_gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def peak_buffers(dump_dir: str, module: str = "train_step") -> tuple[int, list[tuple[str, str, int, int]]]:
    """The buffers live at the step's peak, from an XLA dump (--xla_dump_to) of the compile.

    Reads XLA's live-range report ("Live ranges at N (peak)") and the optimized HLO for each
    buffer's shape and whether it belongs to the backward pass (op_name "transpose(jvp(…))").
    Returns (peak bytes, [(shape, pass, count, bytes)] sorted by bytes). Pass is "backward",
    "forward" or "-" (fusions whose op_name XLA did not keep: weights, gathers, converts …).
    """
    import collections
    import glob
    ranges = glob.glob(os.path.join(dump_dir, f"*{module}*after_optimizations-live-range.txt"))
    hlos = glob.glob(os.path.join(dump_dir, f"*{module}*after_optimizations.txt"))
    if not ranges or not hlos:
        raise FileNotFoundError(f"no XLA live-range report / optimized HLO for {module!r} in {dump_dir}")
    live = {}
    with open(ranges[0]) as f:
        inside = False
        for line in f:
            if line.startswith("  Live ranges at") and "(peak)" in line:
                inside = True
            elif inside:
                m = re.match(r"\s+(\S+?)\{[^}]*\}: (\d+) bytes", line)
                if not m:
                    break
                live[m.group(1)] = live.get(m.group(1), 0) + int(m.group(2))
    groups: dict = collections.defaultdict(lambda: [0, 0])
    with open(hlos[0]) as f:
        for line in f:
            m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+)", line)
            if not m or m.group(1) not in live:
                continue
            op_name = re.search(r'op_name="([^"]*)"', line)
            op_name = op_name.group(1) if op_name else ""
            phase = "backward" if "transpose(jvp(" in op_name else "forward" if "jvp(" in op_name else "-"
            g = groups[(re.sub(r"\{.*", "", m.group(2)), phase)]
            g[0] += 1
            g[1] += live.pop(m.group(1))
    rows = sorted(((shape, phase, n, b) for (shape, phase), (n, b) in groups.items()), key=lambda r: -r[3])
    return sum(r[3] for r in rows) + sum(live.values()), rows


def buffer_assignment_stats(path: str) -> dict:
    """argument / output / alias / temp bytes from XLA's buffer-assignment dump, counted as
    `compiled.memory_analysis()` counts them: entry parameters are arguments (those also
    live-out are outputs aliased to them, the donated state), the other live-out allocations
    are outputs, the preallocated temporary buffer is the temporaries; constants and
    thread-local scratch are not counted."""
    stats = dict.fromkeys(("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes"), 0)
    with open(path) as f:
        for line in f:
            m = re.match(r"allocation \d+: size (\d+), (.*)", line)
            if not m:
                continue
            size, kind = int(m.group(1)), m.group(2)
            live_out = "maybe-live-out" in kind
            if kind.startswith("parameter "):
                stats["argument_bytes"] += size
                stats["alias_bytes"] += size if live_out else 0
                stats["output_bytes"] += size if live_out else 0
            elif kind.startswith("preallocated-temp"):
                stats["temp_bytes"] += size
            elif live_out:
                stats["output_bytes"] += size
    stats["code_bytes"] = 0
    return stats


def compile_until_buffers(lowered, options: dict, module: str = "train_step", poll_s: float = 2.0) -> str:
    """Compile `lowered` with `options` (which must name "xla_dump_to") in a background daemon
    thread and return the path of its buffer-assignment dump as soon as XLA has written it; the
    compile goes on (or fails in code generation, without ACCELERATOR_PASSES_SKIPPED) unwatched.
    A compile that ends without the dump raises, naming its error."""
    import threading
    if "xla_dump_to" not in options:
        raise ValueError("compiling until buffer assignment needs compiler_options['xla_dump_to']")
    import jax
    from jax.experimental.compilation_cache import compilation_cache
    failed = []

    def compile_quietly():
        try:
            lowered.compile(compiler_options=options)
        except Exception as e:  # after buffer assignment: code generation without the bf16 pass
            failed.append(e)
    # A persistent-cache hit would skip the compile and so the dump (the cache key leaves out
    # every xla_dump_* option): this compile bypasses the cache. The cache's on/off state is read
    # once per process, hence the resets around the switch.
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    thread = threading.Thread(target=compile_quietly, daemon=True)
    thread.start()
    try:
        return wait_for_buffer_assignment(options["xla_dump_to"], thread.is_alive, module, poll_s)
    except RuntimeError as e:  # the compile failed before buffer assignment: say why
        raise RuntimeError(f"{e}: {failed[0] if failed else 'no error raised'}") from None
    finally:  # the compile has passed its cache lookup once buffers are assigned (or it ended)
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()


def wait_for_buffer_assignment(dump_dir: str, compiling, module: str = "train_step",
                               poll_s: float = 2.0) -> str:
    """Path of the buffer-assignment dump of `module` once XLA has written it (its memory-usage
    report, written after it, exists and no dump file grew for one poll); `compiling()` False
    before that means the compile ended without it."""
    import glob
    pattern = os.path.join(dump_dir, f"*{module}*after_optimizations-")
    last = None
    while True:
        files = {p: os.path.getsize(p) for p in glob.glob(pattern + "*.txt")}
        done = any(p.endswith("memory-usage-report.txt") for p in files)
        if done and files == last:
            return next(p for p in files if p.endswith("-buffer-assignment.txt"))
        if not compiling() and not done:
            raise RuntimeError(f"the compile ended without a buffer-assignment dump in {dump_dir}")
        last = files if done else None
        time.sleep(poll_s)


# ---- the analysis (imports JAX; XLA_FLAGS must already be set) ------------------------------------
def load_config(spec: str):
    """`path/to/config.py[:arg]` → the ConfigDict of its get_config(arg)."""
    from sdxl_jax.config import load_config as load
    return load(spec)


def _shard_bytes(abstract, shardings) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs placed by `shardings`."""
    import jax
    import numpy as np
    total = 0
    for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        total += int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
    return total


def analyze(cfg, per_device_batch: int, height: int, width: int, *, accum: int = 1,
            compiler_options: dict | None = None, until_buffers: bool = False) -> dict:
    """Lower and compile the train step for `cfg` on all visible devices; per-device figures.

    `per_device_batch` is the micro-batch (train.per_device_batch_size); `accum` > 1 compiles the
    step over that many micro-batches (the accumulation loop and its float32 gradient sum).

    `until_buffers` (needs "xla_dump_to" in `compiler_options`): take the memory figures from
    XLA's buffer-assignment dump as soon as it is written and leave the compile running in a
    background thread (the caller exits the process): code generation, half of a large CPU
    compile, is skipped. The figures are the same (checked against memory_analysis() in the
    tests); only the per-device FLOPs of the compiled program are then missing."""
    import jax
    from sdxl_jax import models, parallel
    from sdxl_jax.train.program import build_program
    from sdxl_jax.train.unet_task import program_spec

    # the trainer's own program: same spec, shardings and batch contract as train.py runs
    cfg.train.per_device_batch_size = int(per_device_batch)
    prog = build_program(program_spec(cfg), parallel.ShardingPlan.from_config(cfg.mesh))
    mesh, preset = prog.plan.mesh, cfg.model.preset
    n_dev = mesh.devices.size
    global_batch = per_device_batch * prog.plan.data_parallel * int(accum)
    state_in, frozen_in, batch_in = prog.abstract_inputs(global_batch, height, width)
    abstract_state, st_sh = prog.abstract_state, prog.shardings
    frozen_abs, frozen_sh = prog.spec.abstract_frozen, prog.frozen_shardings
    abstract_params = prog.spec.abstract_params
    step = prog.step

    t0 = time.perf_counter()
    lowered = step.lower(state_in, frozen_in, batch_in)
    t1 = time.perf_counter()
    options = dict(compiler_options or {})
    if until_buffers:
        stats = buffer_assignment_stats(compile_until_buffers(lowered, options))
        flops = -1.0  # -1: not compiled
    else:
        compiled = lowered.compile(compiler_options=options)
        stats = fit.compiled_memory(compiled)  # the trainer's fit check reads the same figures
        flops = fit.xla_flops(compiled, -1.0)
    t2 = time.perf_counter()
    stats["total_bytes"] = peak_bytes(stats)
    return {
        "preset": preset, "devices": n_dev, "mesh": dict(mesh.shape), "per_device_batch": per_device_batch,
        "accum": int(accum),
        "global_batch": global_batch, "bucket": f"{width}x{height}", "dtype": cfg.model.dtype,
        "remat": cfg.model.remat, "attention": cfg.model.attention,
        "trainable": cfg.train.get("trainable", "unet"),
        "split_head_dim": bool(cfg.model.split_head_dim), "ff_chunks": int(cfg.model.get("ff_chunks", 1)),
        "optimizer": cfg.train.optimizer,
        "ema": bool(cfg.ema.enabled),
        "trained_params": models.count_params(abstract_params),
        "frozen_params": sum(models.count_params(v) for v in frozen_abs.values()),
        **stats,
        "breakdown": {  # per-device bytes of the argument groups, from the shardings
            "params": _shard_bytes(abstract_state.params, st_sh.params),
            "opt_state": _shard_bytes(abstract_state.opt_state, st_sh.opt_state),
            "ema_params": _shard_bytes(abstract_state.ema_params, st_sh.ema_params),
            "frozen": _shard_bytes(frozen_abs, frozen_sh),
            "batch": _shard_bytes(batch_in, jax.tree.map(lambda x: x.sharding, batch_in)),
        },
        "flops_per_device": flops,
        "flops_global": fit.xla_flops(lowered, -1.0),
        "lower_s": round(t1 - t0, 1), "compile_s": round(t2 - t1, 1),
        "until_buffers": until_buffers,
        "scheduler": options.get("xla_cpu_scheduler_type", "default"),
        "bf16_kept": all(p in options.get("xla_disable_hlo_passes", "") for p in ACCELERATOR_PASSES_SKIPPED),
    }


def print_report(r: dict) -> None:
    print(f"{r['preset']} train step | {r['devices']} devices mesh {r['mesh']} | bucket {r['bucket']} | "
          f"per-device batch {r['per_device_batch']} (global {r['global_batch']}) | dtype {r['dtype']} | "
          f"remat {r['remat']} | attention {r['attention']}{' split_head_dim' if r['split_head_dim'] else ''}"
          f"{' | ff_chunks ' + str(r['ff_chunks']) if r.get('ff_chunks', 1) > 1 else ''}")
    print(f"trains {r['trainable']}: {r['trained_params'] / 1e9:.3f} B params, frozen {r['frozen_params'] / 1e9:.3f} B; "
          f"optimizer {r['optimizer']}, EMA {'on' if r['ema'] else 'off'}")
    simulated = r.get("scheduler") == SIMULATION_OPTIONS["xla_cpu_scheduler_type"]
    note = ""
    if simulated and r["dtype"] == "bfloat16":
        note = ("; bfloat16 ops kept in bfloat16 as on TPU/GPU" if r.get("bf16_kept") else
                "; XLA:CPU ran bfloat16 dots, convolutions and gathers in float32 (an overestimate): "
                "--until-buffers keeps the accelerators' dtypes")
    print(f"per device (GiB, XLA:CPU estimate{note}):")
    for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes"):
        print(f"  {k[:-6]:<10} {fmt_gib(r[k]):>8}")
    print(f"  {'total':<10} {fmt_gib(r['total_bytes']):>8}   (argument + output − alias + temp)")
    print("  arguments by group: " + ", ".join(f"{k} {fmt_gib(v)}" for k, v in r["breakdown"].items()))
    per_device = (f"{r['flops_per_device'] / 1e12:.2f} TFLOP per device" if r["flops_per_device"] >= 0
                  else "per device: not compiled to the end")
    print(f"FLOPs per step: {r['flops_global'] / 1e12:.2f} TFLOP global, {per_device}")
    print("fits: " + ", ".join(f"{k} {v}" for k, v in fits(r["total_bytes"]).items()))
    what = "buffers assigned" if r.get("until_buffers") else "compiled"
    print(f"(lowered in {r['lower_s']} s, {what} in {r['compile_s']} s)")


# ---- the table -----------------------------------------------------------------------------------
_FIT_MARK = {"yes": "✓", "tight": "~", "no": "✗"}


def variant_label(remat: str, attention: str) -> str:
    return remat + (" + memory-efficient attention" if attention == "memory_efficient" else "")


def table_markdown(rows: list[dict], command: str) -> str:
    lines = [
        "# Memory plan: full-size SDXL train step",
        "",
        f"Generated by `{command}` (per-device figures from XLA's buffer assignment of the train",
        "step compiled ahead of time for simulated CPU devices with the memory-optimised scheduler:",
        "UNet 2.57 B params fp32 + AdamW moments + fp32 EMA, frozen CLIP-L + bigG text encoders run",
        "inside the step, bfloat16 compute, 3 token chunks; FSDP over all devices, bucket 1024×1024).",
        "",
        "| devices (FSDP) | per-device batch | remat | state + frozen (args) | temp | total | "
        "TFLOP/step (global) | v5e 16G | v4 32G | H100 80G | v5p 95G |",
        "|---:|---:|:--|---:|---:|---:|---:|:-:|:-:|:-:|:-:|",
    ]
    for r in rows:
        if "missing" in r:
            lines.append(f"| {r['devices']} | {r['per_device_batch']} | "
                         f"{variant_label(r['remat'], r['attention'])} | not run | | | | | | | |")
            continue
        f = fits(r["total_bytes"])
        lines.append(
            f"| {r['devices']} | {r['per_device_batch']} | {variant_label(r['remat'], r['attention'])} | "
            f"{fmt_gib(r['argument_bytes'])} | {fmt_gib(r['temp_bytes'])} | **{fmt_gib(r['total_bytes'])}** | "
            f"{r['flops_global'] / 1e12:.1f}{'†' if r['attention'] == 'memory_efficient' else ''} | "
            + " | ".join(_FIT_MARK[f[name]] for name, _ in ACCELERATORS) + " |")
    lines += [
        "",
        "GiB per device. total = arguments + outputs − aliased (the donated train state is updated",
        f"in place) + temporaries. ✓ fits with ≥{100 - FIT_MARGIN * 100:.0f} % to spare, ~ fits "
        "but tight, ✗ does not fit. † XLA's cost analysis counts a loop body once, so the FLOPs of",
        "the chunked (memory-efficient) attention loops are undercounted (remat with standard",
        "attention: 208.6 TFLOP on 8 devices at batch 1, against 181.4 counted here).",
        "",
        "Caveat: these are XLA:CPU buffer assignments. TPU and GPU compilers fuse differently, use",
        "other layouts (TPU pads minor dimensions to 128/8 tiles) and schedule FSDP all-gathers",
        "differently (the latency-hiding scheduler bounds how many gathered weights are live at",
        "once), so read the table as an estimate and a trend, not an exact HBM budget; confirm on",
        "the target with `compiled.memory_analysis()` of the real backend (same tool, no",
        "`--devices`).",
    ]
    return "\n".join(lines) + "\n"


FINDINGS_MARKER = "<!-- findings: kept when the table is regenerated -->"


def write_table(out: str, markdown: str) -> None:
    """Write the generated table, keeping any hand-written text after FINDINGS_MARKER."""
    kept = ""
    if os.path.exists(out):
        with open(out) as f:
            old = f.read()
        if FINDINGS_MARKER in old:
            kept = "\n" + old[old.index(FINDINGS_MARKER):]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(markdown + kept)


def table_runs(bucket: str, workdir: str):
    """(devices, per-device batch, remat, attention, JSON path) of every run of the grid."""
    for n in TABLE_DEVICES:
        for b in TABLE_BATCHES:
            for remat, attention in TABLE_VARIANTS:
                yield n, b, remat, attention, os.path.join(
                    workdir, f"mem_d{n}_b{b}_{remat}_{attention}_{bucket}.json")


def run_table(config: str, bucket: str, out: str, workdir: str, collect_only: bool = False) -> None:
    """Every run of the grid in its own process (the simulated device count is fixed at JAX
    start-up), one after the other, each stopped once its buffers are assigned; finished runs
    (JSON in `workdir`) are reused and the markdown is rewritten after each one. `collect_only`:
    write the table from the finished runs, the others marked "not run"."""
    os.makedirs(workdir, exist_ok=True)
    rows = []
    command = f"python -m sdxl_jax.tools.memory_report --table --config {config} --bucket {bucket}"
    for n, b, remat, attention, path in table_runs(bucket, workdir):
        if not os.path.exists(path) and not collect_only:
            cmd = [sys.executable, "-m", "sdxl_jax.tools.memory_report", "--config", config,
                   "--devices", str(n), "--mesh", f"fsdp={n}", "--per-device-batch", str(b),
                   "--bucket", bucket, "--remat", remat, "--attention", attention,
                   "--until-buffers", "--json", path]
            print("running:", " ".join(cmd), flush=True)
            done = subprocess.run(cmd, check=False)
            if done.returncode:
                print(f"FAILED ({done.returncode}): {n} devices, batch {b}, {remat}/{attention}", flush=True)
        if os.path.exists(path):
            with open(path) as f:
                rows.append(json.load(f))
        else:
            rows.append({"devices": n, "per_device_batch": b, "remat": remat, "attention": attention,
                         "missing": True})
        write_table(out, table_markdown(rows, command))
    print(f"wrote {out} ({sum('missing' not in r for r in rows)} of {len(rows)} rows)")


# ---- CLI -------------------------------------------------------------------------------------------
def _set_device_count(n: int) -> None:
    """Simulate n CPU devices; must run before JAX is imported (the flag is read at start-up)."""
    if "jax" in sys.modules:
        raise RuntimeError("--devices must be applied before JAX is imported")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


@cli.entry_point
def main(argv=None) -> None:
    p = cli.ArgumentParser(prog="python -m sdxl_jax.tools.memory_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/ztsnr.py", help="config file[:preset] (default: the sdxl preset)")
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices (0 = use the real backend)")
    p.add_argument("--mesh", default="", help="e.g. fsdp=8 or data=2,fsdp=4 (default: FSDP over all devices)")
    p.add_argument("--per-device-batch", type=int, default=1, help="the micro-batch per device")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step (gradient "
                   "accumulation inside the step; memory adds the float32 gradient sum)")
    p.add_argument("--bucket", default="1024x1024", help="WIDTHxHEIGHT in pixels")
    p.add_argument("--remat", choices=REMAT_MODES, help="override model.remat")
    p.add_argument("--attention", choices=("standard", "memory_efficient", "dot_product", "splash", "auto"),
                   help="override model.attention (simulated CPU devices cannot run the fused "
                        "kernels: auto / splash are measured as memory_efficient there)")
    p.add_argument("--split-head-dim", action="store_true", help="set model.split_head_dim")
    p.add_argument("--ff-chunks", type=int, default=0, help="override model.ff_chunks (the "
                   "feed-forward over N token chunks)")
    p.add_argument("--trainable", choices=("unet", "unet+text", "lora"), help="override train.trainable")
    p.add_argument("--lora-rank", type=int, default=0, help="lora.rank (and alpha) for --trainable lora")
    p.add_argument("--text-encoders", default="", help="with --trainable unet+text: l, g or l,g")
    p.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), help="override model.dtype")
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    p.add_argument("--explain", type=int, default=0, metavar="N",
                   help="dump the compile (xla_dump_to) and list the N largest groups of buffers "
                        "live at the peak")
    p.add_argument("--until-buffers", action="store_true",
                   help="stop once XLA has assigned buffers (every memory figure is final then): "
                        "skips code generation, about half of a full-size CPU compile")
    p.add_argument("--dump-dir", default="", help="where --explain / --until-buffers dump "
                   "(default: a temporary directory, removed afterwards)")
    p.add_argument("--table", action="store_true", help=f"run the grid {TABLE_DEVICES} devices × "
                   f"batch {TABLE_BATCHES} × (remat, attention) {TABLE_VARIANTS} and write --out")
    p.add_argument("--collect", action="store_true",
                   help="with --table: write the table from the finished runs only")
    p.add_argument("--out", default="docs/memory.md", help="markdown written by --table")
    p.add_argument("--workdir", default="/tmp/sdxl_jax_memory_report", help="per-run JSON of --table")
    a = p.parse_args(argv)
    height, width = parse_bucket(a.bucket)  # fail on bad input before any compile
    if a.per_device_batch < 1:
        p.error("--per-device-batch must be ≥ 1")
    if a.collect and not a.table:
        p.error("--collect only applies to --table")
    if a.until_buffers and not a.devices:
        p.error("--until-buffers reads XLA:CPU's buffer-assignment dump: use it with --devices N")
    if a.table:
        run_table(a.config, a.bucket, a.out, a.workdir, collect_only=a.collect)
        return
    mesh_axes = parse_mesh(a.mesh) if a.mesh else {"data": 1, "fsdp": -1}
    options = {}
    if a.devices:
        _set_device_count(a.devices)
        options.update(simulation_options(a.until_buffers))
        if a.until_buffers:  # XLA logs the expected code-generation failure (see simulation_options)
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    dump_dir = ""
    if a.explain or a.until_buffers:
        import tempfile
        dump_dir = a.dump_dir or tempfile.mkdtemp(prefix="sdxl_jax_memory_dump_")
        options.update(xla_dump_to=dump_dir, xla_dump_hlo_module_re=".*train_step.*")
    cfg = load_config(a.config)
    cfg.mesh.data, cfg.mesh.fsdp = mesh_axes["data"], mesh_axes["fsdp"]
    for key, value in (("remat", a.remat), ("attention", a.attention), ("dtype", a.dtype)):
        if value is not None:
            cfg.model[key] = value
    if a.split_head_dim:
        cfg.model.split_head_dim = True
    if a.ff_chunks:
        cfg.model.ff_chunks = a.ff_chunks
    if a.trainable:
        cfg.train.trainable = a.trainable
    if a.lora_rank:
        cfg.lora.rank, cfg.lora.alpha = a.lora_rank, float(a.lora_rank)
    if a.text_encoders:
        chosen = set(a.text_encoders.split(","))
        cfg.text_encoders.train_l, cfg.text_encoders.train_g = "l" in chosen, "g" in chosen
    asked = cfg.model.attention
    if a.devices and asked in ("auto", "splash"):
        # XLA:CPU runs no fused kernel; chunked attention holds no L×L matrix either, so its
        # buffers stand in for the flash kernels' (which hold less still)
        cfg.model.attention = "memory_efficient"
        print(f"model.attention={asked}: simulated CPU devices have no fused kernel; measured as "
              "memory_efficient (an upper bound for flash/splash attention)")
    report = analyze(cfg, a.per_device_batch, height, width, accum=a.accum, compiler_options=options,
                     until_buffers=a.until_buffers)
    report["attention_asked"] = asked
    print_report(report)
    if a.explain:
        peak, rows = peak_buffers(dump_dir)
        print(f"buffers live at the peak ({fmt_gib(peak)} GiB incl. arguments), largest groups:")
        for shape, phase, n, b in rows[:a.explain]:
            print(f"  {fmt_gib(b):>7} GiB  {n:>5} × {shape:<28} {phase}")
        report["peak_buffers"] = [list(r) for r in rows[:a.explain]]
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    temporary = dump_dir if dump_dir and not a.dump_dir else ""
    if a.until_buffers:
        # The compile is still generating code (and dumping it) in a thread that cannot be
        # stopped: end the process, and remove the temporary dump once it is gone.
        if temporary:
            subprocess.Popen([sys.executable, "-c", "import shutil, sys, time; time.sleep(2); "
                              "shutil.rmtree(sys.argv[1], ignore_errors=True)", temporary],
                             start_new_session=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    if temporary:
        import shutil
        shutil.rmtree(temporary, ignore_errors=True)


if __name__ == "__main__":
    main()
