"""The device mesh, the processes behind it, and how batches are split over it.

`config.mesh` is a dict of axis sizes over the axes `AXES`, e.g. {"data": -1} (all devices on the data axis,
the default), {"data": 2, "fsdp": 4} or {"data": 2, "fsdp": 2, "tensor": 2}; -1 takes the devices left over by
the other axes. Batches are sharded along their leading (example) axis over every batch axis present
(`BATCH_AXES`: data and FSDP); parameters are placed by `train.placement` ("fsdp" and "tensor" split the base
weights).

Multi-host: `initialize_distributed` calls `jax.distributed.initialize()` when the environment describes a
multi-process job (a TPU pod slice, SLURM, Open MPI, or JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and
JAX_PROCESS_ID), before any device is touched. Every process then runs the same program on the same global
batch order (same seed), and `shard_batch` transfers only the rows that its own devices hold.
"""

import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Mesh axes: data parallelism, fully sharded data parallelism (batch and weights split), tensor parallelism.
AXES = ("data", "fsdp", "tensor")
# Axes that split the batch, in mesh order.
BATCH_AXES = ("data", "fsdp")
# Environment of an explicit multi-process launch (also read by jax.distributed.initialize).
COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def multi_process_env(env: Mapping[str, str] = os.environ) -> bool:
    """Whether `env` describes a job of several processes: explicit JAX variables, SLURM, Open MPI or a TPU pod."""
    count = lambda key: int(env.get(key, "1") or 1)
    return bool(
        env.get(COORDINATOR_ENV)
        or count("SLURM_NTASKS") > 1
        or count("OMPI_COMM_WORLD_SIZE") > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
        or env.get("MEGASCALE_COORDINATOR_ADDRESS")
    )


def initialize_distributed(mode: str = "auto", env: Mapping[str, str] = os.environ) -> bool:
    """`jax.distributed.initialize()` for a multi-process job; call before any device is touched.

    Args:
      mode: config.distributed: "auto" (when `multi_process_env(env)`), "on" (always) or "off" (never).
      env: the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID when launched by hand;
        SLURM, Open MPI and Cloud TPU fill them in themselves).

    Returns:
      Whether this process is part of a distributed job.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"config.distributed={mode!r}: expected 'auto', 'on' or 'off'")
    if mode == "off" or (mode == "auto" and not multi_process_env(env)):
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs = {}
    if env.get(NUM_PROCESSES_ENV) and env.get(PROCESS_ID_ENV):
        kwargs = dict(num_processes=int(env[NUM_PROCESSES_ENV]), process_id=int(env[PROCESS_ID_ENV]))
    jax.distributed.initialize(coordinator_address=env.get(COORDINATOR_ENV) or None, **kwargs)
    return True


def is_main_process() -> bool:
    """True on process 0, the one that writes logs, metrics and summaries (checkpoints are written by all)."""
    return jax.process_index() == 0


def axis_sizes(spec: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolves one -1 in `spec` to the devices left over; without a -1 the mesh may use fewer devices.

    Args:
      spec: axis name -> size (> 0, or -1 once).
      num_devices: devices available.

    Returns:
      axis name -> size, in `spec` order.

    Raises:
      ValueError: naming config.mesh, when the sizes are invalid or need more than `num_devices`.
    """
    sizes = {str(k): int(v) for k, v in spec.items()}
    if not sizes:
        raise ValueError("config.mesh is empty: give axis sizes such as {'data': -1}")
    unknown = sorted(set(sizes) - set(AXES))
    if unknown:
        raise ValueError(f"config.mesh has unknown axes {unknown}; expected some of {AXES}")
    if any(v == 0 or v < -1 for v in sizes.values()) or list(sizes.values()).count(-1) > 1:
        raise ValueError(f"config.mesh={sizes}: axis sizes must be > 0, with at most one -1")
    fixed = int(np.prod([v for v in sizes.values() if v != -1]))
    for name, v in sizes.items():
        if v == -1:
            if num_devices % fixed:
                raise ValueError(f"config.mesh={spec}: {num_devices} devices do not divide by the fixed axes ({fixed})")
            sizes[name] = num_devices // fixed
    need = int(np.prod(list(sizes.values())))
    if need > num_devices:
        raise ValueError(f"config.mesh={sizes} needs {need} devices, found {num_devices}")
    return sizes


def make_mesh(spec: Mapping[str, int], devices=None) -> Mesh:
    """A `Mesh` with the axes of `spec` (e.g. config.mesh) over the first devices of `devices` (default: all)."""
    devices = jax.devices() if devices is None else list(devices)
    sizes = axis_sizes(spec, len(devices))
    grid = np.asarray(devices[: int(np.prod(list(sizes.values())))], dtype=object).reshape(tuple(sizes.values()))
    return Mesh(grid, tuple(sizes))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes that split the batch (those of `BATCH_AXES` present)."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def data_size(mesh: Mesh) -> int:
    """How many ways the batch is split: the product of the batch axes' sizes."""
    return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) axis split over the batch axes, the rest replicated: P(("data", ...))."""
    return NamedSharding(mesh, P(batch_axes(mesh) or None))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def tree_shardings(mesh: Mesh, tree):
    """Replicated shardings for a tree of arrays or ShapeDtypeStructs (a data-parallel-only state)."""
    return jax.tree.map(lambda _: replicated(mesh), tree)


def check_batch_size(batch_size: int, mesh: Mesh, key: str = "batch_size") -> None:
    """Raises ValueError naming config.<key> when `batch_size` does not split evenly over the batch axes."""
    n = data_size(mesh)
    if batch_size % n:
        raise ValueError(
            f"config.{key}={batch_size} must be divisible by the {n} devices of the data axes {batch_axes(mesh)} "
            f"(config.mesh={dict(mesh.shape)})"
        )


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host numpy batch -> global arrays split along axis 0 over the batch axes.

    Args:
      batch: name -> [batch, ...] numpy arrays: the global batch, the same in every process (same data order);
        each process transfers only the rows of its own devices.

    Returns:
      name -> jax.Array with sharding `batch_sharding(mesh)`.
    """
    sharding = batch_sharding(mesh)

    def put(x: np.ndarray) -> jax.Array:  # explicit per-device transfers of this process's devices only
        rows = sharding.addressable_devices_indices_map(x.shape).items()
        return jax.make_array_from_single_device_arrays(x.shape, sharding, [jax.device_put(x[i], d) for d, i in rows])

    return {k: put(np.asarray(v)) for k, v in batch.items()}
