"""Data parallelism over all devices with `jax.sharding`.

One mesh axis, ``data``: batches are sharded along it, parameters, optimizer
state and BatchNorm statistics are replicated. `jax.jit` then partitions the
steps (GSPMD), and BatchNorm's batch statistics are computed over the global
batch, so N devices train exactly like one device on the same global batch.
The same code runs on one CPU, a GPU, a Colab TPU, a TPU VM's chips or a pod slice.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
  """Joins a multi-host run (TPU pod slices, multi-node GPU) when configured.

  On TPU pods, and on clusters JAX detects (SLURM, Open MPI),
  `jax.distributed.initialize()` finds its peers by itself. Elsewhere pass
  all three: the address of process 0, the number of processes and this
  one's index (0 on process 0). Single-host runs need not call this.
  """
  jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
  )


def data_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A one-axis mesh over ``devices`` (default: all devices of all hosts)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of batch arrays: leading (batch) axis split over ``data``."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_platform(mesh: Mesh) -> None:
  """Raises unless the mesh's devices are of JAX's default backend.

  agejax picks its kernels from ``jax.default_backend()`` when a step is
  traced (`agejax.conv`: its CPU formulations and oneDNN's kernels on a
  CPU, ``lax.conv`` elsewhere), so on another platform's devices a step
  would run kernels chosen for the wrong one, or fail to compile.
  """
  platform, default = mesh.devices.flat[0].platform, jax.default_backend()
  if platform != default:
    raise ValueError(
        f"The mesh's devices are {platform} devices, but JAX's default backend is {default},"
        f' from which agejax picks its kernels. Use a mesh of {default} devices'
        f' (agejax.parallel.data_mesh()), or put {platform} first in JAX_PLATFORMS.'
    )


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """Raises unless ``batch_size`` splits evenly over the mesh's devices."""
  if DATA_AXIS not in mesh.shape:
    raise ValueError(
        f'The mesh has axes {mesh.axis_names}; agejax splits batches over an axis named'
        f' {DATA_AXIS!r}: build the mesh with agejax.parallel.data_mesh.'
    )
  n = mesh.shape[DATA_AXIS]
  if batch_size % n:
    raise ValueError(
        f'Batch size {batch_size} does not divide evenly over {n} devices; use'
        f' a multiple of {n}.'
    )


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places every array of ``tree`` on every device of ``mesh``."""
  return jax.device_put(tree, replicated(mesh))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Moves a global batch to the devices, split along the batch axis.

  In a multi-host run every host holds the same global batch (the input
  pipeline is deterministic and loads all of each split on every host), and
  each host places the slices of its own devices: the global array has the
  batch's shape, not one batch per host.
  """
  sharding = batch_sharding(mesh)
  if jax.process_count() > 1:
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, x, x.shape), batch
    )
  return jax.device_put(batch, sharding)
