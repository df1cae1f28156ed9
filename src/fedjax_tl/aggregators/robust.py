"""Robust statistics over a stacked cohort, each over the clients holding a
coordinate: masked median, trimmed mean and Krum's selection.

They need every aggregated client's delta at once (`[clients, coords]`), so an
aggregator built on them runs on the stacked path: its memory grows with the
cohort, not with the chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl.models.base import Params


def _sorted_holders(values: jax.Array, holds: jax.Array):
  """`(sorted values, holder count)` per column: each column of `values`
  `[clients, coords]` sorted over its holders, non-holders pushed to +inf
  (after every holder), so rank `i < count` is the i-th smallest holder."""
  return (jnp.sort(jnp.where(holds, values, jnp.inf), axis=0),
          holds.sum(axis=0))


def masked_median(values: jax.Array, holds: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """Coordinate-wise median over the clients holding each coordinate.

  Args:
    values: `[clients, coords]`.
    holds: `[clients, coords]` bool: the client holds (and was aggregated
      for) the coordinate.

  Returns:
    `(median[coords], held[coords])`: the median of each coordinate's
    holders (the mean of the two middle ones for an even count), 0 where
    no client holds it.
  """
  ordered, count = _sorted_holders(values, holds)
  pick = lambda rank: jnp.take_along_axis(
      ordered, jnp.maximum(rank, 0)[None], axis=0)[0]
  held = count > 0
  median = jnp.where(held, (pick((count - 1) // 2) + pick(count // 2)) / 2, 0)
  return median, held


def masked_trimmed_mean(values: jax.Array, holds: jax.Array,
                        trim_fraction: float) -> tuple[jax.Array, jax.Array]:
  """Coordinate-wise trimmed mean over the clients holding each coordinate.

  Of a coordinate's n holders, the k = floor(trim_fraction x n) smallest
  and k largest values are dropped and the rest averaged (unweighted);
  `trim_fraction < 0.5` keeps at least one. Shapes as :func:`masked_median`.
  """
  ordered, count = _sorted_holders(values, holds)
  trim = jnp.floor(trim_fraction * count.astype(jnp.float32)).astype(
      count.dtype)
  rank = jnp.arange(values.shape[0])[:, None]
  keep = (rank >= trim) & (rank < count - trim)
  total = jnp.sum(jnp.where(keep, ordered, 0), axis=0)
  held = count > 0
  return jnp.where(held, total / jnp.maximum(count - 2 * trim, 1), 0), held


def krum_scores(values: jax.Array, holds: jax.Array, participants: jax.Array,
                num_attackers: int) -> jax.Array:
  """Krum's score of each client: its summed distance to its closest peers.

  A client's score is the sum of its squared distances to its
  n - num_attackers - 2 nearest other participants (at least 1), n the
  number of participants. With heterogeneous masks two clients are compared
  on the coordinates both hold only: their squared distance there, scaled
  by `coords / shared` (the per-coordinate mean times the full size), so
  that a narrow client is not closer to everyone merely because it holds
  less; a pair sharing nothing is infinitely far apart.

  Args:
    values: `[clients, coords]` deltas.
    holds: `[clients, coords]` bool, as in :func:`masked_median`.
    participants: `[clients]` bool: the clients aggregated this round.
    num_attackers: Krum's f.

  Returns:
    `[clients]` float32 scores, +inf for non-participants.
  """
  h = holds.astype(jnp.float32)
  v = jnp.where(holds, values, 0).astype(jnp.float32)
  dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
  # sum_c h_i h_j (v_i - v_j)^2 = A_ij + A_ji - 2 v_i.v_j, A_ij = v_i^2 . h_j
  # (v is zero where not held).
  a = dot(v * v, h.T)
  distance = jnp.maximum(a + a.T - 2 * dot(v, v.T), 0)
  shared = dot(h, h.T)
  distance = jnp.where(shared > 0, distance * values.shape[1] /
                       jnp.maximum(shared, 1), jnp.inf)
  num_clients = values.shape[0]
  pair = (participants[:, None] & participants[None, :] &
          ~jnp.eye(num_clients, dtype=bool))
  distance = jnp.where(pair, distance, jnp.inf)
  neighbours = jnp.clip(participants.sum() - num_attackers - 2, 1,
                        max(num_clients - 1, 1))
  nearest = jnp.cumsum(jnp.sort(distance, axis=1), axis=1)
  score = jnp.take(nearest, neighbours - 1, axis=1)
  return jnp.where(participants, score, jnp.inf)


def krum_select(values: jax.Array, holds: jax.Array, participants: jax.Array,
                num_attackers: int, num_selected: int) -> jax.Array:
  """`[clients]` bool: the `num_selected` participants of lowest Krum score
  (:func:`krum_scores`; ties to the lower slot), fewer if fewer take part."""
  score = krum_scores(values, holds, participants, num_attackers)
  # Participants first (one with no peer scores +inf too), then by score.
  order = jnp.lexsort((score, ~participants))
  rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
  return participants & (rank < num_selected)


def flatten_clients(tree: Params) -> jax.Array:
  """Leaves `[clients, ...]` as one `[clients, coords]` array."""
  return jnp.concatenate([leaf.reshape(leaf.shape[0], -1)
                          for leaf in jax.tree.leaves(tree)], axis=1)


def unflatten(flat: jax.Array, like: Params) -> Params:
  """`[coords]` back into a tree shaped like `like` (one client's)."""
  leaves, treedef = jax.tree.flatten(like)
  parts = jnp.split(flat, np.cumsum([np.size(leaf) for leaf in leaves])[:-1])
  return treedef.unflatten([p.reshape(leaf.shape).astype(leaf.dtype)
                            for p, leaf in zip(parts, leaves)])


def stack_inputs(deltas: Params, masks: Params, weights: jax.Array):
  """A cohort's uploads as `(values, holds, participants, like)`: deltas
  `[clients, coords]`, whether each participant holds each coordinate, who
  takes part (weight > 0) and one client's tree to unflatten into."""
  participants = weights > 0
  holds = (flatten_clients(masks) > 0) & participants[:, None]
  like = jax.tree.map(lambda d: d[0], deltas)
  return flatten_clients(deltas), holds, participants, like
