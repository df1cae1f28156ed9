"""FedEcover (ICDE 2025): efficient-coverage sub-models and step-size decay.

Units: each width group keeps a pool of the units not yet given out; the
round's clients, in the order they were drawn, each take ceil(p*C) units
drawn uniformly without replacement from the pool and remove them from it.
A client that needs more than the pool holds takes all of it, the pool is
refilled with every unit, and the client draws its other units from the
refilled pool minus those it already holds (they stay in the new pool).
So within a cycle no unit is given twice and over a cycle every unit is
given once; each group's pool is its own (one per layer whose output units
are chosen freely; groups tied by residual connections share one, as the
authors tie a block's conv2 to its input). The authors' code:
github.com/junesnow86/FedEcover (commit b23b572), modules/servers/
fedecover.py, lines 49-90 (a pool per pivot layer), 92-129
(`random_choose_indices`: the draw and the reload, lines 93-111), 146-147
(`int(capacity * C)` units per layer); modules/servers/base.py, lines
91-102 (clients drawn and given sub-models in their sampled order).

Server: each entry's delta is averaged over the clients holding it and
applied with the global step size eta_g, which the global step-size decay
(GSD) multiplies by gamma after every T_di rounds up to round T_ds
(base.py lines 154-283: line 275 `param += eta_g * delta`, 279-280 the
decay; main.py line 265 `decay_steps = range(Tdi, Tds + 1, Tdi)`). In
round r (from 0) the step is gamma^min(r // T_di, T_ds // T_di) times the
server optimiser's (eta_g is `server_lr`, 1 by default as the authors').
Authors' settings (README.md; modules/args_parser.py lines 138-167):
gamma = 0.9 (their README's run; the paper's sensitivity study takes 0.8 to
0.95), T_di = 10, T_ds = 200 (100 also studied); Adam clients, lr 1e-3.

Departures: (1) the pool restarts full at each round (the authors' carries
its leftover units into the next round): the rule reads no server state,
only the round's shared key and the cohort's widths (`base.Slot`), so a
round's clients cover the units equally but the partial cycle a round ends
with is not continued by the next; (2) ceil(p*C) units as every width
policy here (the authors' floor, int(p*C): the same at their widths of
power-of-two layers); (3) clients weigh their example counts as FedAvg
here (the authors' weigh 1 each); (4) the scaler follows `scaler` (the
authors scale every sub-model's outputs by 1/p in training).
"""

import jax
import jax.numpy as jnp

from fedjax_tl.policies import base, capacity


def _covering(width, round_index, key, groups, slot=None):
  """The slot's units; outside a cohort, a cohort of one from `key`."""
  del round_index
  if slot is None:
    slot = base.Slot(key, jnp.int32(0), jnp.reshape(width, (1,)))
  return capacity.covering_units(width, slot.widths, slot.index, slot.key,
                                 groups)


def step_decay(gamma: float, every: int, until: int):
  """GSD: `round_index -> gamma ** min(r // every, until // every)`."""
  def scale(round_index: jax.Array) -> jax.Array:
    decays = jnp.minimum(round_index // every, until // every)
    return jnp.float32(gamma) ** decays.astype(jnp.float32)
  return scale


def fedecover(options: base.Options) -> base.Policy:
  return base.width_policy(
      "fedecover", _covering, scaler=options.scaler, slotted=True,
      server_scale=step_decay(options.gsd_gamma, options.gsd_every,
                              options.gsd_until),
      keys=("gsd_gamma", "gsd_every", "gsd_until"))
