"""Aggregators as values, the registry of the named ones, and their primitives.

`make(name, options)` returns the `Aggregator` (base.py) the round runs.
Adding one is a recipe file, a line in `REGISTRY` and a row in the
aggregator tests. The primitives (sums.py: streamed masked sums and
clipping; robust.py: masked median, trimmed mean, Krum) are exported here too.
"""

from __future__ import annotations

from fedjax_tl.aggregators.base import Aggregator, Options
from fedjax_tl.aggregators.clip import clip
from fedjax_tl.aggregators.krum import krum, multi_krum
from fedjax_tl.aggregators.mean import mean
from fedjax_tl.aggregators.median import median
from fedjax_tl.aggregators.robust import (krum_scores, krum_select,
                                          masked_median, masked_trimmed_mean)
from fedjax_tl.aggregators.sums import (add_weighted, clip_by_norm,
                                        masked_mean, zeros_like_sums)
from fedjax_tl.aggregators.trimmed_mean import trimmed_mean
from fedjax_tl.registry import Registry

REGISTRY: Registry[Aggregator] = Registry(Options, {
    "mean": mean,
    "clip": clip,
    "median": median,
    "trimmed_mean": trimmed_mean,
    "krum": krum,
    "multi_krum": multi_krum,
})
names, make, get = REGISTRY.names, REGISTRY.make, REGISTRY.build

__all__ = ["REGISTRY", "Aggregator", "Options", "add_weighted",
           "clip_by_norm", "get", "krum_scores", "krum_select", "make",
           "masked_mean", "masked_median", "masked_trimmed_mean", "names",
           "zeros_like_sums"]
