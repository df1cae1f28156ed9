"""A user's own NNX model, its width groups named in param metadata only:
nested modules, no `axes()`, no `units`; under width, depth and adapter
policies, on the tier fast path, from the config and from the Python API."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_rounds_agree, small_simulation, tiny_config_dict
from fedjax_tl import api
from fedjax_tl.errors import ConfigError
from fedjax_tl.models import axes, build_model, from_module
from fedjax_tl.policies import capacity
from fedjax_tl.simulation import reference_round


def named(*names):
  return {"width_axes": names}


class Block(nnx.Module):
  def __init__(self, width, rngs):
    self.up = nnx.Linear(width, 2 * width, rngs=rngs,
                         kernel_metadata=named("stream", "mlp"),
                         bias_metadata=named("mlp"))
    # A residual branch starts small (the test's lr 0.2 diverges otherwise).
    self.down = nnx.Linear(2 * width, width, rngs=rngs,
                           kernel_init=nnx.initializers.normal(0.05),
                           kernel_metadata=named("mlp", "stream"),
                           bias_metadata=named("stream"))

  def __call__(self, x):
    return x + self.down(jax.nn.relu(self.up(x)))


class UserResMLP(nnx.Module):
  """What a user writes: plain flax, axes named where params are made."""

  def __init__(self, input_shape, num_classes, *, rngs, width=8):
    features = int(np.prod(input_shape))
    self.embed = nnx.Linear(features, width, rngs=rngs,
                            kernel_metadata=named(None, "stream"),
                            bias_metadata=named("stream"))
    self.blocks = nnx.List([Block(width, rngs) for _ in range(2)])
    self.head = nnx.Linear(width, num_classes, rngs=rngs,
                           kernel_metadata=named("stream", None))

  def __call__(self, x):
    x = self.embed(x.reshape(x.shape[0], -1))
    for block in self.blocks:
      x = block(x)
    return self.head(x)


def _model(**kwargs):
  return from_module(UserResMLP((8, 8, 1), 10, rngs=nnx.Rngs(params=0),
                                **kwargs))


def test_nested_params_are_flat_layers_with_named_axes():
  model = _model()
  # Bottom-up, as the module assigned them (depth policies count so).
  assert [layer.name for layer in model.layers] == [
      "embed", "blocks/0/up", "blocks/0/down", "blocks/1/up",
      "blocks/1/down", "head"]
  assert model.groups == {"stream": 8, "mlp": 16}
  assert not model.masks_activations
  # The flat params drive the nested module: a forward by hand.
  p = jax.tree.map(np.asarray, model.init_params)
  x = np.random.default_rng(0).normal(size=(3, 8, 8, 1)).astype(np.float32)
  h = x.reshape(3, -1) @ p["embed"]["kernel"] + p["embed"]["bias"]
  for i in range(2):
    up = np.maximum(h @ p[f"blocks/{i}/up"]["kernel"] +
                    p[f"blocks/{i}/up"]["bias"], 0)
    h = h + up @ p[f"blocks/{i}/down"]["kernel"] + p[f"blocks/{i}/down"]["bias"]
  np.testing.assert_allclose(model.apply(model.init_params, x),
                             h @ p["head"]["kernel"] + p["head"]["bias"],
                             rtol=1e-5, atol=1e-5)


def test_masked_user_model_equals_its_sub_model():
  full, small = _model(), from_module(UserResMLP(
      (8, 8, 1), 10, rngs=nnx.Rngs(params=1), width=4))
  sub = axes.first_k(full.init_params, full.layers, {"stream": 4, "mlp": 8})
  masks = capacity.width_masks(jnp.float32(0.5), full.layers,
                               full.init_params)
  x = np.random.default_rng(1).normal(size=(3, 8, 8, 1)).astype(np.float32)
  np.testing.assert_allclose(
      full.apply(jax.tree.map(jnp.multiply, full.init_params, masks), x),
      small.apply(sub, x), rtol=1e-5, atol=1e-5)


# Without normalisation HeteroFL's scaler (1/p) compounds along this
# model's residual stream and the test's lr 0.2 diverges; the scaler is
# covered on the MLP and on the normalised ResNet.
@pytest.mark.parametrize("policy", [dict(policy="heterofl"),
                                    dict(policy="importance")])
def test_user_model_round_equals_tier_fast_path_and_loop(policy):
  assert_rounds_agree(small_simulation(model_def=_model(), batch_size=4,
                                       **policy))


@pytest.mark.parametrize("policy", ["partial_finetune", "fedrolex",
                                    "hetlora"])
def test_user_model_runs_under_depth_rolling_and_adapter_policies(policy):
  from fedjax_tl import policies
  model = policies.get(policy).adapt_model(_model(), 0)
  sim = small_simulation(model_def=model, batch_size=4, policy=policy)
  state = sim.init(sim.model.init_params)
  expected = reference_round(sim, state)
  state, stats = sim.round(state)
  assert int(stats.participants) > 0
  for a, b in zip(jax.tree.leaves(state.params),
                  jax.tree.leaves(expected.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=2e-6)


def test_a_flax_norm_over_a_width_group_is_refused():
  class Normed(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(4, 6, rngs=rngs,
                              kernel_metadata=named(None, "h"))
      self.norm = nnx.LayerNorm(6, rngs=rngs, scale_metadata=named("h"))

    def __call__(self, x):
      return self.norm(self.dense(x))

  with pytest.raises(ValueError, match="norm: a flax LayerNorm"):
    from_module(Normed(nnx.Rngs(0)))


def test_config_names_a_user_model_and_the_api_takes_one(tmp_path):
  cfg = tiny_config_dict(model="test_user_model:UserResMLP", num_rounds=2)
  by_name = api.run(cfg, tmp_path / "by_name", quiet=True)
  assert by_name.summary["model"] == "test_user_model:UserResMLP"
  assert by_name.summary["num_params"] == sum(
      np.size(a) for a in jax.tree.leaves(build_model(
          "test_user_model:UserResMLP", (8, 8, 1), 10, seed=0).init_params))
  with pytest.raises(ConfigError, match="has no 'Missing'"):
    api.run(tiny_config_dict(model="test_user_model:Missing"),
            tmp_path / "bad", quiet=True)
  # The Python API takes the module itself (an instance, here).
  instance = UserResMLP((8, 8, 1), 10, rngs=nnx.Rngs(params=0))
  by_object = api.run(tiny_config_dict(num_rounds=2), tmp_path / "by_object",
                      quiet=True, model=instance)
  assert by_object.summary["model"].startswith("python:UserResMLP@")
  assert by_object.summary["num_params"] == by_name.summary["num_params"]


class UserNormed(nnx.Module):
  """A user model with a norm over a width group, named in metadata."""
  masks_activations = True

  def __init__(self, input_shape, num_classes, *, rngs):
    from fedjax_tl.models.norms import Norm
    self.fc = nnx.Linear(int(np.prod(input_shape)), 8, rngs=rngs,
                         kernel_metadata=named(None, "h"),
                         bias_metadata=named("h"))
    self.norm = Norm(8, axes=(), group="h")
    self.head = nnx.Linear(8, num_classes, rngs=rngs,
                           kernel_metadata=named("h", None))

  def __call__(self, x, rng=None, units=None):
    from fedjax_tl.models.layers import scale_units, unit_scale
    h = scale_units(self.fc(x.reshape(x.shape[0], -1)), units, "h")
    h, _ = self.norm(h, unit_scale(units, "h"))
    return self.head(jax.nn.relu(h))


def test_a_users_norm_named_in_metadata_is_a_norm_layer():
  model = from_module(UserNormed((8, 8, 1), 10, rngs=nnx.Rngs(params=0)))
  assert model.normalised
  assert [layer.name for layer in model.layers if layer.norm] == ["norm"]
  assert_rounds_agree(small_simulation(model_def=model, batch_size=4,
                                       policy="heterofl"), rounds=1)


def test_two_model_objects_get_two_names():
  from fedjax_tl import models
  a = UserResMLP((8, 8, 1), 10, rngs=nnx.Rngs(params=0))
  b = UserResMLP((8, 8, 1), 10, rngs=nnx.Rngs(params=1))
  assert models.register(a) != models.register(b)
  assert models.register(UserResMLP) == "test_user_model:UserResMLP"
