"""Federated Dropout (Caldas et al., 2018): random sub-models.

Each round every client holds a uniformly random ceil(p*C) units of each
hidden layer, drawn from its own key; aggregation averages each parameter
over the clients holding it.
"""

from fedjax_tl.policies import base, capacity


def _random(width, round_index, key, groups):
  del round_index
  return capacity.random_units(width, key, groups)


def fed_dropout(options: base.Options) -> base.Policy:
  return base.width_policy("fed_dropout", _random, scaler=options.scaler)
