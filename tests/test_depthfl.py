"""DepthFL: early exits, depth masks, mutual distillation and the ensemble,
against numpy written from the authors' Flower baseline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_matches_reference, small_simulation
from fedjax_tl import policies
from fedjax_tl.client import ExitTerms, exit_loss
from fedjax_tl.evaluation import make_evaluator
from fedjax_tl.data.federated import Dataset
from fedjax_tl.models import build_model, exits, from_module
from fedjax_tl.models.resnet import ResNet
from fedjax_tl.policies.depthfl import rampup


def _mlp_exits(hidden=(16, 8, 8)):
  return exits.with_exits(build_model("mlp", (8, 8, 1), 10, seed=0,
                                      hidden=hidden), seed=1)


def _np_softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_ce(z, y):
  return -np.mean(np.log(_np_softmax(z))[np.arange(len(y)), y])


def _np_kl(teacher, student):  # mean over the batch of KL(p_t || p_s)
  pt, ps = _np_softmax(teacher), _np_softmax(student)
  return np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), -1))


@pytest.mark.parametrize("held", [(1, 1, 1), (1, 1, 0), (1, 0, 0)])
@pytest.mark.parametrize("mutual", [True, False])
def test_exit_loss_is_the_authors_sum_by_hand(held, mutual):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 6, 5)).astype(np.float32)
  labels = rng.integers(0, 5, 6)
  w = 0.7
  h = [i for i in range(3) if held[i]]
  expected = 0.0
  for i in h:
    expected += _np_ce(logits[i], labels)
    if mutual and len(h) > 1:  # DepthFL: every other held exit teaches
      expected += w * sum(_np_kl(logits[j], logits[i])
                          for j in h if j != i) / (len(h) - 1)
    elif not mutual and i != h[-1]:  # ScaleFL: the deepest held teaches
      expected += w * _np_kl(logits[h[-1]], logits[i])
  terms = ExitTerms(jnp.asarray(held, bool), jnp.float32(w), jnp.float32(1),
                    jnp.bool_(mutual))
  got = exit_loss(jnp.asarray(logits), jnp.asarray(labels), terms)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_exits_follow_their_layers_and_split_the_depth_blocks():
  model = _mlp_exits()
  assert [layer.name for layer in model.layers] == [
      "dense_0", "exit_0", "dense_1", "exit_1", "dense_2", "head"]
  assert model.exits == ("exit_0", "exit_1", "head")
  np.testing.assert_array_equal(exits.depth_blocks(model),
                                [0, 0, 1, 1, 2, 2])
  assert model.init_params["exit_1"]["kernel"].shape == (8, 10)


def test_exit_heads_read_the_hidden_activations_by_hand():
  base = build_model("mlp", (8, 8, 1), 10, seed=0, hidden=(16, 8, 8))
  model = exits.with_exits(base, seed=1)
  p = jax.tree.map(np.asarray, model.init_params)
  x = np.random.default_rng(1).normal(size=(4, 8, 8, 1)).astype(np.float32)
  h = x.reshape(4, -1)
  outs = []
  for i in range(3):
    h = np.maximum(h @ p[f"dense_{i}"]["kernel"] + p[f"dense_{i}"]["bias"], 0)
    if i < 2:
      outs.append(h @ p[f"exit_{i}"]["kernel"] + p[f"exit_{i}"]["bias"])
  outs.append(h @ p["head"]["kernel"] + p["head"]["bias"])
  got = model.apply(model.init_params, jnp.asarray(x), exits=True)
  np.testing.assert_allclose(got, np.stack(outs), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(model.apply(model.init_params, jnp.asarray(x)),
                             np.mean(outs, 0), rtol=1e-4, atol=1e-5)
  # The pretrained params keep their values under the fresh exits.
  started = exits.start(base.init_params, model)
  for name in base.init_params:
    np.testing.assert_array_equal(started[name]["kernel"],
                                  base.init_params[name]["kernel"])


@pytest.mark.parametrize("width,depth", [(1.0, 3), (0.5, 2), (0.34, 2),
                                         (0.25, 1), (0.125, 1)])
def test_a_device_holds_and_trains_its_first_blocks(width, depth):
  model = _mlp_exits()
  policy = policies.get("depthfl")
  present, train = policy.masks(model, jnp.float32(width), model.init_params,
                                jnp.int32(0), jax.random.key(0))
  blocks = {"dense_0": 0, "exit_0": 0, "dense_1": 1, "exit_1": 1,
            "dense_2": 2, "head": 2}
  for name, block in blocks.items():
    for mask in (present, train):
      assert set(np.unique(mask[name]["kernel"])) == {float(block < depth)}
  deployed = policy.deployed(model, jnp.float32(width), model.init_params)
  np.testing.assert_array_equal(
      exits.held_exits(model, deployed), [b < depth for b in range(3)])


def test_consistency_ramp_is_the_authors_closed_form():
  for r, expected in [(0, np.exp(-5)), (150, np.exp(-1.25)), (300, 1.0),
                      (450, 1.0)]:
    np.testing.assert_allclose(float(rampup(jnp.int32(r), 300)), expected,
                               rtol=1e-6)
  assert float(rampup(jnp.int32(0), 0)) == 1.0


def test_a_tier_predicts_with_the_mean_of_its_exits():
  model = _mlp_exits()
  policy = policies.get("depthfl")
  rng = np.random.default_rng(2)
  x = rng.normal(size=(40, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, 10, 40)
  evaluate = make_evaluator(model, Dataset(x, y), batch_size=16,
                            masks_fn=lambda w, p: policy.deployed(model, w, p))
  acc, _ = evaluate(model.init_params, [1.0, 0.5, 0.25])
  outs = np.asarray(model.apply(model.init_params, jnp.asarray(x),
                                exits=True))
  for a, depth in zip(acc, (3, 2, 1)):
    # Depth d: the first d blocks, so the deeper exits' inputs are zero.
    sub = jax.tree.map(jnp.multiply, model.init_params, policy.deployed(
        model, jnp.float32(depth / 3), model.init_params))
    held = np.asarray(model.apply(sub, jnp.asarray(x), exits=True))[:depth]
    np.testing.assert_allclose(held, outs[:depth], rtol=1e-5, atol=1e-6)
    assert a == pytest.approx(np.mean(held.mean(0).argmax(-1) == y))


def two_stage_resnet(prediction="mean"):
  """A two-stage ResNet with an early exit after the first stage."""
  model = exits.with_exits(from_module(ResNet(
      (8, 8, 1), 10, widths=(4, 8), blocks=(1, 1), norm="group", groups=2,
      rngs=nnx.Rngs(params=0))), seed=1, prediction=prediction)
  assert model.exits == ("exit_0", "head")
  return model


def assert_rounds_match_reference(model, **kwargs):
  """Two rounds of `small_simulation(model_def=model, **kwargs)` equal the
  per-client loop's, and they move the deepest exit."""
  sim = small_simulation(4, model_def=model, **kwargs)
  state = assert_matches_reference(sim, model.init_params, atol=5e-6)
  # Every block moved: the full-depth tier trains the deepest one.
  assert not np.allclose(state.params["head"]["kernel"],
                         model.init_params["head"]["kernel"])


@pytest.mark.parametrize("model_name", ["mlp", "resnet"])
def test_depthfl_round_equals_the_per_client_loop(model_name):
  model = _mlp_exits() if model_name == "mlp" else two_stage_resnet()
  assert_rounds_match_reference(model, policy="depthfl", exit_kd_rampup=0)


@pytest.mark.parametrize("policy", ["depthfl", "scalefl"])
def test_masked_cross_entropy_is_refused_for_early_exits(policy):
  from fedjax_tl import config as config_lib
  from fedjax_tl.errors import ConfigError
  c = config_lib.default_config()
  c.policy, c.masked_ce = policy, True
  with pytest.raises(ConfigError, match="masked_ce"):
    config_lib.validate(c)
