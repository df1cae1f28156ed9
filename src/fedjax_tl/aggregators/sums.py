"""Streamed aggregation primitives: masked weighted sums and norm clipping.

HeteroFL-style aggregation averages each parameter entry over the clients that
hold it: `sum_i w_i m_i delta_i / sum_i w_i m_i`. The sums are streamed (added
chunk by chunk) so memory does not grow with the cohort; a parameter no client
holds (`den == 0`) gets no update.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_tl.models.base import Params


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
