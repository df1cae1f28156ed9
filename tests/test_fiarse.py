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


# One dense layer, 2 features -> 2 classes, for the local-training tests.
_DENSE = types.SimpleNamespace(layers=(axes.dense("d", None, None),))


def _dense_apply(params, x):
  return x @ params["d"]["kernel"] + params["d"]["bias"]


def _softmax_error(logits, y):
  """d(mean cross-entropy)/d(logits), in numpy."""
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  return (p - np.eye(p.shape[1])[y]) / len(y)


def test_gradient_is_the_authors_masked_layers():
  """The authors' forward: `effective = w * Bern(|w|, t)`, Bern's forward
  `|w| >= t` (fiarse/model/model_utils.py, lines 24-38 and 52-63). Bern
  returns a bool tensor, which autograd never differentiates (checked with
  PyTorch: the mask has `requires_grad=False` and `Bern.backward` is not
  called), so d loss/d w = (d loss/d effective) * mask: the plain gradient
  on the entries with |w| >= t *now*, none elsewhere; not the factor
  1 + 2t|w|/(|w| + t)^2 that Bern.backward would add."""
  start = {"d": {"kernel": np.array([[-0.5, -0.3], [0.4, 1.0]]),
                 "bias": np.array([-0.1, 0.7])}}
  # Mid-round: the weight at t = .5 has fallen to .45, one at .3 risen to .6
  # (as it never would: entries off the round's mask are not updated).
  local = {"d": {"kernel": np.array([[-0.45, -0.6], [0.4, 1.1]]),
                 "bias": np.array([-0.1, 0.65])}}
  x = np.array([[-0.7, 0.4], [0.9, 0.1], [-0.7, -0.9], [-0.5, 0.2]])
  y = np.array([1, 1, 1, 0])
  seen = policies.get("fiarse").reparam(_DENSE, jnp.float32(0.5),
                                        _params(start))

  def loss(params):
    logits = _dense_apply(seen(params), jnp.asarray(x, jnp.float32))
    return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(4), y])

  grads = jax.grad(loss)(_params(local))
  # By hand: k = floor(.5 * 6) = 3 and t = .5 from the start; now held are
  # |w| >= .5: kernel [[0, 1], [0, 1]] and bias [0, 1].
  t = 0.5
  w, b = local["d"]["kernel"], local["d"]["bias"]
  mw, mb = (np.abs(w) >= t) * 1.0, (np.abs(b) >= t) * 1.0
  np.testing.assert_array_equal(mw, [[0, 1], [0, 1]])
  error = _softmax_error(x @ (w * mw) + b * mb, y)
  np.testing.assert_allclose(grads["d"]["kernel"], (x.T @ error) * mw,
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(grads["d"]["bias"], error.sum(0) * mb,
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(seen(_params(local))["d"]["kernel"], w * mw,
                             rtol=1e-6)
  # Bern.backward's factor, had it run, would differ on every held entry.
  bern = (x.T @ error) * mw * (1 + 2 * t * np.abs(w) / (np.abs(w) + t)**2)
  assert not np.allclose(grads["d"]["kernel"], bern, rtol=1e-3)


def _numpy_local_sgd(params, x, y, lr, steps, t, per_step):
  """The authors' local training in numpy: plain SGD on the mean
  cross-entropy, the forward on `w * (|w| >= t)` of the current `w` at each
  step (`per_step`), or of the round's start (this engine's old rule)."""
  w, b = params["d"]["kernel"].copy(), params["d"]["bias"].copy()
  masks = []
  for _ in range(steps):
    source_w, source_b = (w, b) if per_step else (params["d"]["kernel"],
                                                  params["d"]["bias"])
    mw, mb = (np.abs(source_w) >= t) * 1.0, (np.abs(source_b) >= t) * 1.0
    masks.append(mw)
    error = _softmax_error(x @ (w * mw) + b * mb, y)
    w = w - lr * (x.T @ error) * mw
    b = b - lr * error.sum(0) * mb
  return {"d": {"kernel": w, "bias": b}}, masks


def test_a_held_weight_that_falls_below_t_leaves_the_forward():
  from fedjax_tl.client import make_client_update
  import optax
  start = {"d": {"kernel": np.array([[-0.5, -0.3], [0.4, 1.0]]),
                 "bias": np.array([-0.1, 0.7])}}
  x = np.array([[-0.7, 0.4], [0.9, 0.1], [-0.7, -0.9], [-0.5, 0.2]])
  y = np.array([1, 1, 1, 0])
  policy = policies.get("fiarse")
  params = _params(start)
  present, train = policy.masks(_DENSE, jnp.float32(0.5), params,
                                jnp.int32(0), jax.random.key(0))
  # Every step's batch is the 4 examples (in some order: the mean is the
  # same), so the client runs the numpy loop's full-batch SGD.
  update = make_client_update(_dense_apply, optax.sgd(1.0), local_steps=3,
                              batch_size=4)
  args = (params, present, train, jnp.asarray(x, jnp.float32),
          jnp.asarray(y, jnp.int32), jnp.int32(4), jnp.int32(3),
          jax.random.key(0))
  delta, _ = update(*args, reparam=policy.reparam(_DENSE, jnp.float32(0.5),
                                                  params))
  fixed, _ = update(*args)  # the round's mask for every step
  # t = .5 (k = 3); the kernel's -.5 is held at step 0, moves to -.465 and
  # leaves the forward (and its gradient) for steps 1 and 2.
  expected, masks = _numpy_local_sgd(start, x, y, 1.0, 3, 0.5, True)
  np.testing.assert_array_equal(masks[0], [[1, 0], [0, 1]])
  np.testing.assert_array_equal(masks[1], [[0, 0], [0, 1]])
  np.testing.assert_array_equal(masks[2], [[0, 0], [0, 1]])
  np.testing.assert_allclose(expected["d"]["kernel"],
                             [[-0.4651, -0.3], [0.4, 0.6401]], atol=1e-4)
  kept, _ = _numpy_local_sgd(start, x, y, 1.0, 3, 0.5, False)
  for name in ("kernel", "bias"):
    np.testing.assert_allclose(
        np.asarray(params["d"][name] + delta["d"][name]),
        expected["d"][name], rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(
        np.asarray(params["d"][name] + fixed["d"][name]), kept["d"][name],
        rtol=1e-5, atol=1e-6, err_msg=name)
  assert not np.allclose(expected["d"]["kernel"], kept["d"]["kernel"],
                         atol=1e-3)
  # What was not held at the start never moves, so it never joins.
  np.testing.assert_array_equal(
      np.asarray(delta["d"]["kernel"])[np.asarray(train["d"]["kernel"]) == 0],
      0)


def test_the_round_averages_each_entry_over_the_clients_that_changed_it():
  """The authors' server (fiarse/server.py, lines 67-88) divides each
  entry's summed delta by the number of clients whose delta is non-zero
  there: a client's aggregation mask is its train mask where its upload
  is non-zero."""
  from fedjax_tl.engine.clients import run_client
  sim = small_simulation(policy="fiarse")
  assert sim.policy.changed_only
  state = sim.init(sim.model.init_params)
  plan = sim.cohort(sim.arrays, state.round, state.width_cap,
                    state.totals["sim_seconds"])
  i = int(np.argmax(np.asarray(plan.weight) > 0))
  delta, mask, _, _ = jax.jit(lambda *a: run_client(sim, *a))(
      sim.arrays, state.params, state.round, plan.ids[i], plan.fraction[i],
      plan.num_steps[i])
  _, train = sim.masks(plan.fraction[i], state.params, state.round,
                       jax.random.key(0))
  leaves = list(zip(*(jax.tree.leaves(a) for a in (mask, train, delta))))
  for m, t, d in leaves:
    np.testing.assert_array_equal(np.asarray(m),
                                  np.asarray(t) * (np.asarray(d) != 0))
  # Some held entries kept a zero gradient (ReLU units off on its data).
  assert any(np.any(np.asarray(m) < np.asarray(t)) for m, t, _ in leaves)
