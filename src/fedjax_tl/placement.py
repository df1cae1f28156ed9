"""Where the client data lives: on the accelerator where it fits, else host.

The check compares the bytes of the per-device arrays with the accelerator's
free memory (on CPU, the host's available RAM). Host-placed data stays in
numpy and the compiled round reads each chunk's rows through a host callback.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl.data.federated import FederatedData
from fedjax_tl.devices import Population
from fedjax_tl.errors import ConfigError

# The share of free memory the data may take: the rest is left for the
# params, a chunk's activations and the compiled programs.
DATA_SHARE = 0.5
_GIB = 2.0**30
# Per-device vectors of DeviceArrays beside the data: count, tier,
# availability, compute, up and down bandwidth, memory; 4 bytes each.
POPULATION_VECTORS = 7


class Placement(NamedTuple):
  """The decision and the figures behind it (logged, and in summary.json)."""
  where: str               # "device" or "host"
  data_bytes: int          # the per-device arrays, on each device
  free_bytes: int | None   # free memory seen, None if unknown
  memory_source: str       # where `free_bytes` was read
  reason: str              # one line for the log

  def summary(self) -> dict[str, Any]:
    return {"data_placement": self.where, "data_bytes": self.data_bytes,
            "free_bytes": self.free_bytes,
            "data_placement_reason": self.reason}


def data_bytes(data: FederatedData, population: Population,
               mesh_devices: int = 1) -> int:
  """Bytes the simulation's DeviceArrays take on each device.

  Client rows split over a mesh of `mesh_devices` accelerators; on CPU every
  "device" shares the host's memory, so the whole of the data counts.
  """
  rows = data.x.nbytes + data.y.nbytes
  if jax.default_backend() != "cpu":
    rows = -(-rows // mesh_devices)
  extra = POPULATION_VECTORS * 4 * population.num_devices
  if population.online is not None:
    extra += sum(np.asarray(a, np.float32).nbytes for a in (
        population.online.starts, population.online.ends,
        population.online.finish_time))
  return int(rows + extra)


def free_memory(device: jax.Device | None = None) -> tuple[int | None, str]:
  """`(bytes, source)`: free memory of `device` (default: the first).

  An accelerator's allocator limit less what it holds; a CPU device's is the
  host's available RAM (/proc/meminfo's MemAvailable, else sysconf).
  """
  device = device or jax.devices()[0]
  stats = device.memory_stats()
  if stats and "bytes_limit" in stats:
    return (int(stats["bytes_limit"] - stats.get("bytes_in_use", 0)),
            f"{device.platform} allocator")
  return host_memory()


def host_memory() -> tuple[int | None, str]:
  """`(bytes, source)`: the host's available RAM (/proc/meminfo's
  MemAvailable, else sysconf); None when neither can be read."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024, "host RAM (MemAvailable)"
  except OSError:
    pass
  try:
    return (os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"),
            "host RAM (sysconf)")
  except (ValueError, OSError, AttributeError):
    return None, "unknown"


def choose(requested: str, need: int, free: int | None,
           memory_source: str = "") -> Placement:
  """Places the data on the device if `need` <= DATA_SHARE x `free`.

  Args:
    requested: config.data_placement: "auto", "device" or "host".
    need: bytes of the per-device arrays (:func:`data_bytes`).
    free: free bytes (:func:`free_memory`); None (unknown) counts as fitting.
    memory_source: where `free` was read, for the message.

  Raises:
    ConfigError: `requested` is "device" and the data does not fit.
  """
  fits = free is None or need <= DATA_SHARE * free
  seen = ("free memory unknown" if free is None else
          f"{free / _GIB:.2f} GiB free in {memory_source}")
  size = f"client data {need / _GIB:.2f} GiB"
  if requested == "device" and not fits:
    raise ConfigError(
        f"config.data_placement='device': the {size} does not fit in "
        f"{DATA_SHARE:.0%} of the {seen}; set config.data_placement=host (or "
        "auto) to keep it in host memory and stream each chunk's rows")
  if requested == "host":
    return Placement("host", need, free, memory_source,
                     f"{size} kept in host memory, streamed per chunk "
                     "(data_placement=host)")
  if fits:
    return Placement("device", need, free, memory_source,
                     f"{size} on device, {seen} (data_placement={requested})")
  return Placement("host", need, free, memory_source,
                   f"{size} kept in host memory, streamed per chunk: over "
                   f"{DATA_SHARE:.0%} of the {seen} (data_placement=auto)")


class HostRows:
  """`[devices, ...]` rows held in host numpy, indexed like a device array.

  Indexing by a (traced) device id inside jit gathers that device's row from
  host memory through `jax.pure_callback`; under vmap one callback gathers a
  whole chunk's rows, so the device holds a chunk's data, not everyone's.
  A pytree with no leaves (the array travels as static data, compared by
  identity), so jit compiles once for it. On a `clients` mesh the callback
  runs on the first device, and XLA moves the chunk's ids there (it warns of
  a "full rematerialization" of those few ints once, when compiling) and
  splits the rows it returns over the mesh.
  """

  def __init__(self, host: np.ndarray):
    self.host = host

  @property
  def shape(self) -> tuple[int, ...]:
    return self.host.shape

  @property
  def dtype(self) -> np.dtype:
    return self.host.dtype

  def __getitem__(self, index: jax.Array) -> jax.Array:
    out = jax.ShapeDtypeStruct(jnp.shape(index) + self.host.shape[1:],
                               self.host.dtype)
    # vmap adds a leading axis to `index` and to the result: one gather per
    # chunk.
    return jax.pure_callback(lambda i: self.host[np.asarray(i)], out, index,
                             vmap_method="expand_dims")


jax.tree_util.register_pytree_node(HostRows, lambda rows: ((), rows),
                                   lambda rows, _: rows)
