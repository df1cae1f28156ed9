"""Evaluation of the global model and of each tier's sub-model on a test set.

A tier's sub-model is the global model under that tier's width mask, so one
compiled function evaluates every tier (vmapped over the width fractions),
walking the test set in fixed-size batches.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_tl import capacity
from fedjax_tl.data.federated import Dataset
from fedjax_tl.models.base import ModelDef, Params


def make_evaluator(model: ModelDef, data: Dataset, batch_size: int = 512,
                   scaler: bool = False
                   ) -> Callable[[Params, jax.Array], tuple[np.ndarray, np.ndarray]]:
  """Returns `evaluate(params, fractions[tiers]) -> (accuracy, loss)` per tier.

  A tier's sub-model is the first-k width slice of the global model; with
  `scaler` it keeps HeteroFL's scaler, as it was trained (our models have no
  normalisation layer to absorb the scale). At full width both are the same.
  """
  n = len(data)
  batch_size = min(batch_size, n)
  num_batches = -(-n // batch_size)
  pad = num_batches * batch_size - n
  x = jnp.asarray(np.concatenate(
      [data.x, np.zeros((pad, *data.x.shape[1:]), data.x.dtype)]))
  y = jnp.asarray(np.concatenate([data.y, np.zeros(pad, data.y.dtype)]))
  valid = jnp.arange(num_batches * batch_size) < n
  batches = (x.reshape(num_batches, batch_size, *x.shape[1:]),
             y.reshape(num_batches, batch_size),
             valid.reshape(num_batches, batch_size))

  def one_tier(params, fraction, batches):
    masks = capacity.width_masks(fraction, model.layers, model.group_sizes,
                                 params)
    if scaler:
      masks = capacity.scale_hidden(masks, model.layers, fraction)
    sub = jax.tree.map(jnp.multiply, params, masks)

    def batch_sums(batch):
      xb, yb, vb = batch
      logits = model.apply(sub, xb)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
      correct = jnp.argmax(logits, -1) == yb
      return jnp.sum(correct * vb), jnp.sum(loss * vb)

    correct, loss = jax.lax.map(batch_sums, batches)
    return correct.sum() / n, loss.sum() / n

  evaluate = jax.jit(jax.vmap(one_tier, in_axes=(None, 0, None)))

  def run(params: Params, fractions) -> tuple[np.ndarray, np.ndarray]:
    acc, loss = evaluate(params, jnp.asarray(fractions, jnp.float32), batches)
    return np.asarray(acc), np.asarray(loss)

  return run
