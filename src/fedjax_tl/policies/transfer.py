"""Server-side preparation of the model that gets migrated onto the devices.

Pretraining is centralised: one jit-compiled `lax.scan` of SGD-with-momentum
steps over shuffled minibatches of the source data, deterministic from the
seed. Importance ordering then permutes the pretrained hidden units so that
first-k sub-models keep the most important ones; distillation instead trains
every tier's first-k sub-model on the pretrained model's soft labels.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_tl import cost
from fedjax_tl.policies import capacity
from fedjax_tl.client import cross_entropy, distillation_loss
from fedjax_tl.data.federated import Dataset
from fedjax_tl.models import axes
from fedjax_tl.models.axes import Layer
from fedjax_tl.models.base import Params

# Distillation draws its minibatches from a stream apart from pretraining's.
_DISTILL_SALT = 0x4D15


def pretrain(apply_fn: Callable[[Params, jax.Array], jax.Array],
             params: Params, data: Dataset, *, steps: int, batch_size: int,
             learning_rate: float, seed: int) -> tuple[Params, float]:
  """Trains `params` on `data` centrally; returns `(params, final_loss)`.

  Minibatches walk a fresh permutation each epoch (without replacement),
  all drawn inside the compiled loop.
  """
  if steps == 0:
    return params, float("nan")
  n = len(data)
  batch_size = min(batch_size, n)
  per_epoch = n // batch_size
  tx = optax.sgd(optax.cosine_decay_schedule(learning_rate, steps),
                 momentum=0.9)
  x, y = jnp.asarray(data.x), jnp.asarray(data.y)

  @jax.jit
  def train(params, key):
    order = minibatch_order(key, n, batch_size, steps)

    def step(carry, idx):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(
          lambda p: cross_entropy(apply_fn(p, x[idx]), y[idx]))(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), order)
    return params, losses[-min(steps, per_epoch):].mean()

  params, loss = train(params, jax.random.key(np.uint32(seed)))
  return params, float(loss)


def minibatch_order(key: jax.Array, n: int, batch_size: int,
                    steps: int) -> jax.Array:
  """`[steps, batch_size]` example indices, a fresh permutation each epoch.

  Each epoch walks a permutation of the `n` examples without replacement
  (dropping the last partial batch); needs `batch_size <= n`.
  """
  per_epoch = n // batch_size
  keys = jax.random.split(key, -(-steps // per_epoch))
  return jax.vmap(lambda k: jax.random.permutation(k, n)[
      :per_epoch * batch_size])(keys).reshape(-1, batch_size)[:steps]


class DistillCost(NamedTuple):
  """The server's cost of distillation, and where it ended.

  Attributes:
    flops: total FLOPs (see :func:`distill_flops`).
    seconds: wall seconds, compilation included.
    loss: mean loss over the last epoch's steps.
  """
  flops: float
  seconds: float
  loss: float


def distill_flops(layers: Sequence[Layer], params: Params, widths: Sequence[float], *,
                  input_shape: Sequence[int], batch_size: int,
                  steps: int) -> float:
  """Total FLOPs of :func:`distill` over `steps` steps of `batch_size`.

  Per example and step: a teacher forward pass plus a training step (3
  forward passes, `cost.TRAIN_FLOPS_FACTOR`) of each width's first-k
  sub-model, counted by `cost.forward_flops`.
  """
  positions = cost.conv_positions(input_shape, layers, params)
  per_example = cost.forward_flops(layers, params, None, positions)
  for width in widths:
    present = capacity.width_masks(jnp.float32(width), layers, params)
    per_example += cost.TRAIN_FLOPS_FACTOR * cost.forward_flops(
        layers, params, present, positions)
  return float(per_example) * batch_size * steps


def distill(apply_fn: Callable[[Params, jax.Array], jax.Array],
            params: Params, data: Dataset, *, layers: Sequence[Layer],
            widths: Sequence[float], steps: int,
            batch_size: int, learning_rate: float, temperature: float,
            use_labels: bool, seed: int, scaler: bool = False
            ) -> tuple[Params, DistillCost]:
  """Distils `params` (the teacher, frozen) into its own first-k sub-models.

  Slimmable networks' training (Yu et al., ICLR 2019) with in-place
  distillation (Yu & Huang, ICCV 2019), the teacher being the pretrained
  model: the student starts as a copy of it and each step, on a minibatch,
  minimises the sum over `widths` and full width of
  :func:`distillation_loss` between the teacher's logits and the width's
  first-k sub-model's, plus, with `use_labels`, the full-width student's
  cross-entropy on the labels.
  One jit-compiled `lax.scan` of SGD-with-momentum steps (cosine decay),
  minibatches as in :func:`pretrain`, deterministic from `seed`.

  Args:
    apply_fn: the model's `apply(params, x)`.
    params: the pretrained model (teacher and the student's start).
    data: the server's data; its labels are read only with `use_labels`.
    layers: the model's layers and their named axes.
    widths: the width fractions of the sub-models to train (the tiers');
      full width is always trained, as in slimmable networks.
    steps: optimisation steps (0 returns `params` unchanged).
    batch_size: examples per step (at most `len(data)`).
    learning_rate: the initial learning rate.
    temperature: the softmax temperature T.
    use_labels: whether the full width also learns from the labels.
    seed: the random seed.
    scaler: train each sub-model with HeteroFL's scaler, as it is deployed.

  Returns:
    `(params, cost)`: the student and a :class:`DistillCost`.
  """
  start = time.perf_counter()
  n = len(data)
  batch_size = min(batch_size, n)
  widths = tuple(sorted({1.0, *map(float, widths)}, reverse=True))
  flops = distill_flops(layers, params, widths,
                        input_shape=data.x.shape[1:], batch_size=batch_size,
                        steps=steps)
  if steps == 0:
    return params, DistillCost(0.0, 0.0, float("nan"))
  masks = [capacity.deployed_width_masks(jnp.float32(w), layers, params,
                                        scaler) for w in widths]
  train = _distill_loop(
      apply_fn, _slimmable_loss(apply_fn, widths, masks, temperature,
                                use_labels),
      data, batch_size=batch_size, steps=steps, learning_rate=learning_rate)
  key = jax.random.fold_in(jax.random.key(np.uint32(seed)), _DISTILL_SALT)
  student, loss = jax.block_until_ready(train(params, key))
  return student, DistillCost(flops, time.perf_counter() - start, float(loss))


def _slimmable_loss(apply_fn: Callable[[Params, jax.Array], jax.Array],
                    widths: Sequence[float], masks: Sequence[Params],
                    temperature: float, use_labels: bool) -> Callable:
  """The student's loss on a minibatch, summed over `widths` (see distill).

  Returns:
    `loss_fn(student, teacher_logits, xb, yb)`; `masks[i]` zeroes what
    `widths[i]`'s sub-model leaves out.
  """
  def loss_fn(student, teacher_logits, xb, yb):
    total = 0.0
    for width, mask in zip(widths, masks):
      logits = apply_fn(jax.tree.map(jnp.multiply, student, mask), xb)
      total += distillation_loss(teacher_logits, logits, temperature)
      if use_labels and width == 1.0:
        total += cross_entropy(logits, yb)
    return total
  return loss_fn


def _distill_loop(apply_fn: Callable[[Params, jax.Array], jax.Array],
                  loss_fn: Callable, data: Dataset, *, batch_size: int,
                  steps: int, learning_rate: float) -> Callable:
  """The compiled distillation: `train(teacher, key) -> (student, loss)`.

  `steps` SGD-with-momentum steps (cosine decay) on `loss_fn`, minibatches
  as in :func:`pretrain`; the loss is the mean over the last epoch's steps.
  """
  n = len(data)
  per_epoch = n // batch_size
  tx = optax.sgd(optax.cosine_decay_schedule(learning_rate, steps),
                 momentum=0.9)
  x, y = jnp.asarray(data.x), jnp.asarray(data.y)

  @jax.jit
  def train(teacher, key):
    order = minibatch_order(key, n, batch_size, steps)

    def step(carry, idx):
      student, opt_state = carry
      teacher_logits = jax.lax.stop_gradient(apply_fn(teacher, x[idx]))
      loss, grads = jax.value_and_grad(loss_fn)(student, teacher_logits,
                                                x[idx], y[idx])
      updates, opt_state = tx.update(grads, opt_state, student)
      return (optax.apply_updates(student, updates), opt_state), loss

    (student, _), losses = jax.lax.scan(step, (teacher, tx.init(teacher)),
                                        order)
    return student, losses[-min(steps, per_epoch):].mean()

  return train


def unit_importance(params: Params, layers: Sequence[Layer],
                    group: str) -> jax.Array:
  """`[units]` importance of width group `group`'s units.

  The product of the L2 norms of a unit's incoming weights (with its bias)
  and of its outgoing weights (`axes.unit_norms`): a unit matters only if it
  both responds to its inputs and is read by the next layer.
  """
  incoming, outgoing = axes.unit_norms(params, layers, group)
  if incoming is None:
    raise ValueError(f"no layer writes width group {group!r}")
  return incoming if outgoing is None else incoming * outgoing


def reorder_by_importance(params: Params, layers: Sequence[Layer]) -> Params:
  """Permutes every width group's units, most important first.

  Permuting the hidden units of a ReLU network (a layer's output columns and
  the next layer's matching input rows together) leaves its function
  unchanged, so the migrated model is the same model; only which units a
  first-k sub-model keeps changes: the most important ones.
  """
  for group in axes.group_sizes(layers, params):
    order = jnp.argsort(-unit_importance(params, layers, group))
    params = axes.permute(params, layers, group, order)
  return params
