"""How many clients a round vmaps together (`config.chunk_size`, or chosen
for the backend and the model): used to build the simulation and, before
that, to estimate its memory (experiment.memory)."""

from __future__ import annotations

import jax
import numpy as np

from fedjax_tl.config import ExperimentConfig


def auto_chunk_size(cfg: ExperimentConfig, num_params: int,
                    num_devices: int = 1) -> int:
  """Clients vmapped together when `chunk_size=0`.

  On XLA:CPU a client's work is bound by passes over its own copy of the
  params; a chunk pays off while the chunk's copies stay in cache (about
  1-2 MB; measured with benchmarks/round_throughput.py), and vmapped
  convolutions run poorly (several times slower than a loop of single
  clients). Accelerators favour large chunks. Among sizes near the target, the one padding the cohort least.
  On a mesh of `num_devices`, rounded up to a multiple of it (every device
  runs the same share of each chunk).
  """
  target = min(_chunk_target(cfg, num_params)[0], cfg.clients_per_round)
  candidates = range(max(1, target // 2), target + 1)
  size = min(candidates, key=lambda c: (-(-cfg.clients_per_round // c) * c, -c))
  return -(-size // num_devices) * num_devices


def _chunk_target(cfg: ExperimentConfig, num_params: int) -> tuple[int, str]:
  """The chunk size `auto_chunk_size` aims at, and why."""
  if jax.default_backend() != "cpu":
    return 256, "accelerators favour large chunks"
  if cfg.model in ("cnn", "simple_cnn"):
    return 1, ("XLA:CPU: one CNN client's matmuls already fill the cores; "
               "a lone client runs unbatched, larger chunks measured slower")
  # At least 2: a lone client of an MLP too wide for the cache measured
  # slower than two (64-512-512-10: 4,714 vs 5,673-5,862 steps/s).
  return int(np.clip(2_000_000 // (4 * num_params), 2, 32)), (
      f"XLA:CPU: a chunk's copies of the {num_params:,} params fit in ~2 MB "
      "of cache (at least 2)")


def choose_chunk_size(cfg: ExperimentConfig, num_params: int,
                      num_devices: int = 1) -> tuple[int, str]:
  """`(chunk size, reason)`: `config.chunk_size`, or `auto_chunk_size`'s."""
  if cfg.chunk_size:
    return cfg.chunk_size, "set by config.chunk_size"
  size = auto_chunk_size(cfg, num_params, num_devices)
  target, why = _chunk_target(cfg, num_params)
  return size, (f"automatic: target {target} ({why}), the size near it "
                f"that pads the {cfg.clients_per_round}-client cohort least"
                + (f", a multiple of {num_devices} devices"
                   if num_devices > 1 else ""))
