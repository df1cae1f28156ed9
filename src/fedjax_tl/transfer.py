"""Server-side preparation of the model that gets migrated onto the devices.

Pretraining is centralised: one jit-compiled `lax.scan` of SGD-with-momentum
steps over shuffled minibatches of the source data, deterministic from the
seed. Importance ordering then permutes the pretrained hidden units so that
first-k sub-models keep the most important ones.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_tl.client import cross_entropy
from fedjax_tl.data.federated import Dataset
from fedjax_tl.models.base import LayerSpec, Params


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
  epochs = -(-steps // per_epoch)
  tx = optax.sgd(optax.cosine_decay_schedule(learning_rate, steps),
                 momentum=0.9)
  x, y = jnp.asarray(data.x), jnp.asarray(data.y)

  @jax.jit
  def train(params, key):
    keys = jax.random.split(key, epochs)
    order = jax.vmap(lambda k: jax.random.permutation(k, n)[
        :per_epoch * batch_size])(keys).reshape(-1, batch_size)[:steps]

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


def unit_importance(params: Params, layers: Sequence[LayerSpec],
                    group: int) -> jax.Array:
  """`[units]` importance of hidden group `group`'s units.

  The product of the L2 norms of a unit's incoming weights (with its bias)
  and of its outgoing weights: a unit matters only if it both responds to its
  inputs and is read by the next layer.
  """
  size = None
  incoming = outgoing = 1.0
  for spec in layers:
    kernel = params[spec.name]["kernel"]
    if spec.out_group == group:
      size = kernel.shape[-1]
      w = kernel.reshape(-1, size)
      incoming = jnp.sqrt(jnp.sum(w**2, 0) + params[spec.name]["bias"]**2)
    if spec.in_group == group:
      c = kernel.shape[-2] // spec.in_repeat
      # Rows of a flatten's kernel are ordered (position, channel).
      w = jnp.moveaxis(kernel.reshape(*kernel.shape[:-2], spec.in_repeat, c,
                                      kernel.shape[-1]), -2, 0)
      outgoing = jnp.sqrt(jnp.sum(w.reshape(c, -1)**2, 1))
  if size is None:
    raise ValueError(f"no layer produces hidden group {group}")
  return incoming * outgoing


def reorder_by_importance(params: Params, layers: Sequence[LayerSpec],
                          group_sizes: Sequence[int]) -> Params:
  """Permutes every hidden group's units, most important first.

  Permuting the hidden units of a ReLU network (a layer's output columns and
  the next layer's matching input rows together) leaves its function
  unchanged, so the migrated model is the same model; only which units a
  first-k sub-model keeps changes: the most important ones.
  """
  params = jax.tree.map(lambda a: a, params)  # a copy we may rebind into
  for group in range(len(group_sizes)):
    order = jnp.argsort(-unit_importance(params, layers, group))
    for spec in layers:
      layer = dict(params[spec.name])
      if spec.out_group == group:
        layer["kernel"] = layer["kernel"][..., order]
        layer["bias"] = layer["bias"][order]
      if spec.in_group == group:
        kernel = layer["kernel"]
        c = kernel.shape[-2] // spec.in_repeat
        split = kernel.reshape(*kernel.shape[:-2], spec.in_repeat, c,
                               kernel.shape[-1])
        layer["kernel"] = split[..., order, :].reshape(kernel.shape)
      params[spec.name] = layer
  return params
