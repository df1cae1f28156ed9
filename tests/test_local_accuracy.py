"""Tests for per-device test splits and local (label-masked) accuracy."""

import math
import sys

import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits

from conftest import random_federated, tfds_mock_data, tiny_config
from fedjax_tl import config as config_lib
from fedjax_tl.data.digits import load_digits_transfer
from fedjax_tl.data.federated import FederatedData
from fedjax_tl.data.partition import local_test_indices
from fedjax_tl.errors import ConfigError
from fedjax_tl.evaluation import make_local_evaluator
from fedjax_tl.models import build_model
from fedjax_tl.runner import run


def _held(fed: FederatedData, num_classes: int = 10) -> np.ndarray:
  """`[clients, classes]` bool by a plain loop: labels among real examples."""
  held = np.zeros((fed.num_clients, num_classes), bool)
  for i in range(fed.num_clients):
    for label in fed.y[i, :fed.count[i]]:
      held[i, label] = True
  return held


def test_digits_local_test_leaves_every_other_number_unchanged():
  kwargs = dict(num_clients=80, alpha=0.3, seed=4)
  off = load_digits_transfer(**kwargs)
  on = load_digits_transfer(**kwargs, local_test_examples=7)
  assert off.client_test is None
  for name in ("x", "y", "count"):
    np.testing.assert_array_equal(getattr(off.clients, name),
                                  getattr(on.clients, name))
  for split in ("source_train", "source_test", "target_test"):
    np.testing.assert_array_equal(getattr(off, split).x, getattr(on, split).x)
    np.testing.assert_array_equal(getattr(off, split).y, getattr(on, split).y)
  test = on.client_test
  assert test.x.shape == (80, 7, 8, 8, 1) and test.x.dtype == np.float32
  assert test.y.shape == (80, 7) and test.y.dtype == np.int32
  np.testing.assert_array_equal(test.count, np.full(80, 7))
  assert test.x.min() >= 0 and test.x.max() <= 1
  # Every test label is one the device trains on.
  held = _held(on.clients)
  assert all(held[i, test.y[i]].all() for i in range(80))
  again = load_digits_transfer(**kwargs, local_test_examples=7).client_test
  np.testing.assert_array_equal(test.x, again.x)
  with pytest.raises(ConfigError, match="local_test_examples"):
    load_digits_transfer(10, local_test_examples=-1)


def test_digits_local_test_images_are_unseen_base_digits():
  # Without shift the rendered images are the clean base digits, so they can
  # be looked up: local test images come from outside the training pool.
  task = load_digits_transfer(40, seed=1, shift=0.0, local_test_examples=5)
  raw = load_digits()
  table = {img.tobytes(): i for i, img in
           enumerate(raw.images.astype(np.float32) / 16.0)}
  look = lambda x: np.array([table.get(img.tobytes(), -1)  # noqa: E731
                             for img in x[..., 0]])
  fed, test = task.clients, task.client_test
  train_ids = look(fed.x[fed.mask])
  test_ids = look(test.x.reshape(-1, 8, 8, 1))
  assert np.all(test_ids >= 0)
  np.testing.assert_array_equal(raw.target[test_ids], test.y.ravel())
  assert not set(train_ids) & set(test_ids)


def test_local_test_labels_follow_the_training_mix():
  # Client 0: labels 2 (x3) and 5 (x1); client 1: only label 7, absent from
  # the pool; client 2: 1 and 7 (7 absent: only 1 can be drawn).
  y = np.array([[2, 2, 5, 2, 0], [7, 7, 0, 0, 0], [1, 7, 0, 0, 0]], np.int32)
  fed = FederatedData(np.zeros((3, 5, 1), np.float32), y,
                      np.array([4, 2, 2], np.int32))
  pool_y = np.array([5, 2, 1, 2, 9, 5, 2])
  rng = np.random.default_rng(0)
  picks = local_test_indices(fed, pool_y, 4000, rng)
  assert [len(p) for p in picks] == [4000, 0, 4000]
  labels = pool_y[picks[0]]
  assert set(labels) == {2, 5}
  assert abs(np.mean(labels == 2) - 0.75) < 0.03
  # Within a label, every pool example is drawn about equally often.
  twos = picks[0][labels == 2]
  shares = np.bincount(twos, minlength=7)[[1, 3, 6]] / len(twos)
  np.testing.assert_allclose(shares, 1 / 3, atol=0.04)
  np.testing.assert_array_equal(pool_y[picks[2]], 1)


def test_tfds_local_test_split():
  from fedjax_tl.data.tfds_source import load_tfds_transfer
  with tfds_mock_data(60):
    off = load_tfds_transfer("mnist", 5, source_fraction=0.2, seed=1)
    on = load_tfds_transfer("mnist", 5, source_fraction=0.2, seed=1,
                            local_test_examples=3)
  assert off.client_test is None
  np.testing.assert_array_equal(off.clients.x, on.clients.x)
  np.testing.assert_array_equal(off.clients.y, on.clients.y)
  test = on.client_test
  assert test.x.shape == (5, 3, 28, 28, 1)
  # Drawn from the test split, with labels among each client's own.
  table = {img.tobytes(): i for i, img in enumerate(on.target_test.x)}
  held = _held(on.clients)
  for i in range(5):
    for j in range(test.count[i]):
      k = table[test.x[i, j].tobytes()]
      assert on.target_test.y[k] == test.y[i, j]
      assert held[i, test.y[i, j]]


def _numpy_logits(params, x, fraction):
  """The width-`fraction` MLP sliced to its real shape, in numpy."""
  h = np.asarray(x, np.float64).reshape(len(x), -1)
  keep_in = h.shape[1]
  names = ["dense_0", "dense_1", "head"]
  for name in names:
    kernel = np.asarray(params[name]["kernel"], np.float64)
    bias = np.asarray(params[name]["bias"], np.float64)
    keep_out = (kernel.shape[1] if name == "head" else
                max(1, math.ceil(fraction * kernel.shape[1])))
    h = h @ kernel[:keep_in, :keep_out] + bias[:keep_out]
    if name != "head":
      h = np.maximum(h, 0)
    keep_in = keep_out
  return h


def test_local_evaluator_matches_a_numpy_loop():
  model = build_model("mlp", (8, 8, 1), 10, seed=0, hidden=(16, 8))
  params = jax.tree.map(
      lambda a: a + np.random.default_rng(1).normal(size=a.shape).astype(
          np.float32) * 0.5, model.init_params)
  # Few labels per client, so the label mask matters.
  train = random_federated(num_clients=9, max_examples=6, classes=4, seed=2)
  test = random_federated(num_clients=9, max_examples=5, classes=4, seed=3)
  tier = np.array([0, 1, 2, 0, 1, 2, 0, 1, 1])
  fractions = np.array([1.0, 0.5, 0.25], np.float32)
  evaluate = make_local_evaluator(model, train, test, 10, tier, 3,
                                  batch_size=7)
  local, per_tier = evaluate(params, fractions)

  held = _held(train)
  hits = {f: [] for f in (1.0, 0.5, 0.25)}
  for fraction in hits:
    for i in range(9):
      for j in range(test.count[i]):
        logits = _numpy_logits(params, test.x[i, j:j + 1], fraction)[0]
        logits[~held[i]] = -np.inf
        hits[fraction].append((tier[i], np.argmax(logits) == test.y[i, j]))
  full = [h for _, h in hits[1.0]]
  assert local == pytest.approx(np.mean(full), abs=1e-9)
  for t, fraction in enumerate(fractions):
    mine = [h for tt, h in hits[float(fraction)] if tt == t]
    assert per_tier[t] == pytest.approx(np.mean(mine), abs=1e-9)


def test_run_reports_local_accuracy(tmp_path):
  cfg = tiny_config(num_rounds=2, eval_every=1, local_test_examples=4)
  summary = run(cfg, tmp_path, quiet=True)
  assert 0 <= summary["local_accuracy"] <= 1
  assert set(summary["per_tier_local_accuracy"]) == set(cfg.tier_names)
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert all("local_accuracy" in line for line in lines)
  off = run(tiny_config(num_rounds=1, local_test_examples=0), tmp_path / "off",
            quiet=True)
  assert off["local_accuracy"] is None


@pytest.mark.slow
def test_masked_cross_entropy_raises_local_accuracy(tmp_path):
  # HeteroFL under strong label skew (about one class per device) and long
  # local training: a softmax over each device's own labels only keeps the
  # global model better at telling a device's labels apart (local accuracy);
  # measured 0.879 with (the head over its label holders; 0.886 over every
  # holder of the layer) vs 0.817 without, from 0.851 before fine-tuning.
  local = {}
  for masked in (True, False):
    cfg = config_lib.default_config()
    cfg.update(dict(num_clients=100, clients_per_round=10, num_rounds=20,
                    eval_every=20, alpha=0.05, local_steps=20,
                    masked_ce=masked))
    local[masked] = run(config_lib.validate(cfg), tmp_path / str(masked),
                        quiet=True)["local_accuracy"]
  print(local, file=sys.stderr)
  assert local[True] > local[False] + 0.03
