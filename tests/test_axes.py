"""Named axes: what they express (a residual stream, a norm on a group,
attention heads, a flatten), checked against numpy and against a model of
the smaller size built directly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_rounds_agree, small_simulation
from fedjax_tl.models import axes, from_module
from fedjax_tl.models.layers import scale_units
from fedjax_tl.policies import capacity
from fedjax_tl.policies.transfer import reorder_by_importance, unit_importance

HEAD_DIM = 2


class ResidualHeads(nnx.Module):
  """A residual stream of width `embed` that two blocks write into: a value
  projection into `heads` heads of HEAD_DIM, ReLU, an output projection back
  into the stream, then a LayerNorm and a classifier. With `units` it
  masks its activations (each head's HEAD_DIM features together)."""

  def __init__(self, features, embed, heads, classes, *, seed,
               masks_activations=True, norm=True):
    self.masks_activations, self.has_norm = masks_activations, norm
    rngs = nnx.Rngs(params=seed)
    small = nnx.initializers.normal(0.1)  # a residual branch starts small
    self.embed = nnx.Linear(features, embed, rngs=rngs)
    for i in range(2):
      setattr(self, f"v_{i}", nnx.Linear(embed, heads * HEAD_DIM, rngs=rngs))
      setattr(self, f"o_{i}", nnx.Linear(heads * HEAD_DIM, embed, rngs=rngs,
                                         kernel_init=small))
    if norm:
      self.norm = nnx.LayerNorm(embed, rngs=rngs)
    self.head = nnx.Linear(embed, classes, rngs=rngs)

  def __call__(self, x, rng=None, units=None):
    if not self.masks_activations:
      units = None
    x = scale_units(self.embed(x.reshape(x.shape[0], -1)), units, "embed")
    for i in range(2):
      h = scale_units(getattr(self, f"v_{i}")(x), units, "heads", HEAD_DIM)
      x = x + scale_units(getattr(self, f"o_{i}")(jax.nn.relu(h)), units,
                          "embed")
    # The norm is declared (its params are masked and sliced) but not run:
    # a LayerNorm over a masked stream needs statistics over the held units.
    return self.head(x)

  def axes(self):
    heads = axes.Axis("heads", per_unit=HEAD_DIM)
    blocks = [layer for i in range(2)
              for layer in (axes.dense(f"v_{i}", "embed", heads),
                            axes.dense(f"o_{i}", heads, "embed"))]
    norm = (axes.norm("norm", "embed"),) if self.has_norm else ()
    return (axes.dense("embed", None, "embed"), *blocks, *norm,
            axes.dense("head", "embed", None))


def _model(embed=6, heads=4, seed=0, features=5, classes=3, **kwargs):
  return from_module(ResidualHeads(features, embed, heads, classes,
                                   seed=seed, **kwargs))


def test_groups_are_read_off_the_shapes():
  model = _model()
  assert model.groups == {"embed": 6, "heads": 4}


def test_masks_by_hand():
  model = _model()
  embed = np.array([1, 1, 1, 0, 0, 0], np.float32)
  heads = np.array([1, 0, 1, 0], np.float32)
  masks = capacity.masks_from_units(
      {"embed": jnp.asarray(embed), "heads": jnp.asarray(heads)},
      model.layers, model.init_params)
  per_entry = np.repeat(heads, HEAD_DIM)  # each head owns HEAD_DIM columns
  expected = {
      "embed": (np.outer(np.ones(5), embed), embed),
      "v_0": (np.outer(embed, per_entry), per_entry),
      "o_1": (np.outer(per_entry, embed), embed),
      "head": (np.outer(embed, np.ones(3)), np.ones(3)),
  }
  for name, (kernel, bias) in expected.items():
    np.testing.assert_array_equal(masks[name]["kernel"], kernel)
    np.testing.assert_array_equal(masks[name]["bias"], bias)
  # The norm's scale and bias run over the stream's units.
  np.testing.assert_array_equal(masks["norm"]["scale"], embed)
  np.testing.assert_array_equal(masks["norm"]["bias"], embed)


@pytest.mark.parametrize("width", [1.0, 0.5, 0.25])
def test_first_k_sub_model_equals_the_masked_model(width):
  full = _model()
  kept = {"embed": int(np.ceil(6 * width)), "heads": int(np.ceil(4 * width))}
  small = _model(kept["embed"], kept["heads"], seed=1)
  params = full.init_params
  sub = axes.first_k(params, full.layers, kept)
  assert jax.tree.map(jnp.shape, sub) == jax.tree.map(jnp.shape,
                                                      small.init_params)
  masks = capacity.width_masks(jnp.float32(width), full.layers, params)
  x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
  masked = full.apply(jax.tree.map(jnp.multiply, params, masks), x)
  np.testing.assert_allclose(small.apply(sub, x), masked, rtol=1e-5,
                             atol=1e-6)
  # Padding the sub-model back gives the masked params.
  back = axes.pad_first_k(sub, params, full.layers)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(
      jax.tree.map(jnp.multiply, params, masks))):
    np.testing.assert_array_equal(a, b)


def test_importance_moves_whole_heads_and_keeps_the_function():
  model = _model()
  params = model.init_params
  # Heads' incoming (v kernel and bias) and outgoing (o) norms, by hand.
  incoming = sum(
      np.sum(np.asarray(params[f"v_{i}"]["kernel"]).reshape(6, 4, HEAD_DIM)**2,
             (0, 2)) +
      np.sum(np.asarray(params[f"v_{i}"]["bias"]).reshape(4, HEAD_DIM)**2, 1)
      for i in range(2))
  outgoing = sum(
      np.sum(np.asarray(params[f"o_{i}"]["kernel"]).reshape(4, -1)**2, 1)
      for i in range(2))
  np.testing.assert_allclose(unit_importance(params, model.layers, "heads"),
                             np.sqrt(incoming) * np.sqrt(outgoing), rtol=1e-5)
  reordered = reorder_by_importance(params, model.layers)
  x = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)
  np.testing.assert_allclose(model.apply(reordered, x), model.apply(params, x),
                             rtol=1e-5, atol=1e-5)
  # Each head's columns moved together: the new head j is some old head.
  old = np.asarray(params["v_0"]["kernel"]).reshape(6, 4, HEAD_DIM)
  new = np.asarray(reordered["v_0"]["kernel"]).reshape(6, 4, HEAD_DIM)
  embed_order = np.argsort(-np.asarray(
      unit_importance(params, model.layers, "embed")))
  old = old[embed_order]  # rows follow the stream's own reordering
  for j in range(4):
    assert any(np.array_equal(new[:, j], old[:, h]) for h in range(4))


def test_the_scaler_skips_normalisation_layers():
  model = _model()
  ones = jax.tree.map(jnp.ones_like, model.init_params)
  scaled = axes.scale_outputs(ones, model.layers, 2.0)
  assert float(scaled["embed"]["kernel"][0, 0]) == 2.0
  assert float(scaled["o_0"]["bias"][0]) == 2.0
  assert float(scaled["norm"]["scale"][0]) == 1.0
  assert float(scaled["head"]["kernel"][0, 0]) == 1.0  # logits: not cut


def test_flatten_axis_repeats_the_channel_group():
  layers = (axes.dense("dense", axes.Axis("c", repeat=3), "d"),)
  params = {"dense": {"kernel": jnp.zeros((12, 5)), "bias": jnp.zeros(5)}}
  assert axes.group_sizes(layers, params) == {"c": 4, "d": 5}
  masks = axes.masks({"c": jnp.asarray([1.0, 0, 1, 0]),
                      "d": jnp.ones(5)}, layers, params)
  rows = np.asarray(masks["dense"]["kernel"])[:, 0]
  np.testing.assert_array_equal(rows, [1, 0, 1, 0] * 3)


@pytest.mark.parametrize("layers, message", [
    ((axes.dense("a", None, "g"), axes.dense("b", "g", None)), "group 'g'"),
    ((axes.dense("missing", None, "g"),), "'missing' is declared"),
    ((axes.layer("a", kernel=(None, None, "g")),), "3 declared axes"),
    ((axes.dense("a", None, axes.Axis("g", per_unit=4)),), "multiple of 4"),
])
def test_inconsistent_axes_name_the_layer(layers, message):
  params = {"a": {"kernel": jnp.zeros((3, 6)), "bias": jnp.zeros(6)},
            "b": {"kernel": jnp.zeros((5, 2)), "bias": jnp.zeros(2)}}
  with pytest.raises(ValueError, match=message):
    axes.group_sizes(layers, params)


@pytest.mark.parametrize("masks_activations", [True, False])
@pytest.mark.parametrize("policy", [dict(policy="heterofl"),
                                    dict(policy="importance")])
def test_a_users_model_runs_rounds_like_the_reference(policy,
                                                      masks_activations):
  """The masked round (activation or param masks), the tier fast path and
  the per-client loop agree on the residual model with heads."""
  # A model that masks its params cannot have norms over width groups.
  model = _model(8, 4, features=64, classes=10,
                 masks_activations=masks_activations,
                 norm=masks_activations)
  sim = small_simulation(model_def=model, batch_size=4, **policy)
  assert (sim.unit_scales(jnp.float32(0.5), jnp.int32(0), jax.random.key(0))
          is None) != masks_activations
  assert_rounds_agree(sim)


def test_norms_without_units_are_refused():
  with pytest.raises(ValueError, match="must apply `units`"):
    _model(masks_activations=False)
