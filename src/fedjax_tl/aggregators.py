"""Aggregation primitives over stacked client results, all jit-friendly.

HeteroFL-style aggregation averages each parameter entry over the clients that
hold it: `sum_i w_i m_i delta_i / sum_i w_i m_i`. The sums are streamed (added
chunk by chunk) so memory does not grow with the cohort; a parameter no client
holds (`den == 0`) gets no update. Robust rules (:class:`Aggregator`: norm
clipping, masked median, trimmed mean, Krum) take the same masks into account.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl.models.base import Params

AGGREGATORS = ("mean", "clip", "median", "trimmed_mean", "krum", "multi_krum")
# The statistics that need every client's delta at once (not streamable).
STACKED_AGGREGATORS = ("median", "trimmed_mean", "krum", "multi_krum")


def zeros_like_sums(params: Params) -> tuple[Params, Params]:
  """Empty `(num, den)` accumulators shaped like params."""
  zeros = jax.tree.map(jnp.zeros_like, params)
  return zeros, zeros


def add_weighted(num: Params, den: Params, deltas: Params, masks: Params,
                 weights: jax.Array, *, deltas_masked: bool = False
                 ) -> tuple[Params, Params]:
  """Adds `sum_i w_i m_i delta_i` and `sum_i w_i m_i` of a stacked chunk.

  Args:
    num, den: running sums shaped like params.
    deltas, masks: client deltas and masks, leaves `[clients, *param_shape]`.
    weights: `[clients]` aggregation weights (0 for padding slots).
    deltas_masked: the deltas are already zero outside their 0/1 masks (as
      client updates guarantee), so `m * delta == delta` and the multiply,
      a full pass over `[clients, params]`, is skipped.
  """
  def weigh(x):
    return jnp.tensordot(weights.astype(x.dtype), x, axes=1)

  if deltas_masked:
    num = jax.tree.map(lambda n, d: n + weigh(d), num, deltas)
  else:
    num = jax.tree.map(lambda n, d, m: n + weigh(d * m), num, deltas, masks)
  den = jax.tree.map(lambda s, m: s + weigh(m), den, masks)
  return num, den


def masked_mean(num: Params, den: Params) -> tuple[Params, Params]:
  """`(num / den where den > 0 else 0, den > 0)`, leafwise."""
  held = jax.tree.map(lambda d: d > 0, den)
  mean = jax.tree.map(
      lambda n, d, h: jnp.where(h, n / jnp.where(h, d, 1), 0), num, den, held)
  return mean, held


def clip_by_norm(deltas: Params, clip_norm: float | jax.Array
                 ) -> tuple[Params, jax.Array]:
  """Each client's delta (leaves `[clients, ...]`) scaled to a global L2
  norm of at most `clip_norm`; a shorter one is unchanged.

  Returns:
    `(clipped deltas, within[clients])`: whether each client's norm was
    already within the bound.
  """
  squares = sum(jnp.sum(jnp.square(d).reshape(d.shape[0], -1), axis=1)
                for d in jax.tree.leaves(deltas))
  norms = jnp.sqrt(squares)
  scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-30))
  clipped = jax.tree.map(
      lambda d: d * scale.reshape(-1, *[1] * (d.ndim - 1)).astype(d.dtype),
      deltas)
  return clipped, norms <= clip_norm


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


def _flatten_clients(tree: Params) -> jax.Array:
  """Leaves `[clients, ...]` as one `[clients, coords]` array."""
  return jnp.concatenate([leaf.reshape(leaf.shape[0], -1)
                          for leaf in jax.tree.leaves(tree)], axis=1)


def _unflatten(flat: jax.Array, like: Params) -> Params:
  """`[coords]` back into a tree shaped like `like` (one client's)."""
  leaves, treedef = jax.tree.flatten(like)
  parts = jnp.split(flat, np.cumsum([np.size(leaf) for leaf in leaves])[:-1])
  return treedef.unflatten([p.reshape(leaf.shape).astype(leaf.dtype)
                            for p, leaf in zip(parts, leaves)])


@dataclasses.dataclass(frozen=True)
class Aggregator:
  """How the server combines a round's client deltas.

  Attributes:
    kind: one of AGGREGATORS. "mean": the weighted masked mean, streamed
      chunk by chunk; "clip": the same after scaling each client's delta to
      a norm of at most `clip_norm` (:func:`clip_by_norm`), streamed too;
      "median" / "trimmed_mean": coordinate-wise over the clients holding
      each parameter (unweighted); "krum" / "multi_krum": the weighted
      masked mean of the 1 / `krum_m` clients of lowest Krum score
      (:func:`krum_scores`). The last four (STACKED_AGGREGATORS) stack the
      whole cohort's deltas and masks, so their memory grows with the cohort
      (2 x slots x params floats), not with the chunk.
    clip_norm: "clip"'s bound on each client's update norm.
    trim_fraction: "trimmed_mean"'s share dropped at each end, in [0, 0.5).
    krum_f: Krum's assumed number of attackers.
    krum_m: "multi_krum"'s number of selected clients.
  """
  kind: str = "mean"
  clip_norm: float = 1.0
  trim_fraction: float = 0.1
  krum_f: int = 0
  krum_m: int = 1

  @property
  def stacked(self) -> bool:
    """Whether it needs the cohort's deltas at once (not streamable)."""
    return self.kind in STACKED_AGGREGATORS

  def prepare(self, deltas: Params) -> Params:
    """A chunk's deltas as the aggregator takes them (clipped for "clip")."""
    if self.kind == "clip":
      return clip_by_norm(deltas, self.clip_norm)[0]
    return deltas

  def combine(self, deltas: Params, masks: Params, weights: jax.Array
              ) -> tuple[Params, Params]:
    """A stacked aggregator's result over the cohort, as `(num, den)`.

    Args:
      deltas, masks: every slot's delta and mask, leaves `[slots, ...]`.
      weights: `[slots]` aggregation weights; a slot of weight 0 takes no
        part (padding, dropped, excluded).

    Returns:
      Sums for :func:`masked_mean` (the server step): for median and trimmed
      mean the statistic itself with `den` 1 where some client holds the
      parameter; for Krum the weighted masked sums of the selected clients.
    """
    participants = weights > 0
    holds = _flatten_clients(masks) > 0
    holds = holds & participants[:, None]
    values = _flatten_clients(deltas)
    like = jax.tree.map(lambda d: d[0], deltas)
    if self.kind in ("median", "trimmed_mean"):
      if self.kind == "median":
        stat, held = masked_median(values, holds)
      else:
        stat, held = masked_trimmed_mean(values, holds, self.trim_fraction)
      return _unflatten(stat, like), _unflatten(held.astype(jnp.float32),
                                                like)
    if self.kind in ("krum", "multi_krum"):
      selected = krum_select(values, holds, participants, self.krum_f,
                             1 if self.kind == "krum" else self.krum_m)
      return add_weighted(*zeros_like_sums(like), deltas, masks,
                          weights * selected)
    raise ValueError(f"{self.kind!r} is not a stacked aggregator")
