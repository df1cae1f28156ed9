"""The per-device arrays a round reads (engine.state.DeviceArrays), built
from the client data and the device population and placed on the device or
mesh, or the client rows kept in host memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_tl import placement, sharding
from fedjax_tl.data.federated import FederatedData
from fedjax_tl.device_catalog import class_for_width, profiles_for_tiers
from fedjax_tl.devices import Population
from fedjax_tl.engine.state import DeviceArrays

_BYTES_PER_MB = 2.0**20  # device memory figures are in MiB


def device_arrays(data: FederatedData, population: Population,
                  mesh: jax.sharding.Mesh | None = None,
                  data_placement: str = "device") -> DeviceArrays:
  """`data` and `population` as the round reads them.

  Args:
    data: the clients' padded rows and example counts.
    population: the devices' tiers, availability, profiles, traces, faults.
    mesh: a `clients` mesh the data rows are split over (the population
      vectors, small, are replicated); None: one device.
    data_placement: "device" (client rows on the device or mesh) or "host"
      (placement.HostRows: kept in host memory, a chunk's rows copied in as
      the round reads them).
  """
  profiles = population.profiles
  if profiles is None:  # a tier-only population: its nearest-width class
    profiles = profiles_for_tiers(
        population.tier, [class_for_width(f)
                          for f in population.tier_fractions],
        seed=0, jitter=0.0)
  if data_placement == "host":
    rows = placement.HostRows(data.x), placement.HostRows(data.y)
  else:
    rows = sharding.shard_rows(data.x, mesh), sharding.shard_rows(data.y,
                                                                  mesh)
  arrays = DeviceArrays(
      x=rows[0], y=rows[1],
      count=jnp.asarray(data.count, jnp.int32),
      tier=jnp.asarray(population.tier, jnp.int32),
      availability=jnp.asarray(population.availability, jnp.float32),
      compute_gflops=jnp.asarray(profiles.compute_gflops, jnp.float32),
      up_kbps=jnp.asarray(profiles.up_kbps, jnp.float32),
      down_kbps=jnp.asarray(profiles.down_kbps, jnp.float32),
      memory_bytes=jnp.asarray(profiles.memory_mb * _BYTES_PER_MB,
                               jnp.float32))
  if population.online is not None:
    arrays = arrays._replace(
        online_starts=jnp.asarray(population.online.starts, jnp.float32),
        online_ends=jnp.asarray(population.online.ends, jnp.float32),
        online_period=jnp.asarray(population.online.finish_time,
                                  jnp.float32))
  if population.malicious is not None:
    arrays = arrays._replace(malicious=jnp.asarray(population.malicious,
                                                   bool))
  return arrays._replace(**sharding.replicate(
      {k: v for k, v in arrays._asdict().items()
       if k not in ("x", "y") and v is not None}, mesh))
