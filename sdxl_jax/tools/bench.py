"""Throughput of the train step on this machine, against a matmul peak and PyTorch diffusers.

    python -m sdxl_jax.tools.bench [--models tiny,mid] [--steps 8] [--sections peak,step,spmd,torch]

For each UNet size ("tiny" = the tiny preset; "mid" = SDXL's block structure, layers per block
and transformer depths (1, 2, 10), at 1/5 of its widths) it reports, at batch --batch of
--latent² latents on ONE device:

- step: the real train step (UNet fwd+bwd, AdamW, EMA, frozen tiny text encoders; the
  loop's CompiledStep on a 1-device mesh): steps/s and samples/s of the bare compiled step
  (state and batch already on device), XLA's FLOPs per step, the achieved fraction of a
  matmul peak measured in the same run, host overhead (the loop's way: numpy batch →
  `parallel.global_batch` → step, metrics read one step late, over the bare time), and the
  compile count after several steps of one bucket (must be 1).
- spmd: the same jitted step with inputs on a SingleDeviceSharding vs a NamedSharding of a
  1-device mesh, plus the UNet-only step both ways.
- torch: the same-config diffusers UNet2DConditionModel train step (fwd+bwd+AdamW, eager,
  float32) against the JAX UNet-only step (fwd+bwd+AdamW); torch is imported only here.

Timing is the median over --steps calls after a warm-up; nothing is asserted. The machine's
other load shows up in the figures, so compare ratios measured in one run.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from sdxl_jax import cli
from sdxl_jax.fit import xla_flops

SECTIONS = ("peak", "step", "spmd", "torch")


# ---- model sizes ---------------------------------------------------------------------------------
def unet_sizes(name: str) -> dict:
    """UNet config: "tiny" or "mid" (models/presets.py: SDXL structure, 1/5 width)."""
    from sdxl_jax.models import presets
    if name not in ("tiny", "mid"):
        raise ValueError(f"--models: unknown model {name!r}; choose tiny or mid")
    return presets.unet_config(name)


def unet_params(unet, sizes: dict, seed: int = 0):
    """Random float32 parameters for a UNet of any size, by the rule `models.init_params` uses
    (host-side numpy per leaf: no compile)."""
    import jax
    import jax.numpy as jnp
    from sdxl_jax.models import build
    from sdxl_jax.models.unet import dummy_inputs
    abstract = jax.eval_shape(lambda: unet.init(jax.random.key(0), *dummy_inputs(sizes)))["params"]
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(build._leaf_value("unet", build._path_names(p), tuple(x.shape), [seed])),
        abstract)


def host_batch(batch: int, latent: int, max_chunks: int, seed: int = 0) -> dict:
    """One numpy batch in the trainer's batch contract (tiny-vocabulary token ids)."""
    from sdxl_jax.models import SEQ_LEN
    from sdxl_jax.models.tokenizer import tiny_vocab_size
    rng = np.random.default_rng(seed)
    ids = (batch, max_chunks * SEQ_LEN)
    px = float(latent * 8)
    return {"latents": rng.standard_normal((batch, latent, latent, 4), np.float32),
            "time_ids": np.tile(np.array([[px, px, 0, 0, px, px]], np.float32), (batch, 1)),
            "loss_weight": np.ones((batch,), np.float32),
            "input_ids_l": rng.integers(0, tiny_vocab_size(), ids, dtype=np.int32),
            "input_ids_g": rng.integers(0, tiny_vocab_size(), ids, dtype=np.int32)}


def timed(fn, n: int, warmup: int = 1) -> dict:
    """Wall seconds (median and min) and process CPU seconds (median, all threads) of fn(),
    which must block until its result is ready. CPU seconds are less sensitive to other load on
    a shared machine (though spin-waiting threads inflate them); min wall approximates an idle
    machine."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"wall": float(np.median(wall)), "wall_min": float(min(wall)), "cpu": float(np.median(cpu))}


def interleaved(runners: dict, n: int) -> dict:
    """`timed` of each runner, one call of each in turn n times (after one warm-up each), so a
    change in the machine's load hits every variant alike."""
    for run in runners.values():
        run()
    samples = {k: [] for k in runners}
    for _ in range(n):
        for k, run in runners.items():
            samples[k].append(timed(run, 1, warmup=0))
    return {k: {"wall": float(np.median([t["wall"] for t in v])),
                "wall_min": float(min(t["wall"] for t in v)),
                "cpu": float(np.median([t["cpu"] for t in v]))} for k, v in samples.items()}


def fmt(t: dict) -> str:
    return f"{t['wall']:.3f} s (min {t['wall_min']:.3f}, CPU {t['cpu']:.2f} s)"


# ---- sections ------------------------------------------------------------------------------------
def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of a large jitted float32 matmul: the practical compute ceiling of this CPU."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    return 2.0 * n ** 3 / timed(lambda: f(a, a).block_until_ready(), reps)["wall_min"]


class TrainSetup:
    """The loop's train step for a UNet size on a 1-device mesh: step fn, state, frozen, batch."""

    def __init__(self, model: str, batch: int, latent: int, dtype: str = "float32"):
        import jax
        from sdxl_jax import models, parallel
        from sdxl_jax.config import load_config
        from sdxl_jax.models.build import build_unet
        from sdxl_jax.run_inputs import resolve_weights
        from sdxl_jax.train.program import build_program
        from sdxl_jax.train.unet_task import program_spec

        cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "ztsnr.py") + ":tiny")
        cfg.model.dtype = dtype
        cfg.mesh.data, cfg.mesh.fsdp = 1, 1
        self.cfg, self.batch_size, self.latent = cfg, batch, latent
        self.sizes = unet_sizes(model)
        self.unet = build_unet(self.sizes, cfg.model.dtype)
        params = unet_params(self.unet, self.sizes)
        self.n_params = models.count_params(params)
        # the trainer's program with this UNet size: same update, shardings and batch contract
        self.spec = program_spec(cfg, unet=self.unet, abstract_unet=jax.eval_shape(lambda: params))
        self.program = build_program(self.spec, parallel.ShardingPlan.from_config(cfg.mesh, jax.devices()[:1]))
        self.mesh = self.program.plan.mesh
        self.tx = self.spec.tx
        self.state_sh, self.frozen_sh = self.program.shardings, self.program.frozen_shardings
        self.state = self.program.init_state(params, jax.random.PRNGKey(0))
        # the frozen text encoders as the trainer loads them (run_inputs: the seeded tiny ones)
        self.frozen = resolve_weights(cfg).load(("text_l", "text_g"), self.frozen_sh)
        self.step_fn = self.program.update
        self.host_batch = host_batch(batch, latent, int(cfg.text.max_chunks))


def bench_step(s: TrainSetup, n: int) -> dict:
    """Bare compiled step vs the loop's way of feeding it; FLOPs; compile count."""
    import jax
    from sdxl_jax import parallel

    step = s.program.step
    batch = parallel.global_batch(s.host_batch, s.mesh)
    t0 = time.perf_counter()
    state, metrics = step(s.state, s.frozen, batch)  # compiles (once per batch signature)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    compiled = step.compiled_for(state, s.frozen, batch)

    def bare():
        nonlocal state
        state, metrics = compiled(state, s.frozen, batch)
        jax.block_until_ready(metrics)
    bare_t = timed(bare, n)

    # The loop's way: a fresh global batch from numpy every step, the previous step's metrics
    # read after dispatching this one; one step = one iteration of that loop.
    pending = None

    def loop_iter():
        nonlocal state, pending
        state, metrics = step(state, s.frozen, parallel.global_batch(s.host_batch, s.mesh))
        if pending is not None:
            jax.device_get(pending)
        pending = metrics
    loop_t = timed(loop_iter, n)
    jax.device_get(pending)
    s.state = state
    return {"compile_s": compile_s, "bare": bare_t, "loop": loop_t, "flops": xla_flops(compiled),
            "compile_count": step.compile_count, "steps_run": 2 * n + 3}


def unet_only_step(unet, tx):
    """fwd+bwd of an MSE on the UNet output + AdamW: the same work as the torch side."""
    import jax
    import jax.numpy as jnp
    import optax
    from sdxl_jax.models import unet_apply

    def step(params, opt_state, b):
        def loss(p):
            out = unet_apply(unet, p, b["z"], b["t"], b["ctx"], b["pooled"], b["time_ids"])
            return jnp.mean((out - b["target"]) ** 2)
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value
    return step


def unet_only_inputs(sizes: dict, batch: int, latent: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    px = float(latent * 8)
    pooled = sizes["projection_class_embeddings_input_dim"] - 6 * sizes["addition_time_embed_dim"]
    return {"z": rng.standard_normal((batch, latent, latent, 4), np.float32),
            "t": rng.uniform(0, 999, (batch,)).astype(np.float32),
            "ctx": rng.standard_normal((batch, 77, sizes["cross_attention_dim"]), np.float32),
            "pooled": rng.standard_normal((batch, pooled), np.float32),
            "time_ids": np.tile(np.array([[px, px, 0, 0, px, px]], np.float32), (batch, 1)),
            "target": rng.standard_normal((batch, latent, latent, 4), np.float32)}


def unet_only_runner(s: TrainSetup, sharding, compiler_options: dict | None = None):
    """A no-argument callable running one UNet-only step with every input on `sharding`,
    compiled with the train step's options for those devices (program.compiler_options) unless
    `compiler_options` is given."""
    import jax
    import optax
    from sdxl_jax.train.program import compiler_options as step_options
    if compiler_options is None:
        compiler_options = step_options(sharding.device_set)
    tx = optax.adamw(1e-4)
    params = jax.device_put(s.state.params, sharding, may_alias=False)
    opt_state = jax.device_put(tx.init(params), sharding)
    inputs = jax.device_put(unet_only_inputs(s.sizes, s.batch_size, s.latent), sharding)
    compiled = jax.jit(unet_only_step(s.unet, tx), donate_argnums=(0, 1)).lower(
        params, opt_state, inputs).compile(compiler_options=compiler_options)

    def run():
        nonlocal params, opt_state
        params, opt_state, loss = compiled(params, opt_state, inputs)
        loss.block_until_ready()
    return run


def train_step_runner(s: TrainSetup, state_sh, frozen_sh, batch_sh, program=None):
    """A no-argument callable running one train step: plain jax.jit with inputs placed on the
    given shardings (program=None), or a train program's CompiledStep on its mesh."""
    import jax
    from sdxl_jax import parallel
    from sdxl_jax.train.program import compiler_options
    state = jax.device_put(s.state, state_sh, may_alias=False)
    frozen = jax.device_put(s.frozen, frozen_sh)
    if program is None:  # the train step's compile options, as the loop's step gets them
        batch = jax.device_put(s.host_batch, batch_sh)
        compiled = jax.jit(s.step_fn, donate_argnums=(0,)).lower(state, frozen, batch).compile(
            compiler_options=compiler_options(batch_sh.device_set))
    else:  # the loop's own executable
        batch = parallel.global_batch(s.host_batch, program.plan.mesh)
        compiled = program.step.compiled_for(state, frozen, batch)

    def run():
        nonlocal state
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(metrics)
    return run


def bench_spmd(s: TrainSetup, n: int) -> dict:
    """One train step program fed SingleDeviceSharding inputs, 1-device
    NamedSharding inputs, through CompiledStep on a 1-device mesh, and (when more devices are
    visible) through CompiledStep on a data-parallel mesh over all of them; timed interleaved
    so a change in the machine's load hits every variant alike."""
    import jax
    from jax.sharding import SingleDeviceSharding
    from ml_collections import ConfigDict
    from sdxl_jax import parallel
    from sdxl_jax.train.program import build_program
    single = SingleDeviceSharding(s.mesh.devices.flat[0])
    named = parallel.replicated(s.mesh)
    runners = {
        "train: jit, SingleDeviceSharding": train_step_runner(s, single, single, single),
        "train: jit, NamedSharding (1 device)": train_step_runner(s, named, named, named),
        "train: CompiledStep, 1-device mesh": train_step_runner(s, s.state_sh, s.frozen_sh, None, s.program),
        "UNet-only: jit, SingleDeviceSharding": unet_only_runner(s, single),
        "UNet-only: jit, NamedSharding (1 device)": unet_only_runner(s, named),
    }
    if jax.device_count() > 1:
        plan = parallel.ShardingPlan.from_config(ConfigDict({"data": -1, "fsdp": 1,
                                                             "min_fsdp_size": s.cfg.mesh.min_fsdp_size}))
        prog = build_program(s.spec, plan)
        runners[f"train: CompiledStep, {jax.device_count()}-device data mesh"] = \
            train_step_runner(s, prog.shardings, prog.frozen_shardings, None, prog)
    return interleaved(runners, n)


def torch_unet_step_time(sizes: dict, batch: int, latent: int, n: int, threads: int) -> dict:
    """The same-config diffusers UNet2DConditionModel, eager float32: fwd+bwd+AdamW per step."""
    import torch
    from diffusers import UNet2DConditionModel
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = UNet2DConditionModel(**sizes).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = {k: torch.from_numpy(v) for k, v in unet_only_inputs(sizes, batch, latent).items()}
    z, target = x["z"].permute(0, 3, 1, 2).contiguous(), x["target"].permute(0, 3, 1, 2).contiguous()
    cond = {"text_embeds": x["pooled"], "time_ids": x["time_ids"]}

    def run():
        opt.zero_grad(set_to_none=True)
        out = model(z, x["t"], x["ctx"], added_cond_kwargs=cond).sample
        torch.mean((out - target) ** 2).backward()
        opt.step()
    return timed(run, n)


def _sweep_main(a) -> None:
    from sdxl_jax.config_sections import MODEL_PRESETS
    if a.models not in MODEL_PRESETS:
        raise SystemExit(f"error: --backend sweeps one model preset: --models one of {MODEL_PRESETS}")
    os.environ["JAX_PLATFORMS"] = {"gpu": "cuda", "cpu": "cpu", "tpu": "tpu"}[a.backend]
    from sdxl_jax.tools import step_sweep
    batches = [int(b) for b in a.batches.split(",") if b]
    variants = tuple(tuple(v.split("/")) for v in a.variants.split(",") if v) or step_sweep.VARIANTS
    rows = step_sweep.sweep(a.models, batches, a.steps, a.side, variants, time_budget_s=a.budget)
    best = max((r for r in rows if "mfu" in r), key=lambda r: r["samples_s"], default=None)
    if best is not None:
        print(f"best: {step_sweep.format_row(best)}")
    if a.markdown:
        import jax
        with open(a.markdown, "w") as f:
            f.write(step_sweep.markdown(rows, f"{a.models} at {a.side}², jax {jax.__version__}, "
                                              f"{jax.devices()[0].device_kind}"))


# ---- CLI -------------------------------------------------------------------------------------------
@cli.entry_point
def main(argv=None) -> None:
    p = cli.ArgumentParser(prog="python -m sdxl_jax.tools.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,mid", help="comma-separated: tiny, mid")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--batch", type=int, default=8, help="per-step batch")
    p.add_argument("--latent", type=int, default=32, help="latent side (pixels / 8)")
    p.add_argument("--mid-batch", type=int, default=2, help="batch for the mid model (CPU-sized)")
    p.add_argument("--steps", type=int, default=8, help="timed calls per measurement")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="UNet/text compute dtype of the JAX step (params stay float32)")
    p.add_argument("--devices", type=int, default=0, help="simulated CPU devices (0 = leave XLA_FLAGS)")
    p.add_argument("--backend", choices=("cpu", "gpu", "tpu"), default="",
                   help="the sweep on one device of this backend (tools/step_sweep.py): the "
                        "trainer's step over --batches × remat × attention at --side² pixels; "
                        "--models sdxl (full size, random weights), tiny or micro")
    p.add_argument("--batches", default="1,2,4,8", help="per-device batches of the sweep")
    p.add_argument("--side", type=int, default=1024, help="sweep image side in pixels")
    p.add_argument("--variants", default="", help="sweep remat/attention pairs, e.g. "
                   "none/dot_product,blocks/memory_efficient (default: tools/step_sweep.VARIANTS)")
    p.add_argument("--budget", type=float, default=480.0, help="sweep time budget (s)")
    p.add_argument("--markdown", default="", help="also write the sweep table to this file")
    a = p.parse_args(argv)
    if a.backend:
        return _sweep_main(a)
    sections = set(filter(None, a.sections.split(",")))
    if sections - set(SECTIONS):
        p.error(f"--sections: unknown {sorted(sections - set(SECTIONS))}; choose from {SECTIONS}")
    models_ = [m for m in a.models.split(",") if m]
    for m in models_:
        unet_sizes(m)  # fail on a bad name before anything compiles
    if a.devices:
        from sdxl_jax.tools.memory_report import _set_device_count
        _set_device_count(a.devices)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s), "
          f"{os.cpu_count()} CPU cores; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)

    peak = float("nan")
    if "peak" in sections or "step" in sections:
        peak = matmul_peak()
        print(f"matmul peak (2048² float32, jitted): {peak / 1e9:.1f} GFLOP/s", flush=True)
    for m in models_:
        batch = a.batch if m == "tiny" else a.mid_batch
        s = TrainSetup(m, batch, a.latent, a.dtype)
        print(f"\n== {m}: UNet {s.n_params / 1e6:.2f} M params, batch {batch} of {a.latent}² latents, "
              f"{a.dtype} compute ==", flush=True)
        if "step" in sections:
            r = bench_step(s, a.steps)
            bare, loop = r["bare"], r["loop"]
            print(f"train step: {1 / bare['wall']:.2f} steps/s, {batch / bare['wall']:.1f} samples/s; "
                  f"bare step {fmt(bare)}; compiled in {r['compile_s']:.0f} s")
            print(f"  XLA FLOPs/step {r['flops'] / 1e9:.1f} G → {r['flops'] / bare['wall_min'] / 1e9:.1f} "
                  f"GFLOP/s at the fastest step = {r['flops'] / bare['wall_min'] / peak:.0%} of the matmul peak")
            print(f"  loop iteration (global_batch + step + metrics one step late): {fmt(loop)}; "
                  f"host overhead ×{loop['wall'] / bare['wall']:.2f} (median), "
                  f"×{loop['wall_min'] / bare['wall_min']:.2f} (min)")
            print(f"  compiles after {r['steps_run']} steps of one bucket: {r['compile_count']}", flush=True)
        if "spmd" in sections:
            r = bench_spmd(s, a.steps)
            print("SPMD check (same step function, interleaved runs):")
            for k, t in r.items():
                print(f"  {k:<44} {fmt(t)}")
            print(flush=True)
        if "torch" in sections:
            from jax.sharding import SingleDeviceSharding
            device = SingleDeviceSharding(jax.devices()[0])
            r = interleaved({"ours": unet_only_runner(s, device),
                             "plain": unet_only_runner(s, device, compiler_options={})}, a.steps)
            j, j0 = r["ours"], r["plain"]
            print(f"UNet-only fwd+bwd+AdamW, JAX jit, the train step's options: {fmt(j)}")
            print(f"  JAX jit, XLA defaults: {fmt(j0)} (the options: ×{j['wall'] / j0['wall']:.2f})")
            for threads in sorted({1, os.cpu_count() or 1}):
                t = torch_unet_step_time(s.sizes, batch, a.latent, a.steps, threads)
                print(f"  PyTorch eager, {threads} thread(s): {fmt(t)} → JAX/torch wall "
                      f"×{j['wall'] / t['wall']:.2f} (min ×{j['wall_min'] / t['wall_min']:.2f}), "
                      f"CPU ×{j['cpu'] / t['cpu']:.2f}; with XLA defaults ×{j0['wall'] / t['wall']:.2f}",
                      flush=True)

if __name__ == "__main__":
    sys.exit(main())
