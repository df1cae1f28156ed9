"""FjORD (Horvath et al., NeurIPS 2021): ordered dropout.

A client of capacity p_max holds the first-k sub-model of width p_max and,
for each local step (batch), trains the first-k sub-model of a width drawn
uniformly from the tier widths p <= p_max. Its optional self-distillation
(the largest sub-model teaching the drawn one) is the client's
`self_distill` (config key `fjord_distill`).
"""

import jax
import jax.numpy as jnp

from fedjax_tl.policies import base, capacity


def step_width(key: jax.Array, tier_widths: jax.Array,
               max_width: jax.Array) -> jax.Array:
  """A width drawn uniformly from the tier widths <= `max_width`."""
  allowed = tier_widths <= max_width + 1e-6
  return jax.random.choice(key, tier_widths, p=allowed / allowed.sum())


def _step_masks(model, tier_widths, width, params, activation):
  """Each local step's `(held, train)`: the first-k sub-model of a drawn
  width, `held` as unit vectors when the client masks activations."""
  tier_widths = jnp.asarray(tier_widths, jnp.float32)

  def masks(step_key):
    units = capacity.first_k_units(step_width(step_key, tier_widths, width),
                                   model.groups)
    train = capacity.masks_from_units(units, model.layers, params)
    return (units if activation else train), train

  return masks


def fjord(options: base.Options) -> base.Policy:
  return base.width_policy("fjord", scaler=options.scaler,
                           step_masks=_step_masks)
