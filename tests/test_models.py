"""The built-in models against numpy forwards: dropout, simple_cnn, costs."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl import cost
from fedjax_tl.policies import capacity
from fedjax_tl.models import build_model
from fedjax_tl.models import num_params
from fedjax_tl.models.layers import dropout_keep, fan_in_init


def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _relu(z):
  return np.maximum(z, 0)


def _conv_valid(x, kernel, bias):
  """`[b, h, w, c]` 3x3 valid cross-correlation, by a loop over taps."""
  kh, kw = kernel.shape[:2]
  h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  out = np.zeros((x.shape[0], h, w, kernel.shape[-1])) + bias
  for i in range(kh):
    for j in range(kw):
      out += x[:, i:i + h, j:j + w, :] @ kernel[i, j]
  return out


def _max_pool(x):
  b, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _keep_mask(rng, site, shape, rate):
  return dropout_keep(jax.random.fold_in(rng, site), shape, rate)


def _keep(rng, site, shape, rate):
  """Site `site`'s keep mask, scaled by 1/(1 - rate) (inverted dropout)."""
  return np.asarray(_keep_mask(rng, site, shape, rate)) / (1 - rate)


def test_mlp_dropout_forward_matches_numpy_and_evaluation_is_deterministic():
  rate = 0.4
  model = build_model("mlp", (6,), 3, seed=0, hidden=(7, 5), dropout=rate)
  assert model.dropout == (rate, rate) and model.has_dropout
  p = _np(model.init_params)
  x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
  rng = jax.random.key(11)

  def numpy_forward(train):
    h = x.astype(np.float64)
    for i, name in enumerate(("dense_0", "dense_1")):
      h = _relu(h @ p[name]["kernel"] + p[name]["bias"])
      if train:  # inverted dropout: kept units scaled by 1/(1 - rate)
        h = h * _keep(rng, i, h.shape, rate)
    return h @ p["head"]["kernel"] + p["head"]["bias"]

  apply = jax.jit(model.apply)
  train_logits = np.asarray(apply(model.init_params, x, rng))
  np.testing.assert_allclose(train_logits, numpy_forward(True), rtol=1e-5,
                             atol=1e-6)
  eval_logits = np.asarray(apply(model.init_params, x))
  np.testing.assert_allclose(eval_logits, numpy_forward(False), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(eval_logits,
                                np.asarray(apply(model.init_params, x)))
  assert not np.allclose(train_logits, eval_logits)


def test_dropout_keep_masks_are_per_unit_and_keep_the_right_share():
  key = jax.random.key(2)
  wide = _keep_mask(key, 0, (3, 5, 9), 0.3)
  # A model sliced to its first units (tier fast path) draws the same mask.
  np.testing.assert_array_equal(_keep_mask(key, 0, (3, 5, 4), 0.3),
                                wide[..., :4])
  many = np.asarray(_keep_mask(key, 0, (100, 200), 0.3))
  # 20,000 Bernoulli(0.7) draws: the kept share is within 4 sigma of 0.7.
  assert abs(many.mean() - 0.7) < 4 * math.sqrt(0.7 * 0.3 / many.size)


def test_simple_cnn_shapes_parameter_count_and_costs():
  model = build_model("simple_cnn", (32, 32, 3), 10, seed=0)
  p = model.init_params
  shapes = {name: {k: v.shape for k, v in layer.items()}
            for name, layer in p.items()}
  assert shapes == {
      "conv_0": {"kernel": (3, 3, 3, 32), "bias": (32,)},
      "conv_1": {"kernel": (3, 3, 32, 64), "bias": (64,)},
      "dense_0": {"kernel": (12_544, 128), "bias": (128,)},
      "head": {"kernel": (128, 10), "bias": (10,)}}
  # (kernel + bias) per layer; 32 -> 30 -> 28 -> pool 14: 14*14*64 = 12,544.
  assert num_params(p) == (27 * 32 + 32) + (288 * 64 + 64) + (
      12_544 * 128 + 128) + (128 * 10 + 10) == 1_626_442
  assert model.groups == {"channels_0": 32, "channels_1": 64, "dense": 128}
  assert model.dropout == (0.25, 0.5)
  for name, fan_in, fan_out in (("conv_0", 27, 288), ("conv_1", 288, 576),
                                ("dense_0", 12_544, 128), ("head", 128, 10)):
    # Glorot-uniform: U(-b, b), b = sqrt(6 / (fan_in + fan_out)); zero bias.
    bound = math.sqrt(6 / (fan_in + fan_out))
    kernel = np.asarray(p[name]["kernel"])
    assert np.abs(kernel).max() <= bound
    assert np.abs(kernel).max() > 0.9 * bound
    assert not np.any(np.asarray(p[name]["bias"]))
  out = jax.eval_shape(model.apply, p, jnp.zeros((2, 32, 32, 3)),
                       jax.random.key(0))
  assert out.shape == (2, 10)

  # FLOPs: 2 x kernel entries x output positions (30*30 and 28*28).
  positions = cost.conv_positions((32, 32, 3), model.layers, p)
  assert positions == {"conv_0": 900, "conv_1": 784}
  full = 2 * (864 * 900 + 18_432 * 784 + 12_544 * 128 + 1280)
  assert float(cost.forward_flops(model.layers, p, None, positions)) == full
  # Width 1/2: 16 and 32 channels, 64 dense units, 10 logits.
  half = capacity.width_masks(jnp.float32(0.5), model.layers, p)
  assert float(cost.forward_flops(model.layers, p, half, positions)) == 2 * (
      27 * 16 * 900 + 9 * 16 * 32 * 784 + 196 * 32 * 64 + 64 * 10)
  # Activations kept for the backward pass: 32*900 + 64*784 + 128 + 10.
  memory = cost.training_memory_bytes(model.layers, p, batch_size=1,
                                      positions=positions, optimizer_slots=0)
  assert float(memory) == 4 * (2 * 1_626_442 + 32 * 900 + 64 * 784 + 138)


def test_simple_cnn_forward_matches_numpy_with_dropout():
  # 10x10x3: 8x8x32, 6x6x64, pool 3x3x64, flatten 576, dense 128, 10.
  model = build_model("simple_cnn", (10, 10, 3), 10, seed=1)
  p = _np(model.init_params)
  x = np.random.default_rng(2).normal(size=(2, 10, 10, 3)).astype(np.float32)
  rng = jax.random.key(5)
  h = _relu(_conv_valid(x.astype(np.float64), p["conv_0"]["kernel"],
                        p["conv_0"]["bias"]))
  h = _relu(_conv_valid(h, p["conv_1"]["kernel"], p["conv_1"]["bias"]))
  h = _max_pool(h) * _keep(rng, 0, (2, 3, 3, 64), 0.25)
  h = _relu(h.reshape(2, -1) @ p["dense_0"]["kernel"] + p["dense_0"]["bias"])
  h = h * _keep(rng, 1, h.shape, 0.5)
  expected = h @ p["head"]["kernel"] + p["head"]["bias"]
  np.testing.assert_allclose(
      np.asarray(jax.jit(model.apply)(model.init_params, x, rng)), expected,
      rtol=1e-4, atol=1e-5)


def test_conv_implementations_agree_with_numpy_on_values_and_gradients():
  # The engine's cnn (3x3 SAME convs, pools on odd sizes) and simple_cnn
  # (VALID), through lax.conv and through im2col: numpy forward by hand,
  # and the same gradients from both implementations.
  x = np.random.default_rng(3).normal(size=(3, 9, 7, 2)).astype(np.float32)
  for name in ("cnn", "simple_cnn"):
    models = {impl: build_model(name, x.shape[1:], 5, seed=4,
                                cnn_channels=(4, 6), cnn_dense=8,
                                conv_impl=impl)
              for impl in ("xla", "im2col")}
    p = _np(models["xla"].init_params)
    if name == "cnn":
      h = x.astype(np.float64)
      for layer in ("conv_0", "conv_1"):
        padded = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
        h = _max_pool(_relu(_conv_valid(padded, p[layer]["kernel"],
                                        p[layer]["bias"])))
    else:
      h = _relu(_conv_valid(x.astype(np.float64), p["conv_0"]["kernel"],
                            p["conv_0"]["bias"]))
      h = _max_pool(_relu(_conv_valid(h, p["conv_1"]["kernel"],
                                      p["conv_1"]["bias"])))
    h = _relu(h.reshape(3, -1) @ p["dense_0"]["kernel"] + p["dense_0"]["bias"])
    expected = h @ p["head"]["kernel"] + p["head"]["bias"]
    grads = {}
    for impl, model in models.items():
      np.testing.assert_allclose(
          np.asarray(model.apply(model.init_params, x)), expected, rtol=1e-4,
          atol=1e-5)
      grads[impl] = jax.grad(lambda q, m=model: jnp.sum(
          m.apply(q, x) ** 2))(model.init_params)
    for a, b in zip(jax.tree.leaves(grads["xla"]),
                    jax.tree.leaves(grads["im2col"])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                 atol=1e-5)


def test_fan_in_init_draws_the_kernel_the_initializer_draws():
  # The matrix draw is a compile-time shortcut: the kernel must be the one
  # the initializer draws at the conv's own shape, depthwise included.
  key = jax.random.key(3)
  for init in (jax.nn.initializers.lecun_normal(),
               jax.nn.initializers.kaiming_normal(),
               jax.nn.initializers.he_uniform()):
    for shape in ((3, 3, 2, 4), (3, 3, 1, 6), (5, 7)):  # conv, depthwise, dense
      np.testing.assert_array_equal(fan_in_init(init)(key, shape),
                                    init(key, shape))
