"""Evaluation of the global model and of each tier's sub-model on a test set.

A tier's sub-model is the global model under that tier's width mask, so one
compiled function evaluates every tier (vmapped over the width fractions),
walking the test set in fixed-size batches.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_tl import policies
from fedjax_tl.data.federated import Dataset, FederatedData
from fedjax_tl.models import axes, exits
from fedjax_tl.models.base import ModelDef, Params

STATS_BATCH = 128  # examples per batch of a static batch norm's statistics


def statistics_data(model: ModelDef, clients: FederatedData
                    ) -> Dataset | None:
  """The data a static batch norm takes its evaluation statistics from:
  the clients' real training examples (their union), as HeteroFL's authors
  use; None for other models."""
  if not model.static_batch_norm:
    return None
  real = np.arange(clients.x.shape[1])[None] < clients.count[:, None]
  return Dataset(clients.x[real], clients.y[real])


def norm_statistics(model: ModelDef, params: Params, units, batches
                    ) -> dict[str, tuple[jax.Array, jax.Array]]:
  """A static batch norm's evaluation statistics: each norm's batch mean
  and unbiased variance, averaged over the batches `[batches, batch, ...]`
  with the model in training mode (batch statistics), as HeteroFL's
  authors compute them with PyTorch's cumulative running average."""
  def one(xb):
    return model.apply(params, xb, units=units, collect=True)[1]
  return jax.tree.map(lambda a: a.mean(0), jax.lax.map(one, batches))


def _stats_batches(data: Dataset | None) -> jax.Array | None:
  """Whole batches of STATS_BATCH examples (all in one if fewer)."""
  if data is None:
    return None
  n = len(data)
  size = min(STATS_BATCH, n)
  return jnp.asarray(data.x[:n // size * size].reshape(
      n // size, size, *data.x.shape[1:]))


def deployed_forward(model: ModelDef, sub: Params, mask: Params,
                     stats_batches: jax.Array | None
                     ) -> Callable[[jax.Array], jax.Array]:
  """`x -> logits` of a deployed sub-model (`sub`, the params times
  `mask`): a normalised model's norms run over the units the mask keeps,
  a static batch norm on statistics of `stats_batches`, and an early-exit
  model (models.exits) predicts from the exits the mask holds, their mean
  or the deepest (`ModelDef.exit_prediction`)."""
  kwargs = {}
  if model.normalised:
    kwargs["units"] = axes.held_units(mask, model.layers)
    if model.static_batch_norm:
      if stats_batches is None:
        raise ValueError("a model with static batch norm needs data for "
                         "its evaluation statistics (stats_data)")
      kwargs["stats"] = norm_statistics(model, sub, kwargs["units"],
                                        stats_batches)
  if not model.exits:
    return lambda x: model.apply(sub, x, **kwargs)
  held = exits.held_exits(model, mask)
  return lambda x: exits.predict(model.apply(sub, x, exits=True, **kwargs),
                                 held, model.exit_prediction)


def make_evaluator(model: ModelDef, data: Dataset, batch_size: int = 512,
                   scaler: bool = False,
                   masks_fn: Callable[[jax.Array, Params], Params] | None = None,
                   stats_data: Dataset | None = None,
                   loss_ignored: Sequence[int] = (),
                   accuracy_ignored: Sequence[int] = ()
                   ) -> Callable[[Params, jax.Array], tuple[np.ndarray, np.ndarray]]:
  """Returns `evaluate(params, fractions[tiers]) -> (accuracy, loss)` per tier.

  Accuracy and loss are means over the targets: one per example, or one
  per position of a sequence's labels `y[n, T]` (a language model's
  `[n, T, vocab]` logits), less the targets whose label is in
  `accuracy_ignored` (accuracy) or `loss_ignored` (loss): a text task's
  PAD, and for accuracy also OOV and the sequence markers
  (`data.text.ACCURACY_IGNORED`).

  A tier's sub-model is the global model times `masks_fn(fraction, params)`
  (e.g. `Simulation.deployed_masks`); by default the first-k width slice,
  with `scaler` keeping HeteroFL's scaler as it was trained (for models
  without normalisation layers to absorb the scale). At full width both
  are the same. A static batch norm evaluates on the statistics of
  `stats_data` (the clients' training data, as HeteroFL's authors use),
  recomputed for each tier's sub-model.
  """
  acc_n = _num_counted(data.y, accuracy_ignored)
  loss_n = _num_counted(data.y, loss_ignored)
  batches = _batched((data.x, data.y), batch_size)
  stats_batches = _stats_batches(stats_data)
  if masks_fn is None:
    masks_fn = _first_k_deployed(model, scaler)

  def one_tier(params, fraction, batches, stats_batches):
    mask = masks_fn(fraction, params)
    sub = jax.tree.map(jnp.multiply, params, mask)
    forward = deployed_forward(model, sub, mask, stats_batches)

    def batch_sums(batch):
      xb, yb, vb = batch
      logits = forward(xb)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
      correct = jnp.argmax(logits, -1) == yb
      return (jnp.sum(correct * _counts(yb, vb, accuracy_ignored)),
              jnp.sum(loss * _counts(yb, vb, loss_ignored)))

    correct, loss = jax.lax.map(batch_sums, batches)
    return correct.sum() / acc_n, loss.sum() / loss_n

  evaluate = jax.jit(jax.vmap(one_tier, in_axes=(None, 0, None, None)))

  def run(params: Params, fractions) -> tuple[np.ndarray, np.ndarray]:
    acc, loss = evaluate(params, jnp.asarray(fractions, jnp.float32), batches,
                         stats_batches)
    return np.asarray(acc), np.asarray(loss)

  return run


def make_local_evaluator(
    model: ModelDef, train: FederatedData, test: FederatedData,
    num_classes: int, tier: np.ndarray, num_tiers: int, batch_size: int = 512,
    scaler: bool = False,
    masks_fn: Callable[[jax.Array, Params], Params] | None = None,
    stats_data: Dataset | None = None,
    accuracy_ignored: Sequence[int] = (),
) -> Callable[[Params, jax.Array], tuple[float, np.ndarray]]:
  """Returns `evaluate(params, fractions[tiers]) -> (local, per_tier_local)`.

  Local accuracy (HeteroFL's): each device's own test examples (`test` row i
  belongs to device i), with the argmax restricted to the labels the device
  holds in its training data (`train` row i), averaged over all examples.
  `local` is the full-width global model's; `per_tier_local[t]` is tier t's
  deployed model (`fractions[t]`, masked and normalised as in
  :func:`make_evaluator`) on the
  devices of tier t (`tier[devices]`), NaN for a tier with no examples.
  Sequences (`y[clients, examples, T]`) count each position, less those
  whose label is in `accuracy_ignored` (as :func:`make_evaluator`).
  """
  held = np.zeros((train.num_clients, num_classes), bool)
  labels = train.y[train.mask]
  rows = np.repeat(np.arange(train.num_clients), train.count)
  held[_over_targets(rows, labels), labels] = True
  real = test.mask
  device = np.repeat(np.arange(test.num_clients), test.count)
  examples = (test.x[real], test.y[real], held[device], tier[device])
  targets = _num_counted_each(examples[1], accuracy_ignored)
  n = int(targets.sum())
  per_tier_n = np.bincount(examples[3], targets, minlength=num_tiers)
  batches = _batched(examples, batch_size)
  stats_batches = _stats_batches(stats_data)
  if masks_fn is None:  # the first-k slice, as make_evaluator's default
    masks_fn = _first_k_deployed(model, scaler)

  def correct_per_tier(params, fraction, batches, stats_batches):
    mask = masks_fn(fraction, params)
    sub = jax.tree.map(jnp.multiply, params, mask)
    forward = deployed_forward(model, sub, mask, stats_batches)

    def batch_counts(batch):
      xb, yb, heldb, tierb, vb = batch
      logits = jnp.where(_over_targets(heldb, yb), forward(xb), -jnp.inf)
      correct = ((jnp.argmax(logits, -1) == yb) &
                 _counts(yb, vb, accuracy_ignored))
      return jnp.zeros(num_tiers, jnp.int32).at[tierb].add(
          correct.reshape(correct.shape[0], -1).sum(1))

    return jax.lax.map(batch_counts, batches).sum(0)

  evaluate = jax.jit(jax.vmap(correct_per_tier, in_axes=(None, 0, None, None)))

  def run(params: Params, fractions) -> tuple[float, np.ndarray]:
    if n == 0:
      return float("nan"), np.full(num_tiers, np.nan)
    fractions = np.append(np.asarray(fractions, np.float32), 1.0)
    counts = np.asarray(evaluate(params, jnp.asarray(fractions), batches,
                                 stats_batches))
    with np.errstate(invalid="ignore", divide="ignore"):
      per_tier = np.diagonal(counts[:num_tiers]) / per_tier_n
    return float(counts[-1].sum() / n), per_tier

  return run


def _first_k_deployed(model: ModelDef, scaler: bool
                      ) -> Callable[[jax.Array, Params], Params]:
  """`(fraction, params) -> mask`: the first-k width slice a tier deploys,
  as HeteroFL's policy deploys it (`Policy.deployed`)."""
  return functools.partial(policies.get("heterofl", scaler=scaler).deployed,
                           model)


def _counts(yb: jax.Array, vb: jax.Array, ignored: Sequence[int]
            ) -> jax.Array:
  """bool like `yb`: the targets counted, those of real examples (`vb`,
  over the batch axis) whose label is not in `ignored`."""
  counted = _over_targets(vb, yb)
  if ignored:
    counted = counted & jnp.logical_not(jnp.isin(yb, jnp.asarray(ignored)))
  return counted


def _num_counted(y: np.ndarray, ignored: Sequence[int]) -> int:
  """How many of the targets `y` have a label not in `ignored`."""
  return int(_num_counted_each(y, ignored).sum())


def _num_counted_each(y: np.ndarray, ignored: Sequence[int]) -> np.ndarray:
  """`[examples]` int: each example's targets whose label is not in
  `ignored` (1 per example for class labels)."""
  counted = ~np.isin(y, ignored) if ignored else np.ones(y.shape, bool)
  return counted.reshape(y.shape[0], math.prod(y.shape[1:])).sum(1)


def _over_targets(per_example, y):
  """`per_example[n, ...]` with a unit axis inserted after `n` for each
  target axis of `y[n, ...]` (a sequence's positions), so that it
  broadcasts over an example's targets (numpy or jax)."""
  shape = per_example.shape
  return per_example.reshape(shape[:1] + (1,) * (y.ndim - 1) + shape[1:])


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
