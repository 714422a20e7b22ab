"""The device mesh and where arrays live on it: batches split over the data axes, parameters replicated.

`config.mesh` is a dict of axis sizes, e.g. {"data": -1} (all devices on the data axis, the default) or
{"data": 2, "fsdp": 4}; -1 takes the devices left over by the other axes. Batches are sharded along their
leading (example) axis over every data-parallel axis present (`BATCH_AXES`); every other array (frozen base,
adapters, head, optimizer state) is replicated. A later scale-out adds sharding rules for parameters here;
callers only use `make_mesh`, `batch_sharding`, `tree_shardings` and `shard_batch`.
"""

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Axes that split the batch (data parallelism), in mesh order.
BATCH_AXES = ("data", "fsdp")


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
    """Shardings for a tree of parameters or optimizer state (arrays or ShapeDtypeStructs): replicated."""
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
      batch: name -> [batch, ...] numpy arrays (this process's rows; one process holds all of them).

    Returns:
      name -> jax.Array with sharding `batch_sharding(mesh)`.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
