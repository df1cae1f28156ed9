"""Scale-out over devices: a `jax.sharding.Mesh` with one `clients` axis.

Client data rows and each chunk's clients are split over the mesh; params and
server state are replicated, so XLA all-reduces the weighted sums. The same
program runs on 1 or N devices, and on many hosts after `jax.distributed`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

CLIENTS = "clients"  # the mesh axis that cohort slots and data rows split over


def make_mesh(num_devices: int = 0) -> Mesh | None:
  """A 1-D `clients` mesh over the first `num_devices` devices (0: all).

  Returns None for a single device, so that a one-device run compiles the
  unsharded program exactly as without a mesh. Under `jax.distributed`,
  `jax.devices()` lists every process's devices, so 0 spans all hosts.

  Raises:
    ValueError: if more devices are asked for than there are.
  """
  devices = jax.devices()
  count = num_devices or len(devices)
  if count > len(devices):
    raise ValueError(f"{count} devices asked for, {len(devices)} available")
  if count == 1:
    return None
  # Auto axes: sharding propagates through vmap, gathers and sums by itself.
  return jax.make_mesh((count,), (CLIENTS,), axis_types=(AxisType.Auto,),
                       devices=devices[:count])


def describe(mesh: Mesh | None) -> str:
  """One line naming the mesh, for logs."""
  if mesh is None:
    return f"1 {jax.default_backend()} device (no mesh)"
  return (f"mesh {CLIENTS}={mesh.size} over {jax.process_count()} "
          f"process(es), {mesh.devices.flat[0].platform} devices")


def mesh_size(mesh: Mesh | None) -> int:
  return 1 if mesh is None else mesh.size


def _place(value: Any, sharding: NamedSharding) -> jax.Array:
  """`value` as a global array; each process supplies its own shards.

  `make_array_from_callback` (not `device_put`) so that it also holds under
  `jax.distributed`, where a process may address only its own devices; every
  process must hold the same `value`.
  """
  if isinstance(value, jax.Array) and value.sharding == sharding:
    return value
  host = np.asarray(value)
  return jax.make_array_from_callback(host.shape, sharding,
                                      lambda index: host[index])


def replicate(tree: Any, mesh: Mesh | None) -> Any:
  """Every leaf of `tree` copied onto every device of `mesh` (None: as is)."""
  if mesh is None:
    return tree
  sharding = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda a: _place(a, sharding), tree)


def shard_rows(array: Any, mesh: Mesh | None) -> Any:
  """`array[rows, ...]` on device, split by rows over `mesh`'s clients axis.

  Rows are zero-padded to a multiple of the mesh size; callers never index
  the padding (the cohort samples real device ids only).
  """
  if mesh is None:
    return jnp.asarray(array)
  host = np.asarray(array)
  pad = -host.shape[0] % mesh.size
  host = np.pad(host, [(0, pad)] + [(0, 0)] * (host.ndim - 1))
  return _place(host, NamedSharding(mesh, PartitionSpec(CLIENTS)))


def constrain_clients(tree: Any, mesh: Mesh | None) -> Any:
  """Inside jit: splits the leading (client) axis of every leaf over `mesh`."""
  if mesh is None:
    return tree
  return jax.lax.with_sharding_constraint(
      tree, NamedSharding(mesh, PartitionSpec(CLIENTS)))
