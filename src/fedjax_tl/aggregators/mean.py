"""The masked weighted mean (FedAvg; HeteroFL's average over the holders)."""

from fedjax_tl.aggregators.base import Aggregator, Options


def mean(options: Options) -> Aggregator:
  del options
  return Aggregator("mean")
