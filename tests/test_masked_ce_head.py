"""HeteroFL's output layer under masked cross-entropy (`masked_ce_head`).

In the authors' `combine` (HeteroFL's src/fed.py, `Federation.combine`) the
output layer's row and bias of label c are averaged only over the clients
whose `label_split` includes c. Checked by hand in numpy on 5 labels, every
client holding 2 with unequal example counts, against the other rule
(`layer_holders`: every client holding the layer), and on every round path
with the output layer under another name.
"""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from conftest import assert_rounds_agree, small_simulation
from fedjax_tl.data.federated import FederatedData
from fedjax_tl.engine.clients import output_layer, run_client
from fedjax_tl.models import build_model

CLASSES = 5


def _two_labels_each(num_clients=40, max_examples=12, seed=0):
  """Random 8x8x1 images; client i holds 2 of the 5 labels (both present
  among its 2..12 examples)."""
  rng = np.random.default_rng(seed)
  count = rng.integers(2, max_examples + 1, num_clients).astype(np.int32)
  mask = np.arange(max_examples)[None] < count[:, None]
  x = rng.normal(size=(num_clients, max_examples, 8, 8, 1)).astype(np.float32)
  x *= mask[..., None, None, None]
  pairs = np.stack([rng.choice(CLASSES, 2, replace=False)
                    for _ in range(num_clients)])
  y = np.take_along_axis(pairs, rng.integers(0, 2, x.shape[:2]), axis=1)
  y[:, :2] = pairs
  return FederatedData(x, (y * mask).astype(np.int32), count)


def _renamed(model, old="head", new="classifier"):
  """`model` with its layer `old` called `new` (params, specs and apply)."""
  rename = lambda params: {old if k == new else k: v for k, v in
                           params.items()}
  layers = tuple(dataclasses.replace(spec, name=new) if spec.name == old
                 else spec for spec in model.layers)
  params = {new if k == old else k: v for k, v in model.init_params.items()}
  return dataclasses.replace(
      model, init_params=params, layers=layers,
      apply=lambda p, x, **kwargs: model.apply(rename(p), x, **kwargs))


def _model():
  return build_model("mlp", (8, 8, 1), CLASSES, seed=0, hidden=(16, 8))


def test_head_entries_are_averaged_over_the_clients_holding_the_label():
  data = _two_labels_each()
  sim = small_simulation(chunk_size=4, model_def=_model(), data=data,
                         masked_ce=True, masked_ce_head="layer_holders")
  state = sim.init(sim.model.init_params)
  plan = jax.jit(sim.cohort)(sim.arrays, state.round, state.width_cap,
                             state.totals["sim_seconds"])
  one = jax.jit(functools.partial(run_client, sim))
  weights, deltas, masks, labels = [], [], [], []
  for i in np.flatnonzero(np.asarray(plan.weight) > 0):
    delta, train, _, _ = one(sim.arrays, state.params, state.round,
                             plan.ids[i], plan.fraction[i], plan.num_steps[i])
    device = int(plan.ids[i])
    held = np.zeros(CLASSES)
    held[np.unique(data.y[device, :data.count[device]])] = 1
    weights.append(float(plan.weight[i]))
    deltas.append(jax.tree.map(np.asarray, delta))
    masks.append(jax.tree.map(np.asarray, train))
    labels.append(held)
  w, held = np.array(weights, np.float64), np.stack(labels)
  assert len(w) >= 5 and len(set(w)) > 2  # unequal example counts
  assert np.all(held.sum(axis=1) == 2)

  def by_hand(label_rule):
    """`{layer: {param: mean delta}}`: sum_i w_i m_i d_i / sum_i w_i m_i,
    the head's column c over the clients holding c under the label rule."""
    out = {}
    for layer, params in deltas[0].items():
      out[layer] = {}
      for name in params:
        d = np.stack([x[layer][name] for x in deltas]).astype(np.float64)
        m = np.stack([x[layer][name] for x in masks]).astype(np.float64)
        if label_rule and layer == "head":
          m = m * held.reshape(len(w), *[1] * (m.ndim - 2), CLASSES)
        num = np.tensordot(w, d * m, axes=1)
        den = np.tensordot(w, m, axes=1)
        out[layer][name] = np.where(den > 0, num / np.where(den > 0, den, 1),
                                    0)
    return out

  moved = {}
  for rule in ("layer_holders", "label_holders"):
    new, _ = dataclasses.replace(sim, masked_ce_head=rule).round(state)
    mean = by_hand(rule == "label_holders")
    for layer, params in mean.items():
      for name, value in params.items():
        np.testing.assert_allclose(
            np.asarray(new.params[layer][name]) -
            np.asarray(state.params[layer][name]), value, rtol=1e-5,
            atol=1e-7, err_msg=f"{rule} {layer}/{name}")
    moved[rule] = np.sqrt(sum(np.sum(v**2) for v in mean["head"].values()))
  # The rules differ only on the head; there clients without label c pull
  # its column towards no change (their masked softmax gives it no
  # gradient): the old rule moves the head 0.47x as far.
  ratio = moved["layer_holders"] / moved["label_holders"]
  assert ratio == pytest.approx(0.4705, abs=2e-3)


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_every_round_path_agrees_under_the_label_rule(chunk_size):
  # The output layer called "classifier": found by its axes, not its name.
  model = _renamed(_model())
  name, params = output_layer(small_simulation(model_def=model))
  assert (name, set(params)) == ("classifier", {"kernel", "bias"})
  sim = small_simulation(chunk_size=chunk_size, model_def=model,
                         data=_two_labels_each(), masked_ce=True)
  assert sim.masked_ce_head == "label_holders"  # the default
  assert_rounds_agree(sim)


def test_output_layer_of_every_model_kind():
  for kind in ("mlp", "cnn"):
    model = build_model(kind, (8, 8, 1), 10, seed=0, hidden=(16, 8),
                        cnn_channels=(4, 6), cnn_dense=8)
    name, params = output_layer(small_simulation(model_def=model))
    assert (name, set(params)) == ("head", {"kernel", "bias"})
  with pytest.raises(ValueError, match="masked_ce_head"):
    small_simulation(masked_ce=True, masked_ce_head="everyone")
