"""Width policies: masks against hand-written references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import types

from fedjax_tl import policies
from fedjax_tl.policies import capacity
from fedjax_tl.policies.fjord import step_width
from fedjax_tl.client import cross_entropy, held_labels


def test_fedrolex_window_rolls_one_unit_per_round():
  # C = 5, p = 0.4 -> 2 units: round r holds (-r, 1-r) mod 5, as the
  # authors' torch.roll(arange(C), r)[:k] (FedRolex resnet_server.py:109).
  for r, expected in [(0, [1, 1, 0, 0, 0]), (1, [1, 0, 0, 0, 1]),
                      (4, [0, 1, 1, 0, 0]), (7, [0, 0, 0, 1, 1])]:
    units = capacity.rolling_units(jnp.float32(0.4), jnp.int32(r),
                                   {"g": 5})["g"]
    np.testing.assert_array_equal(units, expected)


@pytest.mark.parametrize("size,width", [(5, 0.4), (8, 0.5), (7, 0.3),
                                        (16, 0.125), (6, 1.0), (9, 0.9)])
def test_fedrolex_window_is_the_authors_roll(size, width):
  """Units held = np.roll(np.arange(C), r)[:k], k = ceil(p C), for rounds
  that wrap around the channels (r >= C - k) and beyond C."""
  k = int(np.ceil(width * size - 1e-4))
  groups = {"g": size, "h": 2 * size}
  for r in (0, 1, 2, size - k, size - 1, size, size + 3, 3 * size + 1):
    units = capacity.rolling_units(jnp.float32(width), jnp.int32(r), groups)
    for name, c in groups.items():
      kc = int(np.ceil(width * c - 1e-4))
      expected = np.zeros(c)
      expected[np.roll(np.arange(c), r)[:kc]] = 1
      np.testing.assert_array_equal(units[name], expected,
                                    err_msg=f"C={c} k={kc} r={r}")
    assert int(units["g"].sum()) == k
  # The fedrolex policy's masks use the same window.
  model = types.SimpleNamespace(groups={"g": size})
  units = policies.get("fedrolex").units(model, jnp.float32(width),
                                         jnp.int32(size + 2),
                                         jax.random.key(0))
  expected = np.zeros(size)
  expected[np.roll(np.arange(size), size + 2)[:k]] = 1
  np.testing.assert_array_equal(units["g"], expected)


def test_fed_dropout_draws_a_uniform_subset_of_the_right_size():
  counts = np.zeros(8)
  for i in range(400):
    units = capacity.random_units(jnp.float32(0.25), jax.random.key(i),
                                  {"a": 8, "b": 3})["a"]
    assert float(units.sum()) == 2.0
    counts += np.asarray(units)
  # Each unit is held with probability 2/8: 100 of 400 draws (binomial sd 8.7).
  assert np.all(np.abs(counts - 100) < 40)


def test_heterofl_takes_the_first_units():
  model = types.SimpleNamespace(groups={"a": 4, "b": 6})
  units = policies.get("heterofl").units(model, jnp.float32(0.5), jnp.int32(3),
                                         jax.random.key(0))
  np.testing.assert_array_equal(units["a"], [1, 1, 0, 0])
  np.testing.assert_array_equal(units["b"], [1, 1, 1, 0, 0, 0])


def test_client_fractions_per_policy():
  fractions = jnp.asarray([1.0, 0.5, 0.25])
  proportions = jnp.asarray([0.2, 0.3, 0.5])
  tiers = jnp.asarray([0, 1, 2, 2])
  keys = jax.random.split(jax.random.key(0), 4)
  fix = policies.get("heterofl").widths(fractions, proportions, tiers, keys)
  np.testing.assert_array_equal(fix, [1.0, 0.5, 0.25, 0.25])
  np.testing.assert_array_equal(
      policies.get("uniform_smallest").widths(fractions, proportions, tiers,
                                              keys), [0.25] * 4)
  np.testing.assert_array_equal(
      policies.get("full").widths(fractions, proportions, tiers, keys),
      [1.0] * 4)
  # Dynamic levels follow the mix, whatever the device's tier.
  many = jax.random.split(jax.random.key(1), 4000)
  drawn = np.asarray(policies.get("heterofl", heterofl_mode="dynamic").widths(
      fractions, proportions, jnp.zeros(4000, jnp.int32), many))
  shares = [np.mean(drawn == f) for f in (1.0, 0.5, 0.25)]
  np.testing.assert_allclose(shares, [0.2, 0.3, 0.5], atol=0.03)
  eligible = policies.get("uniform_full_only").eligible(fractions, tiers)
  np.testing.assert_array_equal(eligible, [True, False, False, False])


def test_masked_cross_entropy_is_a_softmax_over_held_labels():
  y = jnp.asarray([2, 0, 2, 7, 7])
  mask = held_labels(y, jnp.int32(3), 8)
  np.testing.assert_array_equal(mask, [1, 0, 1, 0, 0, 0, 0, 0])
  logits = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
  labels = np.asarray([2, 0, 2])
  kept = logits[:, [0, 2]]
  by_hand = -np.mean(kept[np.arange(3), [1, 0, 1]] - np.log(
      np.exp(kept).sum(-1)))
  np.testing.assert_allclose(
      float(cross_entropy(jnp.asarray(logits), jnp.asarray(labels), mask)),
      by_hand, rtol=1e-5)


def test_scaler_divides_hidden_activations_by_the_width():
  from test_simulation import _simulation
  sim = _simulation(4, scaler=True)
  params = sim.model.init_params
  present, train = sim.masks(jnp.float32(0.5), params, jnp.int32(0),
                             jax.random.key(0))
  x = np.random.default_rng(0).normal(size=(3, 8, 8, 1)).astype(np.float32)
  out = sim.model.apply(jax.tree.map(jnp.multiply, params, present), x)
  # By hand: HeteroFL's scaler divides each hidden layer's output by p.
  p = {k: {n: np.asarray(a, np.float64) for n, a in v.items()}
       for k, v in jax.tree.map(jnp.multiply, params, train).items()}
  h = x.reshape(3, -1)
  h = np.maximum(h @ p["dense_0"]["kernel"] + p["dense_0"]["bias"], 0) / 0.5
  h = np.maximum(h @ p["dense_1"]["kernel"] + p["dense_1"]["bias"], 0) / 0.5
  by_hand = h @ p["head"]["kernel"] + p["head"]["bias"]
  np.testing.assert_allclose(out, by_hand, rtol=1e-4, atol=1e-5)
  assert set(np.unique(np.asarray(train["dense_0"]["kernel"]))) == {0.0, 1.0}


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_importance_reordering_preserves_the_function(model_name):
  from fedjax_tl.models import build_model
  from fedjax_tl.policies.transfer import reorder_by_importance, unit_importance
  model = build_model(model_name, (8, 8, 1), 10, seed=3, hidden=(12, 6),
                      cnn_channels=(4, 6), cnn_dense=5)
  params = model.init_params
  reordered = reorder_by_importance(params, model.layers)
  x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype(np.float32)
  apply = jax.jit(model.apply)
  np.testing.assert_allclose(apply(reordered, x), apply(params, x), rtol=1e-5,
                             atol=1e-5)
  for group in model.groups:
    before = np.asarray(unit_importance(params, model.layers, group))
    after = np.asarray(unit_importance(reordered, model.layers, group))
    np.testing.assert_allclose(after, np.sort(before)[::-1], rtol=1e-5)


def test_unit_importance_by_hand():
  from fedjax_tl.models import axes
  from fedjax_tl.policies.transfer import unit_importance
  layers = (axes.dense("a", None, "h"), axes.dense("b", "h", None))
  params = {"a": {"kernel": jnp.asarray([[3.0, 0.0], [0.0, 1.0]]),
                  "bias": jnp.asarray([4.0, 0.0])},
            "b": {"kernel": jnp.asarray([[1.0, 0.0], [2.0, 2.0]]),
                  "bias": jnp.zeros(2)}}
  # unit 0: |(3, 0, 4)| * |(1, 0)| = 5; unit 1: |(0, 1, 0)| * |(2, 2)| = 2.83
  np.testing.assert_allclose(unit_importance(params, layers, "h"),
                             [5.0, np.sqrt(8)], rtol=1e-6)


def test_partial_finetune_trains_the_top_layers_only():
  np.testing.assert_array_equal(
      capacity.trained_layers(jnp.float32(1.0), 3), [1, 1, 1])
  np.testing.assert_array_equal(
      capacity.trained_layers(jnp.float32(0.5), 3), [0, 1, 1])
  np.testing.assert_array_equal(
      capacity.trained_layers(jnp.float32(0.125), 3), [0, 0, 1])
  from test_simulation import _simulation
  sim = _simulation(4, policy="partial_finetune")
  params = sim.model.init_params
  present, train = sim.masks(jnp.float32(0.5), params, jnp.int32(0),
                             jax.random.key(0))
  assert all(np.all(np.asarray(m) == 1) for m in jax.tree.leaves(present))
  # Layers dense_0, dense_1, head: width 0.5 of 3 layers trains the top 2.
  expected = {"dense_0": 0.0, "dense_1": 1.0, "head": 1.0}
  for name, value in expected.items():
    for leaf in jax.tree.leaves(train[name]):
      assert np.all(np.asarray(leaf) == value), name


def test_fjord_draws_widths_uniformly_up_to_the_capacity():
  fractions = jnp.asarray([1.0, 0.5, 0.25, 0.125])
  keys = jax.random.split(jax.random.key(0), 3000)
  drawn = np.asarray(jax.vmap(lambda k: step_width(
      k, fractions, jnp.float32(0.5)))(keys))
  assert set(np.unique(drawn).tolist()) == {0.5, 0.25, 0.125}
  for width in (0.5, 0.25, 0.125):
    assert abs(np.mean(drawn == width) - 1 / 3) < 0.04


def test_fjord_step_masks_train_the_drawn_sub_model_each_step():
  from fedjax_tl.client import client_optimizer, make_client_update
  from fedjax_tl.models import build_model
  model = build_model("mlp", (8, 8, 1), 10, seed=0, hidden=(16,))
  params = model.init_params
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(12, 8, 8, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, 12), jnp.int32)

  def masks_at(width):
    return capacity.width_masks(jnp.float32(width), model.layers, params)

  one_step = make_client_update(model.apply, client_optimizer(0.5),
                                local_steps=1, batch_size=4)
  fractions = jnp.asarray([1.0, 0.5, 0.25])
  step_masks = lambda k: (masks_at(step_width(k, fractions, 0.5)),) * 2
  cap = masks_at(0.5)
  widths = set()
  for seed in range(6):
    key = jax.random.key(seed)
    width = float(step_width(
        jax.random.fold_in(jax.random.fold_in(key, 1), 0), fractions, 0.5))
    widths.add(width)
    delta, _ = one_step(params, cap, cap, x, y, jnp.int32(12), jnp.int32(1),
                        key, None, step_masks)
    # Reference: the same step with fixed masks of the drawn width.
    fixed, _ = one_step(params, masks_at(width), masks_at(width), x, y,
                        jnp.int32(12), jnp.int32(1), key)
    for a, b in zip(jax.tree.leaves(delta), jax.tree.leaves(fixed)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7)
  assert widths == {0.5, 0.25}  # both draws occurred, so masks really vary


def _last_units(width, round_index, key, groups):
  del round_index, key
  return {name: (jnp.arange(size) >= size - capacity.kept_units(width, size))
          .astype(jnp.float32) for name, size in groups.items()}


@pytest.mark.parametrize("name", ["heterofl", "importance", "distill"])
def test_heterofls_family_redraws_levels_in_dynamic_mode(name):
  """HeteroFL's dynamic mode (every client's level redrawn each round from
  the mix) holds for the policies that are HeteroFL's recipe after a server
  start (importance, distill) as for heterofl itself."""
  fractions = jnp.asarray([1.0, 0.5, 0.25])
  proportions = jnp.asarray([0.2, 0.3, 0.5])
  tiers = jnp.asarray([0, 1, 2, 2])
  keys = jax.random.split(jax.random.key(0), 4)
  np.testing.assert_array_equal(
      policies.get(name).widths(fractions, proportions, tiers, keys),
      [1.0, 0.5, 0.25, 0.25])
  many = jax.random.split(jax.random.key(1), 4000)
  dynamic = policies.get(name, heterofl_mode="dynamic")
  drawn = np.asarray(dynamic.widths(fractions, proportions,
                                    jnp.zeros(4000, jnp.int32), many))
  shares = [np.mean(drawn == f) for f in (1.0, 0.5, 0.25)]
  np.testing.assert_allclose(shares, [0.2, 0.3, 0.5], atol=0.03)
  assert dynamic.family == "heterofl"


def _last_k(options):
  return policies.base.width_policy("last_k", _last_units,
                                    scaler=options.scaler)


def test_a_registered_policy_runs_like_the_reference(monkeypatch):
  """docs/extending.md's worked example: a recipe plus a registry line."""
  from conftest import tiny_config
  from test_simulation import _assert_trees_close, _simulation
  from fedjax_tl.simulation import reference_round
  monkeypatch.setitem(policies.REGISTRY, "last_k", _last_k)
  assert tiny_config(policy="last_k").policy == "last_k"  # the config knows it
  sim = _simulation(4, policy="last_k")
  params = sim.model.init_params
  _, train = sim.masks(jnp.float32(0.5), params, jnp.int32(0),
                       jax.random.key(0))
  # hidden=(16, 8): width 0.5 holds units 8..15 of group 0 and 4..7 of
  # group 1, so dense_1's kernel holds rows 8..15 of columns 4..7.
  np.testing.assert_array_equal(np.asarray(train["dense_0"]["bias"]),
                                [0] * 8 + [1] * 8)
  np.testing.assert_array_equal(np.asarray(train["dense_1"]["kernel"])[:, 7],
                                [0] * 8 + [1] * 8)
  np.testing.assert_array_equal(np.asarray(train["dense_1"]["kernel"])[15],
                                [0] * 4 + [1] * 4)
  state = sim.init(params)
  expected = reference_round(sim, state)
  state, _ = sim.round(state)
  _assert_trees_close(state.params, expected.params)
