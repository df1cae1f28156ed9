"""Server-side pretraining on the source task: the model that gets migrated.

Pretraining is centralised: one jit-compiled `lax.scan` of SGD-with-momentum
steps over shuffled minibatches of the source data, deterministic from the
seed. The result is saved with orbax and loaded as the starting point of
federated fine-tuning.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_tl.client import cross_entropy
from fedjax_tl.data.federated import Dataset
from fedjax_tl.models.base import Params


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
