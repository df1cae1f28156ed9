"""ScaleFL: width and depth masks, the exits' weighted loss with distillation
from the deepest held exit, and the deepest-exit prediction, against numpy
written from the authors' code (github.com/git-disl/scale-fl)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_simulation
from fedjax_tl import config as config_lib
from fedjax_tl import policies
from fedjax_tl.client import exit_loss
from fedjax_tl.data.federated import Dataset
from fedjax_tl.engine.clients import run_client
from fedjax_tl.errors import ConfigError
from fedjax_tl.evaluation import deployed_forward, make_evaluator
from fedjax_tl.experiment import relations
from fedjax_tl.models import build_model, exits
from fedjax_tl.sweep import sweep_settings
from test_depthfl import assert_rounds_match_reference, two_stage_resnet
from test_simulation import _assert_trees_close

HIDDEN = (16, 8, 8)
LAYERS = ("dense_0", "exit_0", "dense_1", "exit_1", "dense_2", "head")
BLOCK = {"dense_0": 0, "exit_0": 0, "dense_1": 1, "exit_1": 1, "dense_2": 2,
         "head": 2}


def _mlp_exits():
  policy = policies.get("scalefl")
  return policy, policy.adapt_model(build_model(
      "mlp", (8, 8, 1), 10, seed=0, hidden=HIDDEN), 1)


def _np_masks(kept, depth):
  """The masks by hand: `kept` units of each hidden layer (16, 8, 8) of
  the first `depth` blocks of 64-16-8-8-10 with exits after dense_0, 1."""
  k = kept
  rows = {"dense_0": 64, "exit_0": k[0], "dense_1": k[0], "exit_1": k[1],
          "dense_2": k[1], "head": k[2]}
  cols = {"dense_0": k[0], "dense_1": k[1], "dense_2": k[2], "exit_0": 10,
          "exit_1": 10, "head": 10}
  full_in = {"dense_0": 64, "exit_0": 16, "dense_1": 16, "exit_1": 8,
             "dense_2": 8, "head": 8}
  full_out = {"dense_0": 16, "dense_1": 8, "dense_2": 8, "exit_0": 10,
              "exit_1": 10, "head": 10}
  masks = {}
  for name in LAYERS:
    kernel = np.zeros((full_in[name], full_out[name]), np.float32)
    bias = np.zeros(full_out[name], np.float32)
    if BLOCK[name] < depth:
      kernel[:rows[name], :cols[name]] = 1
      bias[:cols[name]] = 1
    masks[name] = {"kernel": kernel, "bias": bias}
  return masks


# (p, level width, units kept of 16/8/8, depth): level ceil(4p) of the
# authors' widths 0.7, 0.7, 0.75, 1; depth ceil(3p) of the 3 blocks.
CASES = [(1.0, 1.0, (16, 8, 8), 3), (0.75, 0.75, (12, 6, 6), 3),
         (0.5, 0.7, (12, 6, 6), 2), (0.25, 0.7, (12, 6, 6), 1),
         (0.125, 0.7, (12, 6, 6), 1)]


@pytest.mark.parametrize("p,w,kept,depth", CASES)
def test_a_device_holds_the_first_k_units_of_its_first_blocks(p, w, kept,
                                                              depth):
  policy, model = _mlp_exits()
  assert model.exits == ("exit_0", "exit_1", "head")
  expected = _np_masks(kept, depth)
  present, train = policy.masks(model, jnp.float32(p), model.init_params,
                                jnp.int32(0), jax.random.key(0))
  deployed = policy.deployed(model, jnp.float32(p), model.init_params)
  for mask in (present, train, deployed):
    _assert_trees_close(mask, expected, atol=0)
  units = policy.units(model, jnp.float32(p), jnp.int32(0),
                       jax.random.key(0))
  assert sorted(units) == sorted(model.groups)
  for (group, size), k in zip(model.groups.items(), kept):
    np.testing.assert_array_equal(units[group], np.arange(size) < k)
  np.testing.assert_array_equal(exits.held_exits(model, train),
                                [b < depth for b in range(3)])
  # With the scaler, a held layer's outputs are divided by the level width.
  policy_s = policies.get("scalefl", scaler=True)
  present_s, train_s = policy_s.masks(model, jnp.float32(p),
                                      model.init_params, jnp.int32(0),
                                      jax.random.key(0))
  _assert_trees_close(train_s, expected, atol=0)
  np.testing.assert_allclose(present_s["dense_0"]["kernel"],
                             expected["dense_0"]["kernel"] / w, rtol=1e-6)
  np.testing.assert_allclose(present_s["head"]["kernel"],
                             expected["head"]["kernel"], rtol=1e-6)


def test_other_level_widths():
  policy = policies.get("scalefl", scalefl_widths=(0.25, 0.5))
  _, model = _mlp_exits()
  # p = 0.5: level ceil(2 * 0.5) = 1, width 0.25: 4 of 16, 2 of 8.
  _, train = policy.masks(model, jnp.float32(0.5), model.init_params,
                          jnp.int32(0), jax.random.key(0))
  _assert_trees_close(train, _np_masks((4, 2, 2), 2), atol=0)


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _authors_loss(outputs, target, gamma, T, active):
  """train.py's loss on the outputs of a level's exits (KDLoss: KLDivLoss
  with its default 'mean' reduction, over the batch and the classes)."""
  n = len(outputs)
  loss = 0.0
  for j, out in enumerate(outputs):
    ce = -np.mean(_np_log_softmax(out)[np.arange(len(target)), target])
    if j == n - 1 or not (gamma and active):
      loss += ce * (j + 1)
      continue
    log_q = _np_log_softmax(out / T)
    log_p = _np_log_softmax(outputs[-1] / T)
    kld = np.mean(np.exp(log_p) * (log_p - log_q))
    loss += (ce + kld * gamma * T * T) * (j + 1)
  return loss / (n * (n + 1) / 2)


@pytest.mark.parametrize("p,depth", [(1.0, 3), (0.5, 2), (0.25, 1)])
@pytest.mark.parametrize("round_index,active", [(2, False), (3, True)])
def test_exit_loss_is_the_authors_weighted_distillation(p, depth,
                                                        round_index, active):
  # The authors' rule of 8 rounds: on once the round index is > 8 * 0.25.
  policy = policies.get("scalefl", scalefl_kd_gamma=0.8,
                        scalefl_kd_temperature=3.0, scalefl_kd_start=3)
  _, model = _mlp_exits()
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 6, 10)).astype(np.float32) * 2
  labels = rng.integers(0, 10, 6)
  _, train = policy.masks(model, jnp.float32(p), model.init_params,
                          jnp.int32(0), jax.random.key(0))
  terms = policy.exit_terms(model, train, jnp.int32(round_index))
  got = exit_loss(jnp.asarray(logits), jnp.asarray(labels), terms)
  expected = _authors_loss(list(logits[:depth]), labels, 0.8, 3.0, active)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def _validated(policy="scalefl", **overrides):
  c = config_lib.default_config()
  c.policy = policy
  c.update(overrides)
  return config_lib.validate(c)


@pytest.mark.parametrize("num_rounds,start", [(40, 11), (41, 11), (4, 2),
                                              (3, 1)])
def test_the_start_left_unset_is_the_authors_rule(num_rounds, start):
  # train.py's `gamma_active = round > num_rounds * 0.25`: its first round.
  assert start == min(r for r in range(num_rounds) if r > num_rounds * 0.25)
  assert _validated(num_rounds=num_rounds).scalefl_kd_start == start
  assert _validated(num_rounds=num_rounds,
                    scalefl_kd_start=7).scalefl_kd_start == 7
  for other in ("heterofl", "depthfl", "full"):
    assert _validated(other, num_rounds=num_rounds).scalefl_kd_start is None
  # A compare's (and sweep's) scalefl variant resolves it, the others not.
  c = config_lib.default_config()
  c.num_rounds = num_rounds
  assert config_lib.validate(relations.policy_variant(
      c, "scalefl")).scalefl_kd_start == start
  c.policy, c.scalefl_kd_start = "scalefl", 7
  assert config_lib.validate(relations.policy_variant(
      c, "depthfl")).scalefl_kd_start is None
  c.policy, c.scalefl_kd_start = "heterofl", None
  c.sweep_policy = ("heterofl", "scalefl")
  assert [s.scalefl_kd_start for _, s in sweep_settings(c)] == [None, start]


def test_a_start_is_checked_and_read_by_scalefl_only():
  with pytest.raises(ConfigError, match=r"^config\.scalefl_kd_start=-1: "
                     "must be >= 0$"):
    _validated(scalefl_kd_start=-1)
  with pytest.raises(ConfigError, match=r"^config\.scalefl_kd_start=3: is "
                     "read by policy=scalefl only"):
    _validated("depthfl", scalefl_kd_start=3)


def test_distillation_is_on_from_its_start():
  policy = policies.get("scalefl", scalefl_kd_gamma=0.8, scalefl_kd_start=5)
  _, model = _mlp_exits()
  _, train = policy.masks(model, jnp.float32(1.0), model.init_params,
                          jnp.int32(0), jax.random.key(0))
  # The round index is traced inside the compiled round.
  weight = jax.jit(lambda r: policy.exit_terms(model, train, r).kd_weight)
  got = [float(weight(jnp.int32(r))) for r in (0, 4, 5, 9)]
  assert got == [0.0, 0.0, pytest.approx(0.08), pytest.approx(0.08)]


def _np_forward(params, x, kept, depth):
  """The width-k sub-model sliced out in numpy, to its exit `depth`."""
  h = x.reshape(len(x), -1)
  ins = 64
  heads = ("exit_0", "exit_1", "head")
  for i in range(depth):
    dense = params[f"dense_{i}"]
    h = np.maximum(h @ dense["kernel"][:ins, :kept[i]] +
                   dense["bias"][:kept[i]], 0)
    ins = kept[i]
  head = params[heads[depth - 1]]
  return h @ head["kernel"][:kept[depth - 1]] + head["bias"]


def test_a_tier_predicts_with_its_deepest_held_exit():
  policy, model = _mlp_exits()
  params = jax.tree.map(
      lambda a: a + 0.1 * np.random.default_rng(3).normal(size=a.shape
                                                          ).astype(a.dtype),
      model.init_params)
  np_params = jax.tree.map(np.asarray, params)
  rng = np.random.default_rng(2)
  x = rng.normal(size=(40, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, 10, 40)
  evaluate = make_evaluator(model, Dataset(x, y), batch_size=16,
                            masks_fn=lambda w, p: policy.deployed(model, w, p))
  tiers = [case for case in CASES if case[0] in (1.0, 0.5, 0.25)]
  acc, _ = evaluate(params, [case[0] for case in tiers])
  for a, (p, _, kept, depth) in zip(acc, tiers):
    expected = _np_forward(np_params, x, kept, depth)
    mask = policy.deployed(model, jnp.float32(p), params)
    sub = jax.tree.map(jnp.multiply, params, mask)
    got = deployed_forward(model, sub, mask, None)(jnp.asarray(x))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert a == pytest.approx(np.mean(expected.argmax(-1) == y))
  # The full model's own forward is its deepest exit too.
  np.testing.assert_allclose(model.apply(params, jnp.asarray(x)),
                             _np_forward(np_params, x, (16, 8, 8), 3),
                             rtol=1e-4, atol=1e-5)


def test_a_small_client_moves_only_its_sub_model_on_either_mask_path():
  _, model = _mlp_exits()
  deltas = []
  for activation_masks in (True, False):
    sim = small_simulation(4, model_def=model, policy="scalefl",
                           activation_masks=activation_masks,
                           scalefl_kd_start=1, scalefl_kd_gamma=5.0)
    assert (sim.unit_scales(jnp.float32(0.5), jnp.int32(0),
                            jax.random.key(0)) is None) != activation_masks
    delta, train, _, _ = jax.jit(lambda a, p: run_client(
        sim, a, p, jnp.int32(1), jnp.int32(0), jnp.float32(0.5),
        jnp.int32(3)))(sim.arrays, model.init_params)
    _assert_trees_close(train, _np_masks((12, 6, 6), 2), atol=0)
    for name in LAYERS:
      for param, value in delta[name].items():
        assert np.all(np.asarray(value)[train[name][param] == 0] == 0)
    assert np.any(np.asarray(delta["exit_1"]["kernel"]) != 0)
    deltas.append(delta)
  _assert_trees_close(deltas[0], deltas[1], atol=1e-6)


@pytest.mark.parametrize("model_name,activation_masks", [
    ("mlp", True), ("mlp", False), ("resnet", True)])
def test_scalefl_round_equals_the_per_client_loop(model_name,
                                                  activation_masks):
  model = (_mlp_exits()[1] if model_name == "mlp" else
           two_stage_resnet(prediction="deepest"))
  # Distillation on in the second round (index 1).
  assert_rounds_match_reference(
      model, policy="scalefl", scalefl_kd_start=1, scalefl_kd_gamma=5.0,
      activation_masks=activation_masks)
