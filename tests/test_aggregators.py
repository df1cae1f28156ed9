"""Masked weighted aggregation against plain numpy."""

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl import aggregators


def test_streamed_masked_mean_matches_numpy():
  rng = np.random.default_rng(0)
  clients, shape = 9, (4, 3)
  deltas = rng.normal(size=(clients, *shape)).astype(np.float32)
  masks = (rng.uniform(size=(clients, *shape)) < 0.5).astype(np.float32)
  masks[:, 0, 0] = 0  # a parameter no client holds
  weights = rng.uniform(1, 5, clients).astype(np.float32)
  weights[[2, 7]] = 0  # padded slots
  deltas[2] = 1e6  # a padded slot's content must not leak

  num, den = aggregators.zeros_like_sums({"w": jnp.zeros(shape)})
  for chunk in np.array_split(np.arange(clients), 3):  # streamed in chunks
    num, den = aggregators.add_weighted(
        num, den, {"w": jnp.asarray(deltas[chunk])},
        {"w": jnp.asarray(masks[chunk])}, jnp.asarray(weights[chunk]))
  mean, held = aggregators.masked_mean(num, den)

  expected = np.zeros(shape)
  expected_held = np.zeros(shape, bool)
  for idx in np.ndindex(*shape):
    w = np.array([weights[i] * masks[(i, *idx)] for i in range(clients)],
                 np.float64)
    if w.sum() > 0:
      expected[idx] = sum(w[i] * deltas[(i, *idx)] for i in range(clients)
                          if w[i] > 0) / w.sum()
      expected_held[idx] = True
  np.testing.assert_allclose(np.asarray(mean["w"]), expected, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(np.asarray(held["w"]), expected_held)
  assert not expected_held[0, 0] and float(mean["w"][0, 0]) == 0.0


def test_masked_mean_is_finite_when_nothing_is_held():
  num = {"w": jnp.zeros(3)}
  mean, held = aggregators.masked_mean(num, {"w": jnp.zeros(3)})
  assert not np.any(np.asarray(held["w"]))
  assert np.all(np.isfinite(np.asarray(mean["w"])))
  grad = jax.grad(lambda n: aggregators.masked_mean(n, {"w": jnp.zeros(3)})[0][
      "w"].sum())(num)
  assert np.all(np.isfinite(np.asarray(grad["w"])))
