"""A built-in catalogue of device classes and a population generator over it.

Each class carries round, approximate figures (compute, memory, bandwidth,
availability, default width); :func:`make_device_population` draws one row per
device around its class's figures, so the population is plain arrays.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

from fedjax_tl.devices import DeviceProfiles
from fedjax_tl.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DeviceClass:
  """Typical figures of one class of device. All are approximate.

  Attributes:
    name: the class's key in the catalogue.
    compute_gflops: sustained FP32 throughput a training job gets on the
      device (GFLOP/s), far below the accelerator's peak inference figure.
    memory_mb: memory an app can use for training (MB), a fraction of RAM.
    up_mbps: uplink bandwidth (Mbit/s).
    down_mbps: downlink bandwidth (Mbit/s).
    availability: probability the device is online (idle, charging, on an
      unmetered network) when a round starts.
    width_fraction: the default hidden-width fraction it trains (its tier).
    description: what the class stands for.
  """
  name: str
  compute_gflops: float
  memory_mb: float
  up_mbps: float
  down_mbps: float
  availability: float
  width_fraction: float
  description: str = ""


# Sources (figures rounded; each is an order-of-magnitude class figure, not a
# measurement of any one device):
# - Compute: AI-Benchmark's public ranking (ai-benchmark.com) and MLPerf Mobile
#   inference results place flagship NPUs at hundreds of GFLOP/s (FP16/INT8)
#   and older SoCs 10-50x lower. Training runs FP32 on the CPU/GPU through a
#   general framework, which sustains a small fraction of that: tens of
#   GFLOP/s on a flagship, single digits on low-end phones and on Raspberry
#   Pi class boards (Cortex-A72, ~24 GFLOP/s FP32 NEON peak).
# - Memory: typical RAM of the class (flagship 8-12 GB, mid-range 4-8 GB,
#   low-end 2-4 GB, single-board computers 1-4 GB); a background training job
#   gets a small share before the OS kills it.
# - Bandwidth: Ookla Speedtest Global Index mobile medians (2024) are about
#   50-60 Mbit/s down and 10-12 Mbit/s up; mid-range sits at the median,
#   flagships on 5G above it, low-end phones on 3G / congested 4G far below.
#   IoT boards: LTE Cat-1 modems or weak shared Wi-Fi.
# - Availability: FedScale's behaviour trace (client_behave_trace, from a
#   large smartphone study) shows phones online in short intermittent windows,
#   mostly when charging; mains-powered boards are almost always on.
# - Width fractions: HeteroFL's capacity levels a-d (1, 1/2, 1/4, 1/8).
CATALOGUE: Mapping[str, DeviceClass] = {
    c.name: c for c in (
        DeviceClass("flagship_phone", compute_gflops=40.0, memory_mb=2048.0,
                    up_mbps=20.0, down_mbps=150.0, availability=0.3,
                    width_fraction=1.0,
                    description="recent high-end phone on 5G"),
        DeviceClass("midrange_phone", compute_gflops=12.0, memory_mb=1024.0,
                    up_mbps=10.0, down_mbps=50.0, availability=0.25,
                    width_fraction=0.5,
                    description="mid-range phone on median 4G"),
        DeviceClass("lowend_phone", compute_gflops=3.0, memory_mb=384.0,
                    up_mbps=2.0, down_mbps=8.0, availability=0.2,
                    width_fraction=0.25,
                    description="old or entry-level phone on 3G/4G"),
        DeviceClass("iot_board", compute_gflops=2.0, memory_mb=256.0,
                    up_mbps=2.0, down_mbps=5.0, availability=0.9,
                    width_fraction=0.125,
                    description="mains-powered single-board computer"),
    )
}


def _class_counts(num_devices: int, proportions: np.ndarray) -> np.ndarray:
  """Exact counts for the proportions, remainder to the largest fractions."""
  exact = proportions * num_devices
  counts = np.floor(exact).astype(int)
  remainder = num_devices - counts.sum()
  # A stable sort hands tied remainders to the earlier classes.
  order = np.argsort(-(exact - counts), kind="stable")
  counts[order[:remainder]] += 1
  return counts


def _proportions(mix: Mapping[str, float] | Sequence[float],
                 names: Sequence[str]) -> np.ndarray:
  if isinstance(mix, Mapping):
    unknown = [k for k in mix if k not in names]
    if unknown:
      raise ConfigError(f"device mix: unknown device class {unknown[0]!r} "
                        f"(known: {', '.join(names)})")
    values = [float(mix.get(name, 0.0)) for name in names]
  else:
    values = [float(v) for v in mix]
    if len(values) != len(names):
      raise ConfigError(f"device mix: {len(values)} proportions given for "
                        f"{len(names)} device classes ({', '.join(names)})")
  for name, value in zip(names, values):
    if not math.isfinite(value) or value < 0:
      raise ConfigError(f"device mix: proportion of {name!r} must be a "
                        f"non-negative number, got {value!r}")
  total = sum(values)
  if total <= 0:
    raise ConfigError("device mix: proportions sum to 0")
  return np.asarray(values, np.float64) / total


def make_device_population(
    num_devices: int, mix: Mapping[str, float] | Sequence[float], *,
    seed: int, jitter: float = 0.25,
    catalogue: Mapping[str, DeviceClass] | None = None) -> DeviceProfiles:
  """Draws a population of devices from the catalogue's classes.

  Classes are assigned in the mix's proportions (normalised to sum 1; exact
  counts up to rounding, then shuffled). Each device's compute, memory and
  bandwidths are its class's figures times an independent log-normal factor
  `exp(jitter * N(0, 1))`, so the class figure is the median. Availability is
  jittered on the logit scale, which keeps it inside (0, 1).

  Args:
    num_devices: number of devices.
    mix: class name -> proportion (missing classes get 0), or one proportion
      per catalogue class in catalogue order.
    seed: the population is a deterministic function of the seed.
    jitter: standard deviation of the log-normal jitter; 0 gives every device
      exactly its class figures.
    catalogue: the classes to draw from; default :data:`CATALOGUE`.

  Returns:
    The per-device profiles.

  Raises:
    ConfigError: an unknown class, a negative proportion, or a bad count.
  """
  catalogue = CATALOGUE if catalogue is None else catalogue
  classes = list(catalogue.values())
  names = [c.name for c in classes]
  if num_devices < 1:
    raise ConfigError(f"device population: num_devices must be >= 1, got "
                      f"{num_devices!r}")
  if not math.isfinite(jitter) or jitter < 0:
    raise ConfigError(f"device population: jitter must be >= 0, got "
                      f"{jitter!r}")
  proportions = _proportions(mix, names)
  rng = np.random.default_rng([seed, 0xCA7A10])
  counts = _class_counts(num_devices, proportions)
  device_class = rng.permutation(np.repeat(np.arange(len(classes)), counts))
  return _jittered_profiles(device_class, classes, rng, jitter)


def class_for_width(fraction: float) -> str:
  """The catalogue class whose default width is nearest (in log2) `fraction`."""
  return min(CATALOGUE, key=lambda name: abs(math.log2(
      CATALOGUE[name].width_fraction / fraction)))


def draw_profiles(device_class: np.ndarray, *, seed: int, jitter: float = 0.25,
                  catalogue: Mapping[str, DeviceClass] | None = None
                  ) -> DeviceProfiles:
  """Per-device figures for given classes (indices into the catalogue).

  The jitter is as in :func:`make_device_population`; deterministic from the
  seed.
  """
  catalogue = CATALOGUE if catalogue is None else catalogue
  rng = np.random.default_rng([seed, 0xCA7A11])
  return _jittered_profiles(np.asarray(device_class), list(catalogue.values()),
                            rng, jitter)


def profiles_for_tiers(tier: np.ndarray, tier_classes: Sequence[str], *,
                       seed: int, jitter: float = 0.25) -> DeviceProfiles:
  """Per-device figures when tier `t` is catalogue class `tier_classes[t]`."""
  names = list(CATALOGUE)
  class_of_tier = np.asarray([names.index(c) for c in tier_classes])
  return draw_profiles(class_of_tier[np.asarray(tier)], seed=seed,
                       jitter=jitter)


def _jittered_profiles(device_class: np.ndarray, classes: list[DeviceClass],
                       rng: np.random.Generator,
                       jitter: float) -> DeviceProfiles:
  """Class figures times log-normal jitter, availability on the logit scale."""
  num_devices = len(device_class)

  def per_class(field: str) -> np.ndarray:
    return np.asarray([getattr(c, field) for c in classes],
                      np.float64)[device_class]

  def lognormal(field: str) -> np.ndarray:
    factor = np.exp(jitter * rng.standard_normal(num_devices))
    return (per_class(field) * factor).astype(np.float32)

  compute = lognormal("compute_gflops")
  memory = lognormal("memory_mb")
  up = lognormal("up_mbps") * 1000
  down = lognormal("down_mbps") * 1000
  base = np.clip(per_class("availability"), 1e-6, 1 - 1e-6)
  logit = np.log(base) - np.log1p(-base)
  availability = 1 / (1 + np.exp(-(logit + jitter * rng.standard_normal(
      num_devices))))
  return DeviceProfiles(
      device_class=device_class.astype(np.int32), compute_gflops=compute,
      memory_mb=memory, up_kbps=up.astype(np.float32),
      down_kbps=down.astype(np.float32),
      availability=availability.astype(np.float32),
      class_names=tuple(c.name for c in classes),
      class_width_fractions=tuple(float(c.width_fraction) for c in classes))
