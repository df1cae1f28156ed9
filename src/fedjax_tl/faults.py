"""Faults in the federation: malicious devices, their attacks, broken updates.

A share of the devices, drawn from the seed when the population is built, is
malicious and corrupts what it uploads (sign flip, scaling) or trains on
flipped labels. An honest client can fail too: a delta holding NaN or Inf is
screened out of the round's aggregate (:func:`screen`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl.models.base import Params

ATTACKS = ("none", "sign_flip", "scale", "label_flip")
_MALICIOUS_SALT = 0xBAD


def malicious_devices(num_devices: int, fraction: float,
                      seed: int) -> np.ndarray:
  """`[devices]` bool: round(fraction x devices) malicious devices.

  Drawn from `seed` alone (its own stream), so the same experiment always
  has the same attackers whatever else changes.
  """
  rng = np.random.default_rng([seed, _MALICIOUS_SALT])
  flags = np.zeros(num_devices, bool)
  flags[rng.choice(num_devices, int(round(fraction * num_devices)),
                   replace=False)] = True
  return flags


@dataclasses.dataclass(frozen=True)
class Attack:
  """What a malicious client does (honest clients are untouched).

  Attributes:
    kind: one of ATTACKS. "sign_flip" uploads `-scale x delta`, "scale"
      uploads `scale x delta`, "label_flip" trains on labels `C - 1 - y`.
    scale: the factor of "sign_flip" and "scale".
  """
  kind: str = "none"
  scale: float = 1.0

  def labels(self, y: jax.Array, malicious: jax.Array | None,
             num_classes: int) -> jax.Array:
    """One client's training labels: flipped if it mounts label_flip."""
    if self.kind != "label_flip" or malicious is None:
      return y
    return jnp.where(malicious, num_classes - 1 - y, y)

  def delta(self, delta: Params, malicious: jax.Array | None) -> Params:
    """One client's upload: its delta, scaled if it is malicious."""
    if self.kind not in ("sign_flip", "scale") or malicious is None:
      return delta
    factor = -self.scale if self.kind == "sign_flip" else self.scale
    factor = jnp.where(malicious, jnp.float32(factor), 1.0)
    return jax.tree.map(lambda d: d * factor.astype(d.dtype), delta)


def all_finite(tree: Params, axis: int | None = None) -> jax.Array:
  """Whether every value of `tree` is finite (per entry of a leading
  clients axis when `axis=0`)."""
  def finite(leaf):
    ok = jnp.isfinite(leaf)
    return jnp.all(ok) if axis is None else jnp.all(
        ok.reshape(ok.shape[0], -1), axis=1)
  return jnp.stack([finite(leaf) for leaf in jax.tree.leaves(tree)]).all(0)


def screen(deltas: Params, weights: jax.Array, masks: Params | None = None
           ) -> tuple[Params, Params | None, jax.Array, jax.Array]:
  """Excludes the clients of a chunk whose upload is not finite.

  Args:
    deltas: the chunk's deltas, leaves `[clients, ...]`.
    weights: `[clients]` aggregation weights (0 for slots not aggregated).
    masks: the chunk's aggregation masks, leaves `[clients, ...]`, if they
      can be non-finite too (adapter policies' norm weights); checked and
      cleaned like the deltas.

  Returns:
    `(deltas, masks, weights, excluded)`: an excluded client's delta and
    mask zeroed (0 x NaN would still poison the sums) and its weight 0;
    `excluded[clients]` marks the aggregated clients (weight > 0) excluded.
  """
  finite = all_finite(deltas, axis=0)
  if masks is not None:
    finite = finite & all_finite(masks, axis=0)

  def clean(leaf):
    return jnp.where(finite.reshape(-1, *[1] * (leaf.ndim - 1)), leaf, 0)

  deltas = jax.tree.map(clean, deltas)
  if masks is not None:
    masks = jax.tree.map(clean, masks)
  excluded = (weights > 0) & ~finite
  return deltas, masks, jnp.where(finite, weights, 0), excluded
