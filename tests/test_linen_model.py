"""A user's own flax Linen model, through `nnx.bridge`: its width groups
named with `with_width_axes`, its params and forward Linen's own, under a
width policy on the tier fast path, by name and from the Python API."""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import assert_rounds_agree, small_simulation, tiny_config_dict
from fedjax_tl import api
from fedjax_tl.models import (Options, as_model, axes, build_model,
                              with_width_axes)
from fedjax_tl.policies import capacity

LECUN, ZEROS = nn.initializers.lecun_normal(), nn.initializers.zeros


def dense(features, inputs, outputs, name=None, **kwargs):
  return nn.Dense(features, name=name,
                  kernel_init=with_width_axes(LECUN, (inputs, outputs)),
                  bias_init=with_width_axes(ZEROS, (outputs,)), **kwargs)


class LinenMLP(nn.Module):
  """What a Linen user writes; its layers' names do not sort bottom-up."""
  num_classes: int = 10
  hidden: Sequence[int] = (16, 8)

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(dense(self.hidden[0], None, "h0", name="embed")(x))
    x = nn.relu(dense(self.hidden[1], "h0", "h1")(x))  # Dense_0
    return nn.Dense(self.num_classes, name="head", kernel_init=with_width_axes(
        LECUN, ("h1", None)))(x)


class LinenCNN(nn.Module):
  channels: int = 4

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.channels, (3, 3), kernel_init=with_width_axes(
        LECUN, (None, None, None, "c"), positions=64),
                bias_init=with_width_axes(ZEROS, ("c",)))(x)
    x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
    return nn.Dense(10, kernel_init=with_width_axes(
        LECUN, (axes.Axis("c", repeat=16), None)))(x.reshape(x.shape[0], -1))


def _model(module=None, seed=0):
  return as_model(LinenMLP() if module is None else module, (8, 8, 1), 10,
                  seed, Options())


def _x(seed=0):
  return np.random.default_rng(seed).normal(size=(3, 8, 8, 1)).astype(
      np.float32)


def test_params_and_forward_are_linens_own():
  model, x = _model(), _x()
  # Bottom-up, in the order Linen creates them (not sorted by name).
  assert [layer.name for layer in model.layers] == ["embed", "Dense_0",
                                                    "head"]
  assert model.groups == {"h0": 16, "h1": 8}
  assert not model.masks_activations and not model.has_dropout
  # The same params as the module's own init, under the same seed.
  own = nn.unbox(LinenMLP().init(jax.random.key(0), x[:1]))
  assert jax.tree.structure(model.init_params) == jax.tree.structure(
      own["params"])
  for a, b in zip(jax.tree.leaves(model.init_params),
                  jax.tree.leaves(own["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Any params drive the module as Linen's own apply does, also under jit.
  params = jax.tree.map(lambda a: a + 0.1, model.init_params)
  expected = LinenMLP().apply({"params": params}, x)
  np.testing.assert_allclose(model.apply(params, x), expected, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(model.apply)(params, x), expected,
                             rtol=1e-5, atol=1e-6)


def test_width_masks_follow_the_names():
  model = _model()
  masks = capacity.width_masks(jnp.float32(0.5), model.layers,
                               model.init_params)
  h0, h1 = np.arange(16) < 8, np.arange(8) < 4  # the first half of each
  expected = {
      "embed": {"kernel": np.broadcast_to(h0, (64, 16)), "bias": h0},
      "Dense_0": {"kernel": h0[:, None] & h1[None], "bias": h1},
      "head": {"kernel": np.broadcast_to(h1[:, None], (8, 10)),
               "bias": np.ones(10, bool)}}
  for name, params in expected.items():
    for param, mask in params.items():
      np.testing.assert_array_equal(np.asarray(masks[name][param]),
                                    mask.astype(np.float32), f"{name}/{param}")


def test_masked_linen_cnn_equals_its_sub_model():
  full, small = _model(LinenCNN()), _model(LinenCNN(channels=2), seed=1)
  assert [(layer.name, layer.positions) for layer in full.layers] == [
      ("Conv_0", 64), ("Dense_0", None)]
  sub = axes.first_k(full.init_params, full.layers, {"c": 2})
  masks = capacity.width_masks(jnp.float32(0.5), full.layers,
                               full.init_params)
  x = _x(1)
  np.testing.assert_allclose(
      full.apply(jax.tree.map(jnp.multiply, full.init_params, masks), x),
      small.apply(sub, x), rtol=1e-5, atol=1e-5)
  # The full module runs at the sub-model's shape (the tier fast path).
  np.testing.assert_allclose(full.apply(sub, x), small.apply(sub, x),
                             rtol=1e-6)


def test_linen_model_round_equals_tier_fast_path_and_loop():
  assert_rounds_agree(small_simulation(model_def=_model(), batch_size=4,
                                       policy="heterofl"))


def test_config_names_a_linen_model_and_the_api_takes_one(tmp_path):
  # A Linen class by name: built as `cls(num_classes=...)`.
  by_name = build_model("test_linen_model:LinenMLP", (8, 8, 1), 10, seed=0)
  assert by_name.groups == {"h0": 16, "h1": 8}
  # The Python API takes an instance (and a builder returning one).
  result = api.run(tiny_config_dict(num_rounds=2), tmp_path, quiet=True,
                   model=LinenMLP(hidden=(8, 4)))
  assert result.summary["model"].startswith("python:LinenMLP@")
  assert result.summary["num_params"] == 64 * 8 + 8 + 8 * 4 + 4 + 4 * 10 + 10
  built = as_model(lambda shape, classes, seed, options: LinenMLP(
      num_classes=classes), (8, 8, 1), 10, 0, Options())
  assert built.groups == by_name.groups


class Dropped(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dropout(0.5, deterministic=False)(x.reshape(x.shape[0], -1))
    return nn.Dense(10)(x)


class BatchNormed(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.BatchNorm(use_running_average=False)(x.reshape(x.shape[0], -1))
    return nn.Dense(10)(x)


class LayerNormed(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = dense(6, None, "h")(x.reshape(x.shape[0], -1))
    x = nn.LayerNorm(scale_init=with_width_axes(nn.initializers.ones,
                                                ("h",)))(x)
    return nn.Dense(10, kernel_init=with_width_axes(LECUN, ("h", None)))(x)


class Unsized(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(nn.Dense(self.hidden)(x.reshape(x.shape[0], -1)))


@pytest.mark.parametrize("module, match", [
    (Dropped(), "must be deterministic"),
    (BatchNormed(), r"params only, not \['batch_stats'\]"),
    (LayerNormed(), "LayerNorm_0: a Linen LayerNorm over a width group"),
    (LinenMLP(num_classes=7), r"give outputs \[1, 7\], not the \[1, 10\]"),
    (Unsized, "missing 1 required positional argument: 'hidden'; give an "
              "instance"),
])
def test_what_a_linen_model_cannot_be_is_refused(module, match):
  with pytest.raises(ValueError, match=match):
    _model(module)
