"""The `Aggregator` value: how the server combines a round's client deltas.

Like a migration policy, an aggregator is a frozen record of pure functions;
the round calls its fields, never its name. A streamed aggregator adds each
chunk's (prepared) deltas to the masked weighted sums; a stacked one
(`combine` set) needs the whole cohort's deltas at once, so the round keeps
them and its memory grows with the cohort.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax

from fedjax_tl.models.base import Params


class Options(NamedTuple):
  """The config values a recipe may read (the `aggregator` section's keys)."""
  clip_norm: float = 1.0
  trim_fraction: float = 0.1
  krum_f: int = 0
  krum_m: int = 1


def _unchanged(deltas: Params) -> Params:
  return deltas


@dataclasses.dataclass(frozen=True)
class Aggregator:
  """An aggregation rule as a value.

  Attributes:
    name: the registry name (for outputs only).
    prepare: a chunk's deltas (leaves `[clients, ...]`) as the aggregator
      takes them, e.g. each clipped to a norm bound.
    combine: `(deltas, masks, weights) -> (num, den)` over the whole cohort
      (leaves `[slots, ...]`; a slot of weight 0 takes no part), the sums
      the server step divides; None: streamed, the masked weighted sums of
      the prepared deltas.
    clip_norm: the bound `prepare` clips each client's delta to (None: no
      clipping), for the per-client reference loop.
    min_cohort: the fewest clients per round the rule is defined for.
  """
  name: str = "mean"
  prepare: Callable[[Params], Params] = _unchanged
  combine: Callable[[Params, Params, jax.Array],
                    tuple[Params, Params]] | None = None
  clip_norm: float | None = None
  min_cohort: int = 1

  @property
  def stacked(self) -> bool:
    """Whether it needs the cohort's deltas at once (not streamable)."""
    return self.combine is not None

  @property
  def is_mean(self) -> bool:
    """Whether it is the plain masked weighted mean (nothing clipped or
    stacked), the only rule DP-FedAvg's noise calibration allows."""
    return self.combine is None and self.clip_norm is None
