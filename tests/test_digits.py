"""Tests for fedjax_tl.data.digits (the embedded offline transfer task)."""

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from fedjax_tl.data import digits
from fedjax_tl.data.digits import load_digits_transfer
from fedjax_tl.errors import ConfigError

NUM_BASE = 1797


@pytest.fixture(scope="module")
def task():
  return load_digits_transfer(300, seed=0)


@pytest.fixture(scope="module")
def clean():
  raw = load_digits()
  return raw.images.astype(np.float32) / 16.0, raw.target


def _lookup(images, clean_images):
  """Index of each image among the clean digits (-1 if none is identical)."""
  table = {img.tobytes(): i for i, img in enumerate(clean_images)}
  return np.array([table.get(img.astype(np.float32).tobytes(), -1)
                   for img in images[..., 0]])


def test_shapes_dtypes_and_ranges(task):
  assert task.name == "digits"
  assert task.num_classes == 10
  assert task.input_shape == (8, 8, 1)
  for ds in (task.source_train, task.source_test, task.target_test):
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int32
    assert ds.x.shape[1:] == (8, 8, 1) and ds.x.shape[0] == ds.y.shape[0]
    assert ds.x.min() >= 0.0 and ds.x.max() <= 1.0
    assert ds.y.min() >= 0 and ds.y.max() <= 9
  fed = task.clients
  assert fed.x.shape == (300, 48, 8, 8, 1) and fed.x.dtype == np.float32
  assert fed.y.shape == (300, 48) and fed.y.dtype == np.int32
  assert fed.count.dtype == np.int32
  assert fed.count.min() >= 8 and fed.count.max() <= 48
  assert len(np.unique(fed.count)) > 10  # sizes vary
  assert fed.x.min() >= 0.0 and fed.x.max() <= 1.0
  assert fed.y.min() >= 0 and fed.y.max() <= 9
  pad = ~fed.mask
  assert np.all(fed.x[pad] == 0) and np.all(fed.y[pad] == 0)
  # Pool sizes: ~45% / ~10% of 1,797, target test = 3 styled copies of ~15%.
  assert abs(len(task.source_train) - 0.45 * NUM_BASE) < 10
  assert abs(len(task.source_test) - 0.10 * NUM_BASE) < 10
  assert abs(len(task.target_test) - 3 * 0.15 * NUM_BASE) < 30


def test_source_is_clean_disjoint_digits(task, clean):
  images, labels = clean
  train = _lookup(task.source_train.x, images)
  test = _lookup(task.source_test.x, images)
  assert np.all(train >= 0) and np.all(test >= 0)
  np.testing.assert_array_equal(task.source_train.y, labels[train])
  np.testing.assert_array_equal(task.source_test.y, labels[test])
  assert not set(train) & set(test)
  assert len(set(train)) == len(train)
  # Stratified: every class has a share close to its share in the base set.
  base = np.bincount(labels, minlength=10) / len(labels)
  share = np.bincount(task.source_train.y, minlength=10) / len(train)
  np.testing.assert_allclose(share, base, atol=0.01)


def test_target_images_are_transformed(task, clean):
  images, _ = clean
  fed = task.clients
  assert np.all(_lookup(fed.x[fed.mask], images) == -1)
  assert np.all(_lookup(task.target_test.x, images) == -1)


def test_zero_shift_gives_clean_target_pool_digits(clean):
  images, labels = clean
  task = load_digits_transfer(50, seed=3, shift=0.0)
  fed = task.clients
  found = _lookup(fed.x[fed.mask], images)
  assert np.all(found >= 0)
  np.testing.assert_array_equal(fed.y[fed.mask], labels[found])
  test_found = _lookup(task.target_test.x, images)
  assert np.all(test_found >= 0)
  # Target pools are disjoint from the source pools.
  source = set(_lookup(task.source_train.x, images)) | set(
      _lookup(task.source_test.x, images))
  assert not source & set(found)
  assert not source & set(test_found)
  assert not set(found) & set(test_found)


def test_warp_matches_numpy_rotation_and_shift():
  rng = np.random.default_rng(0)
  img = rng.random((2, 8, 8)).astype(np.float32)
  # The inverse map of a 90 degree turn, and of a one-pixel shift right.
  rot = np.array([[[0, 1], [-1, 0]]] * 2, dtype=np.float32)
  out = digits._affine_bilinear(img, rot, np.zeros((2, 2), np.float32))
  # out[r, c] = img[7 - c, r]: a clockwise quarter turn.
  np.testing.assert_allclose(out, np.rot90(img, k=-1, axes=(1, 2)), atol=1e-6)

  ident = np.array([np.eye(2)] * 2, dtype=np.float32)
  out = digits._affine_bilinear(img, ident, np.array([[1, 0], [0, 0]],
                                                     np.float32))
  expected = np.zeros_like(img)
  expected[0, :, 1:] = img[0, :, :-1]
  expected[1] = img[1]
  np.testing.assert_allclose(out, expected, atol=1e-6)
  # Half a pixel: the mean of neighbours, zero outside.
  out = digits._affine_bilinear(img, ident, np.array([[0, 0.5], [0, 0]],
                                                     np.float32))
  np.testing.assert_allclose(out[0, 1:], (img[0, 1:] + img[0, :-1]) / 2,
                             atol=1e-6)
  np.testing.assert_allclose(out[0, 0], img[0, 0] / 2, atol=1e-6)


def test_deterministic(task):
  again = load_digits_transfer(300, seed=0)
  other = load_digits_transfer(300, seed=1)
  for a, b in ((task.source_train, again.source_train),
               (task.target_test, again.target_test)):
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
  np.testing.assert_array_equal(task.clients.x, again.clients.x)
  np.testing.assert_array_equal(task.clients.y, again.clients.y)
  np.testing.assert_array_equal(task.clients.count, again.clients.count)
  assert not np.array_equal(task.clients.x, other.clients.x)
  assert not np.array_equal(task.target_test.x, other.target_test.x)
  assert not np.array_equal(task.source_train.y, other.source_train.y)


def test_label_skew_follows_alpha():
  def max_share(alpha):
    fed = load_digits_transfer(200, alpha=alpha, min_examples=40,
                               max_examples=40, seed=0).clients
    return np.mean([np.bincount(fed.y[i], minlength=10).max() / 40
                    for i in range(fed.num_clients)])
  # 40 iid draws over 10 classes: max share ~0.2; Dirichlet(0.1): mostly 1-2
  # classes.
  assert max_share(100.0) < 0.3
  assert max_share(0.1) > 0.6


def test_domain_shift_hurts_source_model_and_target_is_learnable(task):
  flat = lambda x: x.reshape(len(x), -1)  # noqa: E731
  mask = task.clients.mask
  x, y = task.clients.x[mask], task.clients.y[mask]
  pick = np.random.default_rng(0).permutation(len(y))[:3000]
  # One BLAS thread: on a busy small machine threaded BLAS is ~50x slower here.
  with threadpool_limits(limits=1):
    src = LogisticRegression(max_iter=500).fit(
        flat(task.source_train.x), task.source_train.y)
    acc_src = src.score(flat(task.source_test.x), task.source_test.y)
    acc_shift = src.score(flat(task.target_test.x), task.target_test.y)
    tgt = LogisticRegression(max_iter=500).fit(flat(x[pick]), y[pick])
    acc_tgt = tgt.score(flat(task.target_test.x), task.target_test.y)
  assert acc_src > 0.9
  assert acc_shift < acc_src - 0.2
  assert acc_tgt > acc_shift + 0.08


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_clients=0), "num_clients"),
    (dict(min_examples=0), "min_examples"),
    (dict(min_examples=10, max_examples=5), "max_examples"),
    (dict(alpha=0.0), "alpha"),
    (dict(alpha=-1.0), "alpha"),
])
def test_bad_arguments(kwargs, name):
  with pytest.raises(ConfigError, match=name):
    load_digits_transfer(**kwargs)


def test_shipped_digits_are_scikit_learns(clean):
  # The package's digits_8x8.npz against scikit-learn's own loader: the same
  # images, labels and order, so the default experiment's numbers are the
  # ones measured when it read scikit-learn's copy.
  images, labels = digits._base_digits()
  clean_images, clean_labels = clean
  assert images.shape == (NUM_BASE, 8, 8, 1) and images.dtype == np.float32
  np.testing.assert_array_equal(images[..., 0], clean_images)
  np.testing.assert_array_equal(labels, clean_labels)
