"""The masked weighted mean of updates clipped to a norm bound: each client's
delta is scaled to an L2 norm of at most `clip_norm`; streamed."""

from fedjax_tl.aggregators.base import Aggregator, Options
from fedjax_tl.aggregators.sums import clip_by_norm


def clip(options: Options) -> Aggregator:
  bound = options.clip_norm
  return Aggregator("clip", prepare=lambda deltas: clip_by_norm(deltas,
                                                                bound)[0],
                    clip_norm=bound)
