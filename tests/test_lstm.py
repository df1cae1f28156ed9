"""The Shakespeare LSTM: its forward against numpy, every width against the
LSTM built at that size (forward and gradients), and a round on text data
against the per-client loop."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_rounds_agree, small_simulation
from fedjax_tl import config, cost
from fedjax_tl.data import text
from fedjax_tl.models import axes, build_model, from_module, num_params
from fedjax_tl.models.lstm import LSTM
from fedjax_tl.policies import capacity

RNG = np.random.default_rng(0)


def _model(hidden=(8, 6), embed=4, vocab=11, t=5, seed=0):
  return from_module(LSTM((t,), vocab, embed=embed, hidden=hidden,
                          rngs=nnx.Rngs(params=seed)))


def _np_lstm(p, tokens, layers):
  """fedjax's Haiku LSTM written out in numpy (float64): per unit the gates
  i, g, f, o side by side; forget bias +1; tanh on each layer's output."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  sig = lambda z: 1 / (1 + np.exp(-z))
  h = p["embed"]["embedding"][tokens]
  for i in range(layers):
    wi, b = p[f"layers/{i}/input"]["kernel"], p[f"layers/{i}/input"]["bias"]
    wh = p[f"layers/{i}/recurrent"]["kernel"]
    units = wh.shape[0]
    out, cell = np.zeros((h.shape[0], units)), np.zeros((h.shape[0], units))
    outs = []
    for t in range(h.shape[1]):
      z = (h[:, t] @ wi + out @ wh + b).reshape(-1, units, 4)
      gi, gg, gf, go = (z[..., k] for k in range(4))
      cell = sig(gf + 1) * cell + sig(gi) * np.tanh(gg)
      out = sig(go) * np.tanh(cell)
      outs.append(out)
    h = np.tanh(np.stack(outs, 1))
  return h @ p["head"]["kernel"] + p["head"]["bias"]


def test_forward_equals_numpy():
  model = _model()
  params = jax.tree.map(
      lambda a: a + 0.3 * RNG.normal(size=a.shape).astype(np.float32),
      model.init_params)
  x = RNG.integers(0, 11, (3, 5)).astype(np.int32)
  np.testing.assert_allclose(model.apply(params, x),
                             _np_lstm(params, x, 2), rtol=1e-4, atol=1e-5)


def test_fedjax_sizes_by_hand():
  model = build_model("lstm", (80,), text.VOCAB_SIZE, seed=0)
  v, e, h = 90, 8, 256
  assert model.groups == {"lstm_0": h, "lstm_1": h}
  assert num_params(model.init_params) == (
      v * e + (e + h) * 4 * h + 4 * h + (h + h) * 4 * h + 4 * h + h * v + v)
  positions = cost.conv_positions((80,), model.layers, model.init_params)
  flops = cost.forward_flops(model.layers, model.init_params, None, positions)
  assert float(flops) == 80 * 2 * ((e + h) * 4 * h + 2 * h * 4 * h + h * v)


def test_config_gives_fedjax_s_sizes_by_default(tmp_path):
  from natural_files import write_roles
  c = config.load_config(None)
  assert (config.validate(c).hidden, config.validate(c).embed_dim) == (
      (128,), 256)  # the mlp's and the transformer's, as before
  write_roles(tmp_path, {"HAMLET": ["To be.", "Or not."]})
  c.model, c.data, c.data_path = "lstm", "shakespeare", str(tmp_path)
  c.clients_per_round = 1
  cfg = config.validate(c)
  assert (cfg.hidden, cfg.embed_dim) == ((256, 256), 8)


@pytest.mark.parametrize("width", [1.0, 0.5, 0.3, 0.125])
def test_masked_lstm_equals_the_sub_model(width):
  full = _model()
  kept = {g: math.ceil(width * size) for g, size in full.groups.items()}
  small = _model(hidden=(kept["lstm_0"], kept["lstm_1"]), seed=1)
  params = jax.tree.map(
      lambda a: a + 0.3 * RNG.normal(size=a.shape).astype(np.float32),
      full.init_params)
  sub = axes.first_k(params, full.layers, kept)
  assert jax.tree.map(jnp.shape, sub) == jax.tree.map(jnp.shape,
                                                      small.init_params)
  x = RNG.integers(0, 11, (4, 5)).astype(np.int32)
  y = RNG.integers(0, 11, (4, 5))
  units = capacity.first_k_units(jnp.float32(width), full.groups)
  masks = capacity.masks_from_units(units, full.layers, params)

  def loss(p, model, units):
    logits = model.apply(p, x, units=units)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits),
                                         y[..., None], -1))

  expected = _np_lstm(sub, x, 2)
  masked = jax.tree.map(jnp.multiply, params, masks)
  for logits in (full.apply(params, x, units=units), full.apply(masked, x),
                 small.apply(sub, x)):
    np.testing.assert_allclose(logits, expected, rtol=2e-4, atol=2e-5)
  want = jax.grad(loss)(sub, small, None)
  for grads in (jax.grad(loss)(params, full, units),
                jax.grad(loss)(masked, full, None)):
    for a, b in zip(jax.tree.leaves(axes.first_k(grads, full.layers, kept)),
                    jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-6)
  grads = jax.grad(loss)(params, full, units)
  for g, m in zip(jax.tree.leaves(grads), jax.tree.leaves(masks)):
    assert not np.any(np.asarray(g)[np.asarray(m) == 0])


def _text_clients(num_clients=40, seq_len=8, seed=0):
  """Skewed random snippets (some unicode) per client, as sequences."""
  rng = np.random.default_rng(seed)
  chars = list(text.VOCAB.decode()) + ["é", "—"]
  clients = [[("".join(rng.choice(chars, rng.integers(0, 20))))
              for _ in range(rng.geometric(0.3))]
             for _ in range(num_clients)]
  data, _ = text.federated_text(clients, seq_len, max_sequences=6)
  return data


def test_round_on_text_equals_the_tier_fast_path_and_loop():
  model = _model(hidden=(8, 8), embed=4, vocab=text.VOCAB_SIZE, t=8)
  # masked_ce as a config's heterofl runs: the softmax over the characters
  # a client's sequences hold.
  sim = small_simulation(model_def=model, batch_size=4, policy="heterofl",
                         data=_text_clients(), masked_ce=True,
                         client_options=dict(loss_ignored=text.LOSS_IGNORED))
  # One round: compiling the three round paths of a scanned LSTM dominates.
  assert_rounds_agree(sim, rounds=1, atol=2e-5)


def test_the_init_is_haiku_s_truncated_normal():
  # Haiku's TruncatedNormal (fedjax's model's init): N(0, 1) cut at +-2,
  # times stddev, not rescaled: its std is 0.8796 stddev (closed form).
  from fedjax_tl.models.lstm import haiku_truncated_normal
  draw = np.asarray(haiku_truncated_normal(0.5)(jax.random.key(0),
                                               (200_000,)))
  assert np.abs(draw).max() <= 1.0
  cut = math.erf(2 / math.sqrt(2))
  pdf2 = math.exp(-2) / math.sqrt(2 * math.pi)
  std = 0.5 * math.sqrt(1 - 4 * pdf2 / cut)
  assert abs(draw.std() - std) < 0.005 and abs(std - 0.5 * 0.8796) < 1e-3
  model = _model(hidden=(8, 6), embed=4, vocab=11)
  embed = np.asarray(model.init_params["embed"]["embedding"])
  assert np.abs(embed).max() <= 2.0  # stddev 1, cut at 2
