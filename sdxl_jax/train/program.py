"""The train program of a task, built from the config alone (no weights, no data): abstract
state, its shardings, the frozen trees' shardings, the compiled step and the abstract batch of a
bucket. The trainer, `tools/memory_report`, `tools/bench` and the tests all build it here, so a
tool can never measure a different step from the one that trains (maxtext's train_compile).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from sdxl_jax import parallel
from sdxl_jax.checkpoint import abstract_with_shardings
from sdxl_jax.train.state import TrainState, create_state, init_state
from sdxl_jax.train.update import GradFn, make_update

# (rows, height, width) of a global batch → {name: ShapeDtypeStruct} (no sharding)
BatchSpec = Callable[[int, int, int], dict]


@dataclass(frozen=True)
class ProgramSpec:
    """What a task declares about its step."""
    name: str
    abstract_params: Any  # the trained tree (ShapeDtypeStructs)
    abstract_frozen: Any  # the frozen trees the step reads (ShapeDtypeStructs)
    tx: optax.GradientTransformation
    make_grad_fn: Callable[[Any], GradFn]  # params' shardings → per-micro-batch grad_fn
    ema: Any  # the ema config section
    per_device_batch: int  # micro-batch rows per device; 0 = the whole global batch at once
    batch_spec: BatchSpec
    norm_of: Callable | None = None  # the gradient subtree whose norm is logged and guarded


def _abstract_rng():
    return jax.ShapeDtypeStruct((2,), jnp.uint32)


@dataclass(frozen=True)
class Program:
    spec: ProgramSpec
    plan: parallel.ShardingPlan
    abstract_state: TrainState
    shardings: TrainState  # NamedSharding per state leaf
    frozen_shardings: Any
    step: "CompiledStep"
    micro_rows: int | None  # rows per micro-step over all devices (None: no accumulation)
    update: Callable  # the bare update(state, frozen, batch) the step compiles

    def init_state(self, params, rng) -> TrainState:
        """A fresh state from `params` (placed or host arrays), built sharded under jit."""
        return init_state(params, self.spec.tx, rng, self.shardings)

    def abstract_batch(self, rows: int, height: int, width: int) -> dict:
        spec = self.spec.batch_spec(rows, height, width)
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.plan.batch)
                for k, v in spec.items()}

    def abstract_inputs(self, rows: int, height: int, width: int):
        """(state, frozen, batch) as sharded ShapeDtypeStructs: what `lower` compiles from."""
        return (abstract_with_shardings(self.abstract_state, self.shardings),
                abstract_with_shardings(self.spec.abstract_frozen, self.frozen_shardings),
                self.abstract_batch(rows, height, width))

    def lower(self, rows: int, height: int, width: int):
        return self.step.lower(*self.abstract_inputs(rows, height, width))

    def compile(self, rows: int, height: int, width: int):
        """The executable the trainer runs for this batch shape (compiled once per process)."""
        return self.step.compiled_for(*self.abstract_inputs(rows, height, width))


def build_program(spec: ProgramSpec, plan: parallel.ShardingPlan) -> Program:
    abstract_state = jax.eval_shape(lambda p, r: create_state(p, spec.tx, r),
                                    spec.abstract_params, _abstract_rng())
    shardings = plan.shardings(abstract_state)
    frozen_shardings = plan.shardings(spec.abstract_frozen)
    micro_rows = spec.per_device_batch * plan.data_parallel if spec.per_device_batch else None
    update = make_update(spec.make_grad_fn(shardings.params), spec.tx, spec.ema, micro_rows,
                         shardings.params, plan.batch, spec.norm_of)
    step = CompiledStep(update, shardings, frozen_shardings, plan.mesh)
    return Program(spec, plan, abstract_state, shardings, frozen_shardings, step, micro_rows, update)


# Programs built in this process, by (fingerprint of everything their spec is built from, plan).
_PROGRAMS: dict = {}


def cached_program(fingerprint: list, make_spec: Callable[[], ProgramSpec],
                   plan: parallel.ShardingPlan) -> Program:
    """`build_program(make_spec(), plan)`, built once per process for each `fingerprint` (JSON
    values) and plan. A task's spec is a pure function of its config and a few values it derives
    from data (the latent statistics), which is what the tasks put in the fingerprint. A second
    `train()` of the same run in one process (an in-process restart, a notebook, the test suite)
    then neither traces nor lowers its step again: ~25 s a call on the tiny model on CPU."""
    key = (json.dumps(fingerprint, sort_keys=True), plan)
    program = _PROGRAMS.get(key)
    if program is None:
        program = _PROGRAMS[key] = build_program(make_spec(), plan)
    return program


class CompiledStep:
    """AOT-compiles the step once per batch-shape signature (one per bucket) and counts it.

    Shardings are explicit and the state is donated. The cache key is the batch's shapes, so
    a new bucket compiles exactly once and nothing else can trigger a recompile. Thread-safe:
    the compile pool (train/compile_pool.py) compiles several signatures at once while the
    loop runs another; a signature asked for twice at once compiles once.
    """

    def __init__(self, step_fn, state_shardings, frozen_shardings, mesh):
        self._mesh = mesh
        self._jitted = jax.jit(
            step_fn,
            in_shardings=(state_shardings, frozen_shardings, parallel.batch_sharding(mesh)),
            out_shardings=(state_shardings, parallel.replicated(mesh)),
            donate_argnums=(0,))
        self._compiled: dict = {}
        self._lowered: dict = {}  # lowered, not yet compiled: by batch signature
        self._locks: dict = {}  # one per signature: its lowering and compile happen once
        self._lock = threading.Lock()  # guards _locks
        self._run: set = set()  # signatures this process has executed (the barrier per shape)

    @staticmethod
    def signature(batch) -> tuple:
        return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))

    @property
    def compile_count(self) -> int:
        return len(self._compiled)

    def _lock_of(self, key) -> threading.Lock:
        with self._lock:
            return self._locks.setdefault(key, threading.Lock())

    def lower(self, state, frozen, batch):
        """The step lowered for this batch signature, kept until `compiled_for` compiles it: a
        tool that reads the lowered cost analysis first does not trace the step twice."""
        key = self.signature(batch)
        with self._lock_of(key):
            if key not in self._lowered:
                self._lowered[key] = self._jitted.lower(state, frozen, batch)
            return self._lowered[key]

    def is_compiled(self, batch) -> bool:
        return self.signature(batch) in self._compiled

    def compiled_for(self, state, frozen, batch):
        """The executable for this batch signature (arrays or ShapeDtypeStructs), compiled once."""
        key = self.signature(batch)
        fn = self._compiled.get(key)
        if fn is None:
            with self._lock_of(key):
                fn = self._compiled.get(key)
                if fn is None:
                    lowered = self._lowered.pop(key, None) or self._jitted.lower(state, frozen, batch)
                    fn = self._compiled[key] = _compile_once(lowered, self._mesh)
        return fn

    def __call__(self, state, frozen, batch):
        fn = self.compiled_for(state, frozen, batch)
        key = self.signature(batch)
        if key not in self._run:
            # every host reaches a shape's first step at the same step (the data plan is the
            # same on all), so the n-th new shape is the same barrier everywhere, whichever
            # host or thread compiled it and in what order
            self._run.add(key)
            parallel.host_barrier(f"compiled_step_{len(self._run)}")
        return fn(state, frozen, batch)


# Executables compiled in this process, by (program text, devices): a second `train()` in the
# same process (a new stage list, an in-process restart, the test suite) re-lowers its step but
# neither recompiles it nor reloads it from the persistent cache (which on XLA:CPU costs about
# half a compile). One entry per distinct step program, so a handful in any process.
_EXECUTABLES: dict = {}


# XLA:CPU's YNNPACK fusions for dots and reductions, without its default per-convolution one:
# the convolutions go to XLA's own CPU kernels. The tiny UNet's train step ×0.71, the mid
# preset's ×0.99 (docs/performance.md, 2026-12-08). An XLA_FLAGS setting of the same option wins.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                        "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


def compiler_options(devices) -> dict:
    """The compile options of a step that runs on `devices`: CPU_COMPILER_OPTIONS where every
    device is a CPU (the demo, CI, a laptop), none on an accelerator. `tools/memory_report`, which
    compiles for simulated CPU devices to predict an accelerator's memory, does not take them."""
    if any(d.platform != "cpu" for d in devices):
        return {}
    flags = os.environ.get("XLA_FLAGS", "")
    return {k: v for k, v in CPU_COMPILER_OPTIONS.items() if f"--{k}=" not in flags}


def _compile_once(lowered, mesh):
    key = (hashlib.sha256(lowered.as_text().encode()).hexdigest(),
           tuple(int(d.id) for d in mesh.devices.flat))
    compiled = _EXECUTABLES.get(key)
    if compiled is None:  # (two threads compiling the same text at once both keep one: harmless)
        options = compiler_options(mesh.devices.flat)
        compiled = _EXECUTABLES.setdefault(key, lowered.compile(compiler_options=options))
    return compiled
