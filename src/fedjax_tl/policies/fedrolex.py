"""FedRolex (Alam et al., NeurIPS 2022): rolling sub-model extraction.

A client of width p holds the window of units (j - r) mod C < ceil(p*C) in
round r (the authors' `roll(arange(C), r)[:k]`), so the window advances one
unit per round and every unit is trained equally often over C rounds.
"""

from fedjax_tl.policies import base, capacity


def _rolling(width, round_index, key, groups):
  del key
  return capacity.rolling_units(width, round_index, groups)


def fedrolex(options: base.Options) -> base.Policy:
  return base.width_policy("fedrolex", _rolling, scaler=options.scaler)
