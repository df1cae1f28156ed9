"""Tests for fedjax_tl.data.partition (client partitioners and padding)."""

import numpy as np
import pytest

from fedjax_tl.data.partition import pad_clients, partition
from fedjax_tl.errors import ConfigError


def _balanced_labels(n: int, num_classes: int = 10, seed: int = 0):
  return np.random.default_rng(seed).permutation(np.arange(n) % num_classes)


def _max_class_fraction(labels, parts, num_classes=10):
  return np.mean([np.bincount(labels[p], minlength=num_classes).max() / len(p)
                  for p in parts if len(p)])


@pytest.mark.parametrize("method", ["iid", "dirichlet", "quantity"])
def test_partition_covers_all_indices_once(method):
  labels = _balanced_labels(3000)
  parts = partition(labels, 40, method, np.random.default_rng(1), alpha=0.3)
  assert len(parts) == 40
  flat = np.concatenate(parts)
  # With no size cap every example is used, and none twice.
  np.testing.assert_array_equal(np.sort(flat), np.arange(3000))
  for p in parts:
    assert p.dtype.kind == "i"


@pytest.mark.parametrize("method", ["iid", "dirichlet", "quantity"])
def test_partition_respects_min_and_max(method):
  labels = _balanced_labels(3000)
  # Capacity 100 * 40 = 4000 > 3000: everything fits.
  parts = partition(labels, 100, method, np.random.default_rng(2), alpha=0.2,
                    min_examples=5, max_examples=40)
  sizes = np.array([len(p) for p in parts])
  assert sizes.min() >= 5 and sizes.max() <= 40
  assert sizes.sum() == 3000
  assert len(np.unique(np.concatenate(parts))) == 3000


@pytest.mark.parametrize("method", ["iid", "dirichlet", "quantity"])
def test_partition_drops_examples_beyond_capacity(method):
  labels = _balanced_labels(3000)
  parts = partition(labels, 50, method, np.random.default_rng(3), alpha=0.5,
                    min_examples=2, max_examples=40)
  sizes = np.array([len(p) for p in parts])
  assert sizes.max() <= 40 and sizes.min() >= 2
  flat = np.concatenate(parts)
  assert len(np.unique(flat)) == len(flat) == 50 * 40  # every client full
  assert flat.min() >= 0 and flat.max() < 3000


def test_iid_label_histograms_are_near_uniform():
  labels = _balanced_labels(20000)
  parts = partition(labels, 10, "iid", np.random.default_rng(4))
  for p in parts:
    assert len(p) == 2000
    frac = np.bincount(labels[p], minlength=10) / len(p)
    # Binomial std of a class share is sqrt(0.1 * 0.9 / 2000) ~ 0.0067.
    np.testing.assert_allclose(frac, 0.1, atol=0.03)


def test_dirichlet_small_alpha_skews_labels():
  labels = _balanced_labels(10000)
  skewed = partition(labels, 100, "dirichlet", np.random.default_rng(5),
                     alpha=0.1)
  uniform = partition(labels, 100, "dirichlet", np.random.default_rng(5),
                      alpha=100.0)
  # An iid client of 100 examples has a max class share of ~0.17.
  assert _max_class_fraction(labels, uniform) < 0.25
  assert _max_class_fraction(labels, skewed) > 0.5
  # Label skew keeps client sizes equal.
  assert {len(p) for p in skewed} == {100}


def test_quantity_skew_varies_sizes_not_labels():
  labels = _balanced_labels(20000)
  skewed = partition(labels, 100, "quantity", np.random.default_rng(6),
                     alpha=0.5, min_examples=10)
  even = partition(labels, 100, "quantity", np.random.default_rng(6),
                   alpha=1000.0, min_examples=10)
  cv = lambda parts: np.std([len(p) for p in parts]) / np.mean(  # noqa: E731
      [len(p) for p in parts])
  # Dirichlet(0.5) shares have coefficient of variation ~ sqrt(2) ~ 1.4.
  assert cv(skewed) > 0.8
  assert cv(even) < 0.15
  assert min(len(p) for p in skewed) >= 10
  # Labels inside the biggest clients stay close to uniform.
  big = sorted(skewed, key=len)[-5:]
  for p in big:
    frac = np.bincount(labels[p], minlength=10) / len(p)
    assert frac.max() < 0.2


@pytest.mark.parametrize("method", ["iid", "dirichlet", "quantity"])
def test_partition_is_deterministic(method):
  labels = _balanced_labels(2000)
  a = partition(labels, 30, method, np.random.default_rng(7))
  b = partition(labels, 30, method, np.random.default_rng(7))
  c = partition(labels, 30, method, np.random.default_rng(8))
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_explicit_sizes():
  labels = _balanced_labels(500)
  sizes = np.array([1, 5, 10, 100, 3])
  for method in ("iid", "dirichlet", "quantity"):
    parts = partition(labels, 5, method, np.random.default_rng(0),
                      sizes=sizes)
    np.testing.assert_array_equal([len(p) for p in parts], sizes)
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == len(flat)


def test_partition_errors():
  labels = _balanced_labels(100)
  rng = np.random.default_rng(0)
  with pytest.raises(ConfigError, match="'pathological'.*iid.*dirichlet"):
    partition(labels, 5, "pathological", rng)
  with pytest.raises(ConfigError, match="not enough examples"):
    partition(labels, 30, "iid", rng, min_examples=4)
  with pytest.raises(ConfigError, match="alpha"):
    partition(labels, 5, "dirichlet", rng, alpha=0.0)
  with pytest.raises(ConfigError, match="num_clients"):
    partition(labels, 0, "iid", rng)
  with pytest.raises(ConfigError, match="max_examples"):
    partition(labels, 5, "iid", rng, min_examples=3, max_examples=2)


def test_pad_clients_by_hand():
  x = np.arange(12, dtype=np.float64).reshape(6, 2)
  y = np.array([10, 11, 12, 13, 14, 15])
  clients = [np.array([4, 0]), np.array([], dtype=int), np.array([1, 2, 3, 5])]

  fed = pad_clients(x, y, clients, max_examples=3)
  expected_x = np.array([
      [[8, 9], [0, 1], [0, 0]],
      [[0, 0], [0, 0], [0, 0]],
      [[2, 3], [4, 5], [6, 7]],  # truncated: example 5 dropped
  ], dtype=np.float32)
  expected_y = np.array([[14, 10, 0], [0, 0, 0], [11, 12, 13]], dtype=np.int32)
  np.testing.assert_array_equal(fed.x, expected_x)
  np.testing.assert_array_equal(fed.y, expected_y)
  np.testing.assert_array_equal(fed.count, [2, 0, 3])
  assert fed.x.dtype == np.float32
  assert fed.y.dtype == np.int32
  assert fed.count.dtype == np.int32

  # Without a cap the width is the longest client.
  fed = pad_clients(x, y, clients)
  assert fed.x.shape == (3, 4, 2)
  np.testing.assert_array_equal(fed.x[2, 3], [10, 11])
  np.testing.assert_array_equal(fed.y[2], [11, 12, 13, 15])
  np.testing.assert_array_equal(fed.y[0], [14, 10, 0, 0])
  np.testing.assert_array_equal(fed.count, [2, 0, 4])
