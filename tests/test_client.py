"""The local update against hand-written numpy SGD, and its masks."""

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl import capacity
from fedjax_tl.client import batch_indices, client_optimizer, make_client_update
from fedjax_tl.models import build_model


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_batches_visit_only_real_examples():
  idx = np.asarray(batch_indices(jax.random.key(3), jnp.int32(7), 20, 4, 5))
  assert idx.shape == (4, 5)
  assert idx.max() < 7
  # Without replacement within an epoch: the first 7 draws are all distinct.
  assert sorted(idx.reshape(-1)[:7].tolist()) == list(range(7))


def test_logistic_regression_update_matches_numpy_sgd():
  # hidden=() makes the MLP a softmax regression: its gradient has a closed
  # form, x^T (softmax(xW + b) - onehot) / batch.
  model = build_model("mlp", (6,), 3, seed=0, hidden=())
  rng = np.random.default_rng(0)
  x = rng.normal(size=(9, 6)).astype(np.float32)
  y = rng.integers(0, 3, 9).astype(np.int32)
  count, steps, batch, lr, mu = 7, 4, 3, 0.3, 0.5
  update = make_client_update(model.apply, client_optimizer(lr), local_steps=steps,
                              batch_size=batch, mu=mu)
  ones = jax.tree.map(jnp.ones_like, model.init_params)
  key = jax.random.key(5)
  delta, stats = jax.jit(update)(model.init_params, ones, ones, x, y,
                                 jnp.int32(count), jnp.int32(3), key)

  w0 = np.asarray(model.init_params["head"]["kernel"], np.float64)
  b0 = np.asarray(model.init_params["head"]["bias"], np.float64)
  w, b = w0.copy(), b0.copy()
  losses = []
  for idx in np.asarray(batch_indices(key, count, 9, steps, batch))[:3]:
    xb, onehot = x[idx], np.eye(3)[y[idx]]
    p = _softmax(xb @ w + b)
    losses.append(-np.mean(np.sum(onehot * np.log(p), -1)) + 0.5 * mu * (
        np.sum((w - w0) ** 2) + np.sum((b - b0) ** 2)))
    gw = xb.T @ (p - onehot) / batch + mu * (w - w0)
    gb = (p - onehot).mean(0) + mu * (b - b0)
    w, b = w - lr * gw, b - lr * gb
  np.testing.assert_allclose(delta["head"]["kernel"], w - w0, rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(delta["head"]["bias"], b - b0, rtol=1e-4,
                             atol=1e-6)
  assert int(stats.steps) == 3
  np.testing.assert_allclose(float(stats.loss), np.mean(losses), rtol=1e-4)


def test_update_leaves_everything_outside_the_mask_untouched():
  model = build_model("mlp", (8, 8, 1), 10, seed=0, hidden=(16, 8))
  params = model.init_params
  masks = capacity.width_masks(jnp.float32(0.25), model.layers,
                               model.group_sizes, params)
  # Momentum, weight decay and the proximal term all act on every entry
  # they can reach; none may reach outside the client's sub-model.
  update = make_client_update(
      model.apply, client_optimizer(0.5, momentum=0.9, weight_decay=0.1),
      local_steps=6, batch_size=4, mu=0.1)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(10, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, 10, 10).astype(np.int32)
  delta, _ = jax.jit(update)(params, masks, masks, x, y, jnp.int32(10),
                             jnp.int32(6), jax.random.key(0))
  for d, m in zip(jax.tree.leaves(delta), jax.tree.leaves(masks)):
    d, m = np.asarray(d), np.asarray(m)
    assert np.all(d[m == 0] == 0)
    assert np.any(d[m == 1] != 0)


def test_zero_steps_means_no_change():
  model = build_model("mlp", (4,), 2, seed=0, hidden=(3,))
  ones = jax.tree.map(jnp.ones_like, model.init_params)
  update = make_client_update(model.apply, client_optimizer(0.1, 0.9),
                              local_steps=3, batch_size=2)
  x = np.ones((4, 4), np.float32)
  delta, stats = jax.jit(update)(model.init_params, ones, ones, x,
                                 np.zeros(4, np.int32), jnp.int32(4),
                                 jnp.int32(0), jax.random.key(0))
  assert all(np.all(np.asarray(d) == 0) for d in jax.tree.leaves(delta))
  assert int(stats.steps) == 0
