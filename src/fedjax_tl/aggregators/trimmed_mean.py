"""The coordinate-wise trimmed mean over the clients holding each parameter:
`trim_fraction` of the holders dropped at each end (Yin et al., ICML 2018);
stacked."""

import functools

import jax.numpy as jnp

from fedjax_tl.aggregators import robust
from fedjax_tl.aggregators.base import Aggregator, Options


def _trimmed_mean(deltas, masks, weights, *, trim_fraction: float):
  values, holds, _, like = robust.stack_inputs(deltas, masks, weights)
  stat, held = robust.masked_trimmed_mean(values, holds, trim_fraction)
  return (robust.unflatten(stat, like),
          robust.unflatten(held.astype(jnp.float32), like))


def trimmed_mean(options: Options) -> Aggregator:
  return Aggregator("trimmed_mean", combine=functools.partial(
      _trimmed_mean, trim_fraction=options.trim_fraction))
