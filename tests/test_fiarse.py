"""FIARSE: the top-p magnitude masks against a numpy transcription of the
authors' `generate_mask`, re-extracted every round, and its rounds against
the per-client reference loop."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import small_simulation, tiny_config
from fedjax_tl import policies
from fedjax_tl.errors import ConfigError
from fedjax_tl.models import axes, build_model, from_module
from fedjax_tl.models.resnet import PreResNet
from fedjax_tl.simulation import reference_round
from test_simulation import _assert_trees_close

# A hand-made model: two dense layers around a norm layer (never cut). Its 17
# cut magnitudes, largest first: .9 .8 .7 .6 .5 .5 .5 .3 .3 .2 .2 .1 .05 0 0
# 0 0, with ties at .5, .3, .2 and 0.
_MODEL = types.SimpleNamespace(layers=(
    axes.dense("a", None, "h"), axes.norm("n", "h"),
    axes.dense("b", "h", None)))
_PARAMS = {
    "a": {"kernel": np.array([[0.9, -0.1, 0.5], [0.3, -0.7, 0.0]]),
          "bias": np.array([0.0, 0.0, 0.2])},
    "n": {"scale": np.array([0.01, 0.01, 0.01]),
          "bias": np.array([0.0, 0.0, 0.0])},
    "b": {"kernel": np.array([[0.5, -0.5], [0.05, 0.6], [-0.8, 0.2]]),
          "bias": np.array([0.0, 0.3])},
}
_CUT = (("a", "kernel"), ("a", "bias"), ("b", "kernel"), ("b", "bias"))


def _params(tree=_PARAMS):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _reference(params, width, groups):
  """The authors' rule in numpy (fiarse/model/resnet_masked.py,
  `generate_mask`): over each group of cut params, k = int(n * p) and
  t = topk(|w|, k).values[-1]; a param is held iff |w| >= t; the rest
  (norm layers) is always held."""
  masks = {name: {p: np.ones(np.shape(v)) for p, v in layer.items()}
           for name, layer in params.items()}
  for group in groups:
    scores = np.concatenate([np.abs(np.asarray(params[n][p])).ravel()
                             for n, p in group])
    k = max(1, int(len(scores) * width))
    threshold = np.sort(scores)[::-1][k - 1]
    for n, p in group:
      masks[n][p] = (np.abs(np.asarray(params[n][p])) >= threshold) * 1.0
  return masks


def _held(masks, pairs=_CUT):
  return sum(int(np.sum(np.asarray(masks[n][p]))) for n, p in pairs)


def _assert_masks_equal(actual, expected):
  for name, layer in expected.items():
    for param, mask in layer.items():
      np.testing.assert_array_equal(np.asarray(actual[name][param]), mask,
                                    err_msg=f"{name}.{param}")


@pytest.mark.parametrize("width,held", [(1.0, 17), (0.5, 9), (0.25, 4)])
def test_global_mask_is_the_authors_top_p_magnitudes(width, held):
  policy = policies.get("fiarse")
  present, train = policy.masks(_MODEL, jnp.float32(width), _params(),
                                jnp.int32(0), jax.random.key(0))
  expected = _reference(_PARAMS, width, [_CUT])
  _assert_masks_equal(present, expected)
  _assert_masks_equal(train, expected)
  # By hand: width 1 keeps all (t = 0, the zero biases included); width 0.5
  # has k = 8 and t = .3, and the tie at .3 keeps both, so 9 entries; 0.25
  # has k = 4, t = .6.
  assert _held(present) == held
  assert _held(present, [("n", "scale"), ("n", "bias")]) == 6


def test_layer_scope_thresholds_each_layer():
  policy = policies.get("fiarse", fiarse_scope="layer")
  masks, _ = policy.masks(_MODEL, jnp.float32(0.5), _params(), jnp.int32(0),
                          jax.random.key(0))
  _assert_masks_equal(masks, _reference(_PARAMS, 0.5, [_CUT[:2], _CUT[2:]]))
  # Layer a: 9 magnitudes, k = 4, t = .3 (one .3 only): 4 held. Layer b: 8,
  # k = 4, t = .5 (tied twice): 4 held.
  assert _held(masks, _CUT[:2]) == 4 and _held(masks, _CUT[2:]) == 4


def test_masks_are_the_same_under_jit_and_vmap():
  policy = policies.get("fiarse")
  widths = jnp.asarray([1.0, 0.5, 0.25], jnp.float32)
  batched = jax.jit(jax.vmap(lambda w: policy.deployed(_MODEL, w, _params())))(
      widths)
  for i, width in enumerate((1.0, 0.5, 0.25)):
    _assert_masks_equal(jax.tree.map(lambda m, i=i: m[i], batched),
                        _reference(_PARAMS, width, [_CUT]))


def test_mask_follows_the_current_params():
  policy = policies.get("fiarse")
  moved = jax.tree.map(np.copy, _PARAMS)
  moved["a"]["bias"] = np.array([0.95, 0.0, 0.2])  # now the largest
  moved["a"]["kernel"][0, 0] = 0.01               # was the largest
  before = policy.deployed(_MODEL, jnp.float32(0.25), _params())
  after = policy.deployed(_MODEL, jnp.float32(0.25), _params(moved))
  assert np.asarray(before["a"]["kernel"])[0, 0] == 1
  assert np.asarray(after["a"]["kernel"])[0, 0] == 0
  assert np.asarray(after["a"]["bias"])[0] == 1
  _assert_masks_equal(after, _reference(moved, 0.25, [_CUT]))


def _cut_layers(model):
  """`(layer, param)` pairs of each non-norm layer."""
  return [[(spec.name, p) for p, _ in spec.params] for spec in model.layers
          if not spec.norm]


def _cut(model):
  return [pair for layer in _cut_layers(model) for pair in layer]


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_vectorized_round_equals_per_client_loop(scope):
  sim = small_simulation(policy="fiarse", fiarse_scope=scope)
  state = sim.init(sim.model.init_params)
  for _ in range(2):  # the second round's masks come from a trained model
    expected = reference_round(sim, state)
    state, stats = sim.round(state)
    _assert_trees_close(state.params, expected.params)
  assert int(stats.participants) > 0
  # Each round's masks are extracted afresh from the global model.
  first, _ = sim.masks(jnp.float32(0.25), sim.model.init_params, jnp.int32(0),
                       jax.random.key(1))
  later, _ = sim.masks(jnp.float32(0.25), state.params, jnp.int32(2),
                       jax.random.key(1))
  groups = ([_cut(sim.model)] if scope == "global" else
            _cut_layers(sim.model))
  _assert_masks_equal(later, _reference(jax.tree.map(np.asarray, state.params),
                                        0.25, groups))
  assert any(np.any(np.asarray(a) != np.asarray(b))
             for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(later)))


def _small_resnet():
  """A PreResNet with group norms (never cut) and 4-channel stages."""
  return from_module(PreResNet((8, 8, 1), 10, widths=(4, 4, 4, 4),
                               blocks=(1, 1, 1, 1), norm="group", groups=2,
                               rngs=nnx.Rngs(params=0)))


@pytest.mark.parametrize("normalised", [False, True])
def test_a_tier_deploys_the_fraction_p_of_the_cut_params(normalised):
  model = (_small_resnet() if normalised else
           build_model("cnn", (8, 8, 1), 10, seed=0, cnn_channels=(4, 6),
                       cnn_dense=8))
  params = model.init_params
  cut = _cut(model)
  total = sum(np.size(params[n][p]) for n, p in cut)
  norms = [(spec.name, p) for spec in model.layers if spec.norm
           for p, _ in spec.params]
  assert bool(norms) == normalised
  for width in (1.0, 0.5, 0.25):
    mask = policies.get("fiarse").deployed(model, jnp.float32(width), params)
    # Random init: no ties among the non-zero magnitudes, and the zero
    # biases fall below t unless every entry is kept.
    assert _held(mask, cut) == int(width * total)
    assert all(np.all(np.asarray(mask[n][p]) == 1) for n, p in norms)


def test_config_takes_the_scope_and_refuses_others_in_one_line():
  assert tiny_config(policy="fiarse", fiarse_scope="layer").fiarse_scope == (
      "layer")
  with pytest.raises(ConfigError) as info:
    tiny_config(policy="fiarse", fiarse_scope="block")
  message = str(info.value)
  assert message.startswith("config.fiarse_scope='block': ")
  assert "\n" not in message
