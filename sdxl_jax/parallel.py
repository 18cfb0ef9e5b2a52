"""Device mesh, partition rules, batch sharding and multi-host start-up.

One mesh with named axes ("data", "fsdp"). Parameters are sharded by rules on their path:
large kernels are split over "fsdp" along their largest divisible axis (ZeRO-3 style), small
leaves are replicated. The batch is split over every device (("data", "fsdp") on axis 0), so
FSDP ranks also take distinct examples: that is what makes FSDP data parallel.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed(coordinator: str = "", num_processes: int = 0,
                                 process_id: int = -1) -> None:
    """Start jax.distributed for multi-host runs.

    Explicit arguments (CPU/GPU clusters, the 2-process test) win; otherwise on TPU pod slices
    and SLURM/Open MPI clusters `jax.distributed.initialize()` discovers everything itself.
    A single host with nothing configured stays single-process.
    """
    if jax.distributed.is_initialized():
        return
    if coordinator:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                                       "JAX_COORDINATOR_ADDRESS")):
        if os.environ.get("TPU_WORKER_HOSTNAMES", "localhost") in ("", "localhost"):
            return  # single-host TPU VM: nothing to coordinate
        jax.distributed.initialize()
    else:
        return
    log.info("jax.distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def host_barrier(name: str, timeout_s: float = 3600.0) -> None:
    """Wait until every process reaches `name` (coordination service, no device collective).

    Needed before a freshly compiled step first runs: one host may load the step from the
    persistent compilation cache in seconds while another compiles it for minutes, and the
    first collective's set-up (gloo on CPU) gives up after 30 s of waiting."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed
    distributed.global_state.client.wait_at_barrier(f"sdxl_jax/{name}", int(timeout_s * 1000))


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
    """Resolve one −1 axis so data × fsdp = num_devices; errors name the config key."""
    if data == -1 and fsdp == -1:
        raise ValueError("mesh.data and mesh.fsdp cannot both be -1")
    if data == -1:
        if num_devices % fsdp:
            raise ValueError(f"mesh.fsdp={fsdp} does not divide the {num_devices} devices")
        data = num_devices // fsdp
    if fsdp == -1:
        if num_devices % data:
            raise ValueError(f"mesh.data={data} does not divide the {num_devices} devices")
        fsdp = num_devices // data
    if data * fsdp != num_devices:
        raise ValueError(f"mesh.data × mesh.fsdp = {data}×{fsdp} ≠ {num_devices} devices")
    return data, fsdp


def make_mesh(mesh_cfg, devices: Sequence[Any] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    data, fsdp = mesh_shape(int(mesh_cfg.data), int(mesh_cfg.fsdp), len(devices))
    # create_device_mesh orders devices for the physical topology on TPU/GPU; CPU falls back.
    try:
        grid = jax.experimental.mesh_utils.create_device_mesh((data, fsdp), devices)
    except Exception:  # noqa: BLE001 — topology helpers reject simulated/odd device sets
        grid = np.asarray(devices).reshape(data, fsdp)
    return Mesh(grid, MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


# ---- partition rules ------------------------------------------------------------------------
# (regex over "a/b/c" parameter paths, rule). "fsdp" = shard the largest axis divisible by the
# fsdp size when the leaf is large; "replicate" = keep whole on every device. First match wins.
DEFAULT_RULES: tuple[tuple[str, str], ...] = (
    (r".*(norm|Norm|layer_norm|ln_).*", "replicate"),
    (r".*/bias$", "replicate"),
    (r".*", "fsdp"),
)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def spec_for(path: str, shape: Sequence[int], fsdp_size: int, min_size: int,
             rules=DEFAULT_RULES) -> P:
    for pattern, rule in rules:
        if re.fullmatch(pattern, path):
            break
    else:
        rule = "replicate"
    if rule == "replicate" or fsdp_size == 1 or int(np.prod(shape or (1,))) < min_size:
        return P()
    # largest axis divisible by the fsdp size (ties: the last axis, the output features)
    best = None
    for axis, dim in enumerate(shape):
        if dim % fsdp_size == 0 and (best is None or dim >= shape[best]):
            best = axis
    if best is None:
        return P()
    spec = [None] * len(shape)
    spec[best] = "fsdp"
    return P(*spec)


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """How every tree of a run is laid out: the mesh, the partition rules and the size below
    which a leaf stays replicated, declared once and applied to any tree (params, optimizer
    state, EMA, scalars, RNG keys, frozen weights, batches)."""
    mesh: Mesh
    min_size: int = 2**18
    rules: tuple = DEFAULT_RULES

    @classmethod
    def from_config(cls, mesh_cfg, devices: Sequence[Any] | None = None) -> "ShardingPlan":
        return cls(make_mesh(mesh_cfg, devices), int(mesh_cfg.min_fsdp_size))

    def spec(self, path: str, x) -> P:
        """Scalars and RNG keys (raw uint32[2] or typed keys) are replicated; arrays follow the
        rules."""
        shape, dtype = tuple(x.shape), getattr(x, "dtype", None)
        if not shape or jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) or \
                (shape == (2,) and dtype == np.uint32):
            return P()
        return spec_for(path, shape, self.mesh.shape["fsdp"], self.min_size, self.rules)

    def specs(self, tree):
        return jax.tree_util.tree_map_with_path(lambda p, x: self.spec(_path_str(p), x), tree)

    def shardings(self, tree):
        return jax.tree.map(lambda s: NamedSharding(self.mesh, s), self.specs(tree),
                            is_leaf=lambda x: isinstance(x, P))

    @property
    def replicated(self) -> NamedSharding:
        return replicated(self.mesh)

    @property
    def batch(self) -> NamedSharding:
        return batch_sharding(self.mesh)

    @property
    def data_parallel(self) -> int:
        return data_parallel_size(self.mesh)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device; other axes whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Assemble per-process numpy batches into global jax.Arrays sharded over the batch axis."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}
