"""The coordinate-wise median over the clients holding each parameter
(unweighted; Yin et al., ICML 2018); stacked."""

import jax.numpy as jnp

from fedjax_tl.aggregators import robust
from fedjax_tl.aggregators.base import Aggregator, Options


def _median(deltas, masks, weights):
  values, holds, _, like = robust.stack_inputs(deltas, masks, weights)
  stat, held = robust.masked_median(values, holds)
  return (robust.unflatten(stat, like),
          robust.unflatten(held.astype(jnp.float32), like))


def median(options: Options) -> Aggregator:
  del options
  return Aggregator("median", combine=_median)
