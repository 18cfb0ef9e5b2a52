"""Will the compiled step fit the device? Checked before the first step, from XLA's own figures.

An allocator failure mid-run (often after minutes of compiling and restoring) names a buffer,
not a fix. XLA has already decided every buffer of the program when it compiles: the bytes one
device holds while the step runs are its arguments (state, frozen encoders, batch) + outputs −
outputs aliased to donated arguments (the train state is updated in place) + temporaries
(`Compiled.memory_analysis()`, per device for an SPMD program). The device's allocator limit
is `Device.memory_stats()["bytes_limit"]` (GPU: the client's memory fraction of HBM; TPU: HBM);
CPU reports no stats, so there the check runs only with an explicit limit (`train.fit_check`).
`tools/memory_report` reports the same per-device figure (`compiled_memory`, `needed_bytes`).

No JAX import: the config checks parse `train.fit_check` with `parse_fit_check` before any
device is set up.
"""
from __future__ import annotations

import dataclasses
import math
import re

GIB = 1024 ** 3
# train.fit_check sizes: binary (KiB…TiB) and decimal (KB…TB) units, as vendors quote both
_UNITS = {"": 1, "B": 1, "KIB": 1024, "MIB": 1024 ** 2, "GIB": GIB, "TIB": 1024 ** 4,
          "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12}
FIT_CHECK_MODES = ("auto", "off")


class FitError(RuntimeError):
    """The compiled program needs more device memory than the device has."""


def parse_fit_check(value, key: str = "train.fit_check"):
    """`train.fit_check` → "auto" (check against the device's limit; none on CPU), "off", or a
    limit in bytes (an int, or a string such as "16GiB", "80GB", "1.5GiB", "17179869184")."""
    if isinstance(value, str) and value.strip().lower() in FIT_CHECK_MODES:
        return value.strip().lower()
    size = None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", value.upper())
        if m and m.group(2) in _UNITS:
            size = int(float(m.group(1)) * _UNITS[m.group(2)])
    if size is None or size <= 0:
        raise ValueError(f"{key}={value!r}: expected 'auto', 'off' or a positive byte size such as "
                         f"'16GiB', '80GB' or 17179869184")
    return size


def compiled_memory(compiled) -> dict:
    """Per-device bytes of a `jax.stages.Compiled`, by XLA's buffer assignment (the keys
    tools/memory_report prints)."""
    mem = compiled.memory_analysis()
    if isinstance(mem, (list, tuple)):  # one entry per program on some backends; all the same SPMD program
        mem = mem[0]
    if mem is None:
        raise FitError("this backend's compiled programs report no memory_analysis(), so "
                       "train.fit_check cannot check them: set train.fit_check=off (or auto)")
    return {"argument_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes),
            "alias_bytes": int(mem.alias_size_in_bytes),
            "temp_bytes": int(mem.temp_size_in_bytes),
            "code_bytes": int(mem.generated_code_size_in_bytes)}


def xla_flops(stage, missing: float = float("nan")) -> float:
    """XLA's FLOP count of a `jax.stages.Lowered` (the global program) or `Compiled` (one
    device's share), or `missing` where the backend reports none."""
    cost = stage.cost_analysis()
    if isinstance(cost, (list, tuple)):  # one entry per program on some backends
        cost = cost[0] if cost else None
    return float(cost.get("flops", missing)) if cost else missing


def needed_bytes(stats: dict) -> int:
    """Bytes live on one device while the step runs: arguments + outputs not aliased to the
    (donated) arguments + temporaries."""
    return stats["argument_bytes"] + stats["output_bytes"] - stats["alias_bytes"] + stats["temp_bytes"]


def device_limit(devices) -> int | None:
    """The smallest allocator limit (bytes) among `devices`; None when one reports none (CPU).
    Devices of other hosts (a multi-host mesh) cannot be asked and are skipped: the hosts run
    the same program on the same kind of device."""
    limits = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except RuntimeError:  # XlaRuntimeError: not addressable from this process
            continue
        if not stats or "bytes_limit" not in stats:
            return None
        limits.append(int(stats["bytes_limit"]))
    return min(limits) if limits else None


def _gib(n: float) -> str:
    """A byte count for people: GiB, or MiB below one GiB (small test programs, CPU)."""
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / 2 ** 20:.2f} MiB"


def suggestions(cfg, stats: dict, limit: int, mesh_shape: dict | None = None) -> list[str]:
    """Settings that lower the per-device bytes, with estimates where the figures allow.

    Activations (the temporaries) grow about linearly with the per-device batch, so the batch
    that fits is estimated from them; the state is divided by the FSDP axis size."""
    out = []
    needed = needed_bytes(stats)
    fixed = needed - stats["temp_bytes"]  # arguments and outputs: state, frozen encoders, batch
    train, model = cfg.get("train", {}), cfg.get("model", {})
    batch = train.get("per_device_batch_size")
    if isinstance(batch, int) and batch > 1 and stats["temp_bytes"] > 0:
        fitting = math.floor(batch * (limit - fixed) / stats["temp_bytes"])
        if 1 <= fitting < batch:
            out.append(f"train.per_device_batch_size={fitting} (≈{_gib(fixed + stats['temp_bytes'] * fitting / batch)};"
                       f" gradient accumulation keeps the global batch)")
        elif fitting < 1:
            out.append(f"train.per_device_batch_size=1 (activations are "
                       f"{_gib(stats['temp_bytes'])} at {batch})")
    if model.get("remat") == "none":
        out.append("model.remat=blocks (each resnet and transformer layer recomputed in the "
                   "backward pass: activations ≈ one layer's)")
    if model.get("attention") == "standard":
        out.append("model.attention=auto (a fused kernel: no L×L attention matrix in memory)")
    if int(model.get("ff_chunks", 1)) <= 1:
        out.append("model.ff_chunks=4 (each feed-forward over 4 token chunks: SDXL at 1024², batch 2, "
                   "FSDP-8 needs 11.99 instead of 16.88 GiB)")
    if mesh_shape:
        n = math.prod(mesh_shape.values())
        fsdp = int(mesh_shape.get("fsdp", 1))
        if fsdp < n:
            out.append(f"mesh.fsdp=-1 with mesh.data=1 (parameters, optimizer state and EMA "
                       f"sharded over all {n} devices instead of {fsdp})")
        else:
            out.append(f"more devices on the FSDP axis (all {n} shard the state already; "
                       f"its bytes per device scale as 1/devices)")
    if fixed > limit:
        out.append(f"the arguments alone (state, frozen encoders, batch) need {_gib(fixed)}: "
                   f"only more FSDP sharding or a smaller optimizer state helps")
    return out


@dataclasses.dataclass(frozen=True)
class FitReport:
    needed: int  # bytes per device
    available: int | None  # bytes per device; None: not known (CPU), nothing checked
    stats: dict

    def line(self) -> str:
        if self.needed < 0:
            return "device memory: not reported by this backend (fit check skipped)"
        where = f"of {_gib(self.available)}" if self.available else "(no device limit known)"
        return f"device memory: {_gib(self.needed)} per device {where}"


def check_fit(compiled, devices, limit_bytes: int | None = None, suggestions=(),
              what: str = "the train step", source: str = "") -> FitReport:
    """Raise FitError, one message with the bytes needed and available and `suggestions`
    (strings, e.g. from `suggestions()` above, or a callable (stats, limit) → strings), when
    `compiled` needs more than `limit_bytes` (default: the devices' own limit) on a device.
    No limit given and none reported (CPU): nothing is checked."""
    limit = limit_bytes if limit_bytes is not None else device_limit(devices)
    if limit is None and compiled.memory_analysis() is None:
        return FitReport(-1, None, {})  # nothing to check against, nothing to report
    stats = compiled_memory(compiled)
    need = needed_bytes(stats)
    if limit is not None and need > limit:
        source = source or ("train.fit_check" if limit_bytes is not None
                            else "the device's bytes_limit")
        tips = suggestions(stats, limit) if callable(suggestions) else list(suggestions)
        parts = (f"arguments {_gib(stats['argument_bytes'])} + outputs {_gib(stats['output_bytes'])} "
                 f"− aliased {_gib(stats['alias_bytes'])} + temporaries {_gib(stats['temp_bytes'])}")
        raise FitError(
            f"{what} needs {_gib(need)} ({need} bytes) per device ({parts}) but {source} allows "
            f"{_gib(limit)} ({limit} bytes); to fit, try: "
            + ("; ".join(tips) if tips else "none known for this config")
            + ". Or set train.fit_check=off to try anyway.")
    return FitReport(need, limit, stats)


def check_step_fit(compiled, devices, cfg, mesh_shape: dict | None = None,
                   what: str = "the train step") -> FitReport | None:
    """The trainer's one call: `cfg.train.fit_check` read ("auto" | "off" | a byte limit), the
    compiled step checked against it with this config's suggestions. None when "off"."""
    setting = parse_fit_check(cfg.train.get("fit_check", "auto"))
    if setting == "off":
        return None
    limit = None if setting == "auto" else setting
    return check_fit(compiled, devices, limit, what=what,
                     suggestions=lambda stats, lim: suggestions(cfg, stats, lim, mesh_shape))
