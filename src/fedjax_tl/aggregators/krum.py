"""Krum and Multi-Krum (Blanchard et al., NeurIPS 2017): the masked weighted
mean of the 1 (Krum) or `krum_m` (Multi-Krum) clients of lowest Krum score,
`krum_f` attackers assumed (robust.krum_scores); stacked."""

import functools

from fedjax_tl.aggregators import robust, sums
from fedjax_tl.aggregators.base import Aggregator, Options


def _selected_mean(deltas, masks, weights, *, num_attackers: int,
                   num_selected: int):
  values, holds, participants, like = robust.stack_inputs(deltas, masks,
                                                          weights)
  selected = robust.krum_select(values, holds, participants, num_attackers,
                                num_selected)
  return sums.add_weighted(*sums.zeros_like_sums(like), deltas, masks,
                           weights * selected)


def _krum(name: str, options: Options, num_selected: int) -> Aggregator:
  return Aggregator(name, combine=functools.partial(
      _selected_mean, num_attackers=options.krum_f,
      num_selected=num_selected), min_cohort=2 * options.krum_f + 3)


def krum(options: Options) -> Aggregator:
  return _krum("krum", options, 1)


def multi_krum(options: Options) -> Aggregator:
  return _krum("multi_krum", options, options.krum_m)
