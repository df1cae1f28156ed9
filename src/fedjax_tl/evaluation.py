"""Evaluation of the global model and of each tier's sub-model on a test set.

A tier's sub-model is the global model under that tier's width mask, so one
compiled function evaluates every tier (vmapped over the width fractions),
walking the test set in fixed-size batches.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_tl.policies import capacity
from fedjax_tl.data.federated import Dataset, FederatedData
from fedjax_tl.models.base import ModelDef, Params


def make_evaluator(model: ModelDef, data: Dataset, batch_size: int = 512,
                   scaler: bool = False,
                   masks_fn: Callable[[jax.Array, Params], Params] | None = None
                   ) -> Callable[[Params, jax.Array], tuple[np.ndarray, np.ndarray]]:
  """Returns `evaluate(params, fractions[tiers]) -> (accuracy, loss)` per tier.

  A tier's sub-model is the global model times `masks_fn(fraction, params)`
  (e.g. `Simulation.deployed_masks`); by default the first-k width slice,
  with `scaler` keeping HeteroFL's scaler as it was trained (our models have
  no normalisation layer to absorb the scale). At full width both are the
  same.
  """
  n = len(data)
  batches = _batched((data.x, data.y), batch_size)
  if masks_fn is None:
    masks_fn = functools.partial(_width_masks, model=model, scaler=scaler)

  def one_tier(params, fraction, batches):
    sub = jax.tree.map(jnp.multiply, params, masks_fn(fraction, params))

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


def make_local_evaluator(
    model: ModelDef, train: FederatedData, test: FederatedData,
    num_classes: int, tier: np.ndarray, num_tiers: int, batch_size: int = 512,
    scaler: bool = False,
    masks_fn: Callable[[jax.Array, Params], Params] | None = None,
) -> Callable[[Params, jax.Array], tuple[float, np.ndarray]]:
  """Returns `evaluate(params, fractions[tiers]) -> (local, per_tier_local)`.

  Local accuracy (HeteroFL's): each device's own test examples (`test` row i
  belongs to device i), with the argmax restricted to the labels the device
  holds in its training data (`train` row i), averaged over all examples.
  `local` is the full-width global model's; `per_tier_local[t]` is tier t's
  deployed model (`fractions[t]`, masked as in :func:`make_evaluator`) on the
  devices of tier t (`tier[devices]`), NaN for a tier with no examples.
  """
  held = np.zeros((train.num_clients, num_classes), bool)
  rows = np.repeat(np.arange(train.num_clients), train.count)
  held[rows, train.y[train.mask]] = True
  real = test.mask
  device = np.repeat(np.arange(test.num_clients), test.count)
  examples = (test.x[real], test.y[real], held[device], tier[device])
  n = examples[1].shape[0]
  per_tier_n = np.bincount(examples[3], minlength=num_tiers)
  batches = _batched(examples, batch_size)
  if masks_fn is None:  # the first-k slice, as make_evaluator's default
    masks_fn = functools.partial(_width_masks, model=model, scaler=scaler)

  def correct_per_tier(params, fraction, batches):
    sub = jax.tree.map(jnp.multiply, params, masks_fn(fraction, params))

    def batch_counts(batch):
      xb, yb, heldb, tierb, vb = batch
      logits = jnp.where(heldb, model.apply(sub, xb), -jnp.inf)
      correct = (jnp.argmax(logits, -1) == yb) & vb
      return jnp.zeros(num_tiers, jnp.int32).at[tierb].add(correct)

    return jax.lax.map(batch_counts, batches).sum(0)

  evaluate = jax.jit(jax.vmap(correct_per_tier, in_axes=(None, 0, None)))

  def run(params: Params, fractions) -> tuple[float, np.ndarray]:
    if n == 0:
      return float("nan"), np.full(num_tiers, np.nan)
    fractions = np.append(np.asarray(fractions, np.float32), 1.0)
    counts = np.asarray(evaluate(params, jnp.asarray(fractions), batches))
    with np.errstate(invalid="ignore", divide="ignore"):
      per_tier = np.diagonal(counts[:num_tiers]) / per_tier_n
    return float(counts[-1].sum() / n), per_tier

  return run


def _width_masks(fraction: jax.Array, params: Params, *, model: ModelDef,
                 scaler: bool) -> Params:
  return capacity.deployed_width_masks(fraction, model.layers, params,
                                       scaler)


def _batched(arrays: tuple[np.ndarray, ...], batch_size: int
             ) -> tuple[jax.Array, ...]:
  """`arrays` (equal leading size n) zero-padded into `[batches, batch, ...]`,
  plus the `[batches, batch]` validity mask."""
  n = arrays[0].shape[0]
  batch_size = max(1, min(batch_size, n))
  num_batches = max(1, -(-n // batch_size))
  pad = num_batches * batch_size - n
  out = [jnp.asarray(np.concatenate(
      [a, np.zeros((pad, *a.shape[1:]), a.dtype)])).reshape(
          num_batches, batch_size, *a.shape[1:]) for a in arrays]
  valid = (np.arange(num_batches * batch_size) < n).reshape(num_batches,
                                                            batch_size)
  return (*out, jnp.asarray(valid))
