"""FedRolex (Alam et al., NeurIPS 2022): rolling sub-model extraction.

In round r a client of width p holds the units `roll(arange(C), r)[:k]`,
k = ceil(p*C): units (i - r) mod C for i < k (unit j is held iff
(j + r) mod C < k), so the window moves one unit per round, towards lower
indices, and every unit is trained equally often over C rounds. This is the
authors' direction: github.com/AIoT-MLSys-Lab/FedRolex, resnet_server.py
(commit 8135109), line 101 `roll = self.rounds % output_size`, line 109
`model_idx = torch.roll(model_idx, roll, -1)`, line 110
`output_idx_i_m = model_idx[:local_output_size]` (torch.roll shifts towards
higher indices, as np.roll does). Before issue 18 this simulator rolled the
other way, units (i + r) mod C.
"""

from fedjax_tl.policies import base, capacity


def _rolling(width, round_index, key, groups):
  del key
  return capacity.rolling_units(width, round_index, groups)


def fedrolex(options: base.Options) -> base.Policy:
  return base.width_policy("fedrolex", _rolling, scaler=options.scaler)
