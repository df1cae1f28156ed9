"""The local update against hand-written numpy SGD, and its masks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import pytest

from fedjax_tl.policies import capacity
from fedjax_tl.policies.fjord import step_width
from fedjax_tl.client import batch_indices, client_optimizer, make_client_update
from fedjax_tl.models import build_model
from fedjax_tl.models.layers import dropout_keep


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
  masks = capacity.width_masks(jnp.float32(0.25), model.layers, params)
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


def test_fjord_self_distillation_step_matches_numpy():
  # One hidden layer of 4 units; the client holds all 4, the step draws the
  # first 2. Loss = CE(full) + KL(softmax(full) || softmax(half)), and both
  # sub-models' gradients reach the client's parameters.
  model = build_model("mlp", (5,), 3, seed=0, hidden=(4,))
  params = model.init_params
  full = capacity.width_masks(jnp.float32(1.0), model.layers, params)
  half = capacity.width_masks(jnp.float32(0.5), model.layers, params)
  rng = np.random.default_rng(3)
  x = rng.normal(size=(4, 5)).astype(np.float32)
  y = rng.integers(0, 3, 4).astype(np.int32)
  lr = 0.1
  update = make_client_update(model.apply, client_optimizer(lr),
                              local_steps=1, batch_size=4, self_distill=True)
  delta, stats = jax.jit(functools.partial(
      update, step_masks=lambda key: (half, half)))(
          params, full, full, x, y, jnp.int32(4), jnp.int32(1),
          jax.random.key(0))

  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  idx = np.asarray(batch_indices(jax.random.key(0), 4, 4, 1, 4))[0]
  xb, onehot = x[idx], np.eye(3)[y[idx]]
  shapes = [p["dense_0"]["kernel"].shape, p["dense_0"]["bias"].shape,
            p["head"]["kernel"].shape, p["head"]["bias"].shape]
  flat = np.concatenate([p["dense_0"]["kernel"].ravel(),
                         p["dense_0"]["bias"], p["head"]["kernel"].ravel(),
                         p["head"]["bias"]])

  def unflatten(flat):
    return [part.reshape(s) for part, s in zip(
        np.split(flat, np.cumsum([np.prod(s) for s in shapes])[:-1]), shapes)]

  def probs(f):  # the full model's and the half-width model's softmax
    w1, b1, w2, b2 = unflatten(f)
    h = np.maximum(xb @ w1 + b1, 0)
    return _softmax(h @ w2 + b2), _softmax((h * [1, 1, 0, 0]) @ w2 + b2)

  teacher_probs = probs(flat)[0]

  def frozen_teacher_loss(f):  # the teacher's soft labels are a fixed target
    pt, ps = probs(f)
    ce = -np.mean(np.sum(onehot * np.log(pt), -1))
    return ce + np.mean(np.sum(teacher_probs * (np.log(teacher_probs) -
                                                np.log(ps)), -1))

  value = frozen_teacher_loss(flat)
  eps = 1e-6
  grad = np.array([(frozen_teacher_loss(flat + eps * e) -
                    frozen_teacher_loss(flat - eps * e)) / (2 * eps)
                   for e in np.eye(flat.size)])
  expected = unflatten(-lr * grad)
  got = [delta["dense_0"]["kernel"], delta["dense_0"]["bias"],
         delta["head"]["kernel"], delta["head"]["bias"]]
  for g, e in zip(got, expected):
    np.testing.assert_allclose(np.asarray(g), e, rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(float(stats.loss), value, rtol=1e-5)


def _full_model_args(model, num_steps):
  """`update` arguments: the whole model of 12 random examples, 8x8x1."""
  ones = jax.tree.map(jnp.ones_like, model.init_params)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(12, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, 10, 12).astype(np.int32)
  return (model.init_params, ones, ones, x, y, jnp.int32(12),
          jnp.int32(num_steps), jax.random.key(0))


def test_bfloat16_compute_keeps_float32_params_and_deltas():
  model = build_model("mlp", (8, 8, 1), 10, seed=0, hidden=(16,))
  args = _full_model_args(model, 3)
  deltas = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    update = make_client_update(model.apply, client_optimizer(0.1),
                                local_steps=3, batch_size=4,
                                compute_dtype=dtype)
    deltas[dtype], _ = jax.jit(update)(*args)
    # The matmuls run in the compute dtype.
    assert ("bf16" in str(jax.make_jaxpr(update)(*args))) == (
        dtype == jnp.bfloat16)
  for full, half in zip(jax.tree.leaves(deltas[jnp.float32]),
                        jax.tree.leaves(deltas[jnp.bfloat16])):
    assert half.dtype == jnp.float32
    scale = float(jnp.abs(full).max())
    # bfloat16 keeps 8 mantissa bits: close to, but not, the float32 update.
    assert 0 < float(jnp.abs(full - half).max()) < 0.03 * scale


def test_unrolled_local_steps_give_the_rolled_update():
  model = build_model("cnn", (8, 8, 1), 10, seed=0, cnn_channels=(4,),
                      cnn_dense=8)
  args = _full_model_args(model, 2)
  deltas = []
  for unroll in (False, True):
    update = make_client_update(model.apply, client_optimizer(0.1, 0.9),
                                local_steps=3, batch_size=4, unroll=unroll)
    deltas.append(jax.jit(update)(*args)[0])
  for rolled, unrolled in zip(*map(jax.tree.leaves, deltas)):
    np.testing.assert_allclose(unrolled, rolled, rtol=1e-5, atol=1e-7)


def test_dropout_step_matches_numpy_and_rate_zero_is_bit_identical():
  # One hidden layer of 6 units with dropout 0.5 after its ReLU; one SGD
  # step's gradient by hand through the step's keep mask (site 0 of
  # rng = fold_in(fold_in(key, 2), step)).
  rate, lr, key = 0.5, 0.2, jax.random.key(4)
  model = build_model("mlp", (5,), 3, seed=0, hidden=(6,), dropout=rate)
  rng = np.random.default_rng(5)
  x = rng.normal(size=(8, 5)).astype(np.float32)
  y = rng.integers(0, 3, 8).astype(np.int32)
  ones = jax.tree.map(jnp.ones_like, model.init_params)
  args = (model.init_params, ones, ones, x, y, jnp.int32(8), jnp.int32(1), key)
  update = make_client_update(model.apply, client_optimizer(lr),
                              local_steps=1, batch_size=4, dropout=True)
  delta, _ = jax.jit(update)(*args)

  p = jax.tree.map(lambda a: np.asarray(a, np.float64), model.init_params)
  idx = np.asarray(batch_indices(key, 8, 8, 1, 4))[0]
  xb, onehot = x[idx].astype(np.float64), np.eye(3)[y[idx]]
  step_rng = jax.random.fold_in(jax.random.fold_in(key, 2), 0)
  keep = np.asarray(dropout_keep(jax.random.fold_in(step_rng, 0), (4, 6),
                                 rate)) / (1 - rate)
  z = xb @ p["dense_0"]["kernel"] + p["dense_0"]["bias"]
  h = np.maximum(z, 0) * keep
  g = (_softmax(h @ p["head"]["kernel"] + p["head"]["bias"]) - onehot) / 4
  dz = (g @ p["head"]["kernel"].T) * keep * (z > 0)
  expected = {"dense_0": {"kernel": xb.T @ dz, "bias": dz.sum(0)},
              "head": {"kernel": h.T @ g, "bias": g.sum(0)}}
  for got, want in zip(jax.tree.leaves(delta), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(got), -lr * want, rtol=1e-4,
                               atol=1e-7)

  # Rate 0: the key reaches the model but changes nothing, bit for bit.
  plain = build_model("mlp", (5,), 3, seed=0, hidden=(6,))
  off = build_model("mlp", (5,), 3, seed=0, hidden=(6,), dropout=0.0)
  deltas = [jax.jit(make_client_update(
      m.apply, client_optimizer(lr, 0.9), local_steps=3, batch_size=4,
      dropout=flag))(*args)[0] for m, flag in ((plain, False), (off, True))]
  for a, b in zip(*map(jax.tree.leaves, deltas)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("model_name,fjord", [("cnn", False), ("mlp", True)])
def test_activation_masks_give_the_param_mask_update(model_name, fjord):
  # Random units (Federated Dropout) with HeteroFL's scaler and masked
  # cross-entropy, momentum, weight decay and FedProx: masking activations
  # must give the update of masking params. FjORD adds per-step widths and
  # self-distillation.
  model = build_model(model_name, (8, 8, 1), 10, seed=0, hidden=(16, 8),
                      cnn_channels=(4, 6), cnn_dense=8)
  params, fraction = model.init_params, jnp.float32(0.5)

  @jax.jit
  def masks():  # one program, not one per eager op
    units = capacity.random_units(fraction, jax.random.key(3),
                                  model.groups)
    train = capacity.masks_from_units(units, model.layers, params)
    return units, train, capacity.scale_hidden(train, model.layers, fraction)

  units, train, present = masks()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(10, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, 10, 10).astype(np.int32)
  label_mask = np.isin(np.arange(10), y[:9])
  args = (params, present, train, x, y, jnp.int32(9), jnp.int32(3),
          jax.random.key(1), label_mask)
  update = make_client_update(
      model.apply, client_optimizer(0.05, 0.9, 0.1), local_steps=3,
      batch_size=4, mu=0.1, self_distill=fjord)
  by_params = by_units = None
  if fjord:  # a width in {1/4, 1/2} per step, within the client's 1/2
    def width(key):
      return step_width(key, jnp.asarray([0.25, 0.5, 1.0]), fraction)

    def by_params(key):
      masks = capacity.width_masks(width(key), model.layers, params)
      return masks, masks

    def by_units(key):
      return (capacity.first_k_units(width(key), model.groups),
              by_params(key)[1])
  expected, expected_stats = jax.jit(update, static_argnums=9)(*args,
                                                                by_params)
  scaled = {g: u / fraction for g, u in units.items()}
  got, stats = jax.jit(functools.partial(update, step_masks=by_units,
                                         units=scaled))(*args)
  np.testing.assert_allclose(float(stats.loss), float(expected_stats.loss),
                             rtol=1e-5)
  for g, e, m in zip(jax.tree.leaves(got), jax.tree.leaves(expected),
                     jax.tree.leaves(train)):
    assert np.all(np.asarray(g)[np.asarray(m) == 0] == 0)
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4,
                               atol=1e-6)
