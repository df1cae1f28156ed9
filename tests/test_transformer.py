"""The pre-LN Transformer: its forward against numpy, every width against
the Transformer built at that size, rounds against the per-client loop, and
HetLoRA on its projections."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import (assert_matches_reference, assert_rounds_agree,
                      random_federated, small_simulation)
from fedjax_tl import cost, policies
from fedjax_tl.data.federated import FederatedData
from fedjax_tl.models import axes, build_model, from_module, num_params
from fedjax_tl.models.transformer import (PROJECTIONS, Transformer,
                                          _as_tokens)
from fedjax_tl.policies import capacity, lora
from fedjax_tl.simulation import reference_round

RNG = np.random.default_rng(0)
HEAD_DIM = 4
SIZES = dict(embed=8, heads=4, mlp=12, layers=2, head_dim=HEAD_DIM)


def _model(input_shape, classes, seed=0, **sizes):
  sizes = {**SIZES, **sizes}
  return from_module(Transformer(input_shape, classes, **sizes,
                                 rngs=nnx.Rngs(params=seed)))


def _np_layer_norm(h, scale, bias):
  mean = h.mean(-1, keepdims=True)
  var = h.var(-1, keepdims=True)
  return (h - mean) / np.sqrt(var + 1e-5) * scale + bias


def _np_transformer(p, tokens, *, lm, layers=2):
  """The pre-LN Transformer written out in numpy (float64)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  dense = lambda name, h: h @ p[name]["kernel"] + p[name]["bias"]
  ln = lambda name, h: _np_layer_norm(h, p[name]["scale"], p[name]["bias"])
  h = (p["token"]["embedding"][tokens] if lm else dense("token", tokens))
  h = h + p["pos"]["embedding"]
  t = h.shape[1]
  for i in range(layers):
    b = f"blocks/{i}"
    a = ln(f"{b}/ln1", h)
    q, k, v = (dense(f"{b}/{n}", a).reshape(*a.shape[:2], -1, HEAD_DIM)
               for n in "qkv")
    heads = []
    for j in range(q.shape[2]):
      s = q[:, :, j] @ k[:, :, j].transpose(0, 2, 1) / math.sqrt(HEAD_DIM)
      if lm:
        s = np.where(np.tril(np.ones((t, t))) > 0, s, -np.inf)
      w = np.exp(s - s.max(-1, keepdims=True))
      heads.append((w / w.sum(-1, keepdims=True)) @ v[:, :, j])
    h = h + dense(f"{b}/o", np.concatenate(heads, -1))
    m = dense(f"{b}/up", ln(f"{b}/ln2", h))
    m = 0.5 * m * (1 + np.tanh(np.sqrt(2 / np.pi) * (m + 0.044715 * m**3)))
    h = h + dense(f"{b}/down", m)
  h = ln("ln_f", h)
  return dense("head", h if lm else h.mean(1))


@pytest.mark.parametrize("lm", [False, True])
def test_forward_equals_numpy(lm):
  model = _model((6,) if lm else (6, 5), 7)
  # Non-trivial norms: random scales and biases.
  params = jax.tree.map(
      lambda a: a + 0.1 * RNG.normal(size=a.shape).astype(np.float32),
      model.init_params)
  x = (RNG.integers(0, 7, (3, 6)).astype(np.int32) if lm else
       RNG.normal(size=(3, 6, 5)).astype(np.float32))
  np.testing.assert_allclose(model.apply(params, x),
                             _np_transformer(params, x, lm=lm), rtol=1e-4,
                             atol=1e-5)


def test_the_lm_is_causal():
  model = _model((6,), 7)
  x = RNG.integers(0, 7, (2, 6)).astype(np.int32)
  changed = x.copy()
  changed[:, 4] = (x[:, 4] + 1) % 7
  a, b = model.apply(model.init_params, x), model.apply(model.init_params,
                                                        changed)
  np.testing.assert_array_equal(a[:, :4], b[:, :4])  # the past is unmoved
  assert not np.allclose(a[:, 4:], b[:, 4:])


def test_images_as_rows_or_patches():
  x = RNG.normal(size=(2, 4, 6, 2)).astype(np.float32)
  rows = _model((4, 6, 2), 3)
  assert rows.init_params["pos"]["embedding"].shape == (4, 8)
  assert rows.init_params["token"]["kernel"].shape == (12, 8)
  patches = _model((4, 6, 2), 3, patch=2)
  assert patches.init_params["pos"]["embedding"].shape == (6, 8)
  # Patch (1, 2) of example 0 is rows 2-3, columns 4-5: token 1 * 3 + 2.
  tokens = np.asarray(_as_tokens(x, 2))
  np.testing.assert_array_equal(tokens[0, 5], x[0, 2:4, 4:6].reshape(-1))
  with pytest.raises(ValueError, match="patch 4 does not divide"):
    _model((4, 6, 2), 3, patch=4)


def test_parameter_count_and_flops_by_hand():
  e, h, m, t, v = 8, 4, 12, 6, 7
  model = _model((t,), v)
  inner = h * HEAD_DIM
  block = (3 * (e * inner + inner) + inner * e + e + e * m + m + m * e + e +
           4 * e)
  assert num_params(model.init_params) == (v * e + t * e + 2 * block +
                                           2 * e + e * v + v)
  positions = cost.conv_positions((t,), model.layers, model.init_params)
  flops = cost.forward_flops(model.layers, model.init_params, None, positions)
  # Every projection and the LM head run on each of the t tokens.
  per_token = 2 * (2 * (3 * e * inner + inner * e + 2 * e * m) + e * v)
  assert float(flops) == per_token * t


@pytest.mark.parametrize("lm", [False, True])
@pytest.mark.parametrize("width", [1.0, 0.5, 0.25])
def test_masked_transformer_equals_the_sub_model(lm, width):
  shape = (6,) if lm else (6, 5)
  full = _model(shape, 7)
  kept = {g: math.ceil(width * size) for g, size in full.groups.items()}
  small = _model(shape, 7, seed=1, embed=kept["embed"],
                 heads=kept["blocks/0/heads"], mlp=kept["blocks/0/mlp"])
  params = full.init_params
  sub = axes.first_k(params, full.layers, kept)
  assert jax.tree.map(jnp.shape, sub) == jax.tree.map(jnp.shape,
                                                      small.init_params)
  x = (RNG.integers(0, 7, (4, 6)).astype(np.int32) if lm else
       RNG.normal(size=(4, 6, 5)).astype(np.float32))
  y = RNG.integers(0, 7, (4, 6) if lm else (4,))
  units = capacity.first_k_units(jnp.float32(width), full.groups)

  def loss(p, model, units):
    logits = model.apply(p, x, units=units)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits),
                                         y[..., None], -1))

  np.testing.assert_allclose(full.apply(params, x, units=units),
                             small.apply(sub, x), rtol=2e-4, atol=2e-5)
  grads = jax.grad(loss)(params, full, units)
  for a, b in zip(jax.tree.leaves(axes.first_k(grads, full.layers, kept)),
                  jax.tree.leaves(jax.grad(loss)(sub, small, None))):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5)
  masks = capacity.masks_from_units(units, full.layers, params)
  for g, m in zip(jax.tree.leaves(grads), jax.tree.leaves(masks)):
    assert not np.any(np.asarray(g)[np.asarray(m) == 0])


def _tokens(num_clients=40, max_examples=12, t=6, vocab=7, seed=0):
  """Random padded token sequences, the labels the next tokens."""
  data = random_federated(num_clients, max_examples, (t + 1,), vocab, seed)
  seq = np.abs(data.x * 10).astype(np.int32) % vocab
  return FederatedData(seq[..., :-1], seq[..., 1:], data.count)


# One block in the round tests: compiling three round paths dominates.
@pytest.mark.parametrize("policy", ["heterofl", "fedrolex"])
def test_classifier_round_equals_the_tier_fast_path_and_loop(policy):
  model = _model((8, 8, 1), 10, embed=8, heads=4, mlp=8, layers=1)
  sim = small_simulation(model_def=model, batch_size=4, policy=policy)
  if policy == "heterofl":
    assert_rounds_agree(sim, atol=2e-5)
  else:  # a rolling window has no tier fast path
    state = sim.init(model.init_params)
    expected = reference_round(sim, state)
    state, _ = sim.round(state)
    for a, b in zip(jax.tree.leaves(state.params),
                    jax.tree.leaves(expected.params)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5)


def test_language_model_round_equals_the_tier_fast_path_and_loop():
  # A LayerNorm over the 2 units a 1/4 client holds of 8 is ill-conditioned
  # enough to amplify float rounding past the tolerance: 16 units.
  model = _model((6,), 7, embed=16, layers=1)
  sim = small_simulation(model_def=model, batch_size=4, policy="heterofl",
                         data=_tokens())
  assert_rounds_agree(sim, atol=2e-5)


@pytest.mark.parametrize("lm", [False, True])
def test_hetlora_adapts_the_projections_and_freezes_the_backbone(lm):
  model = _model((6,) if lm else (8, 8, 1), 7 if lm else 10, layers=1)
  adapted = policies.get("hetlora", lora_rank=4).adapt_model(model, 0)
  targets = {f"blocks/0/{p}" for p in PROJECTIONS}
  assert {name for name, layer in adapted.init_params.items()
          if "lora_a" in layer} == targets | {"head"}
  sim = small_simulation(model_def=adapted, batch_size=4, policy="hetlora",
                         **(dict(data=_tokens()) if lm else {}))
  state = assert_matches_reference(sim, adapted.init_params)
  for name, layer in state.params.items():
    for key, value in layer.items():
      if key in lora.LORA_KEYS:
        continue
      # The backbone, embeddings and norms included, is bitwise unchanged.
      np.testing.assert_array_equal(value, adapted.init_params[name][key])
    if name in targets:
      assert np.abs(np.asarray(layer["lora_b"])).sum() > 0


def test_a_wrong_adapter_target_is_named():
  model = _model((6, 5), 7)
  with pytest.raises(ValueError, match="'pos' is not a layer with a kernel"):
    lora.add_adapters(model.init_params, model.layers, 2, jax.random.key(0),
                      ("blocks/0/q", "pos"))


def test_registered_on_the_digits_shape():
  model = build_model("transformer", (8, 8, 1), 10, seed=0, embed_dim=16,
                      num_heads=2, mlp_dim=32, num_layers=1)
  assert model.groups == {"embed": 16, "blocks/0/heads": 2,
                          "blocks/0/mlp": 32}
  x = RNG.normal(size=(2, 8, 8, 1)).astype(np.float32)
  assert model.apply(model.init_params, x).shape == (2, 10)
