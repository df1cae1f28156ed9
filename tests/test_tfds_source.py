"""Tests for fedjax_tl.data.tfds_source (tfds loading without TensorFlow)."""

import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("array_record")  # the random-access file format

from fedjax_tl.data.tfds_source import load_tfds_transfer  # noqa: E402
from fedjax_tl.errors import DataError  # noqa: E402

# name -> (image shape, number of classes), from the tfds catalog.
CATALOG = {
    "mnist": ((28, 28, 1), 10),
    "fashion_mnist": ((28, 28, 1), 10),
    "cifar10": ((32, 32, 3), 10),
    "emnist": ((28, 28, 1), 62),  # default config: byclass
    "emnist/balanced": ((28, 28, 1), 47),
}


def _mock(num_examples):
  return tfds.testing.mock_data(
      num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE)


def _keys(x):
  """Byte keys of images in [0, 1] that were uint8 pixels."""
  return [img.tobytes() for img in np.round(x * 255).astype(np.uint8)]


def _reference_train(name, n):
  """The mocked train split, read record by record straight from tfds."""
  src = tfds.data_source(name, split="train", download=False)
  assert len(src) == n
  records = [src[i] for i in range(n)]
  images = np.stack([np.asarray(r["image"]) for r in records])
  labels = np.array([int(r["label"]) for r in records])
  return images, labels


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_mock_data_loads_and_partitions_everything(name):
  shape, num_classes = CATALOG[name]
  n = 60
  with _mock(n):
    task = load_tfds_transfer(name, 5, partition_method="iid",
                              source_fraction=0.2, seed=1)
    ref_x, ref_y = _reference_train(name, n)

  assert task.name == name
  assert task.num_classes == num_classes
  assert task.input_shape == shape
  for ds in (task.source_train, task.source_test, task.target_test):
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int32
    assert ds.x.shape[1:] == shape
    assert ds.x.min() >= 0.0 and ds.x.max() <= 1.0
    assert ds.y.min() >= 0 and ds.y.max() < num_classes
  assert len(task.target_test) == n
  fed = task.clients
  assert fed.x.dtype == np.float32 and fed.x.shape[2:] == shape
  assert fed.y.dtype == np.int32 and fed.count.dtype == np.int32
  assert len(task.source_train) == 12
  assert fed.count.sum() == n - 12
  assert fed.count.min() >= 1

  # Every train example lands exactly once in source_train or one client,
  # with its own label and pixels scaled by 1/255.
  table = {img.tobytes(): i for i, img in enumerate(ref_x)}
  assert len(table) == n  # mock images are distinct
  got_x = np.concatenate([task.source_train.x, fed.x[fed.mask]])
  got_y = np.concatenate([task.source_train.y, fed.y[fed.mask]])
  index = np.array([table[k] for k in _keys(got_x)])
  np.testing.assert_array_equal(np.sort(index), np.arange(n))
  np.testing.assert_array_equal(got_y, ref_y[index])
  np.testing.assert_allclose(got_x, ref_x[index] / 255.0, atol=1e-6)
  assert np.all(fed.x[~fed.mask] == 0)


def test_dirichlet_caps_and_train_subset():
  with _mock(200):
    task = load_tfds_transfer("mnist", 8, alpha=0.3, min_examples=2,
                              max_examples=10, source_fraction=0.25,
                              max_train_examples=120, seed=0)
    again = load_tfds_transfer("mnist", 8, alpha=0.3, min_examples=2,
                               max_examples=10, source_fraction=0.25,
                               max_train_examples=120, seed=0)
  assert len(task.source_train) == 30  # 25% of the 120 used examples
  fed = task.clients
  assert fed.max_examples == 10
  assert fed.count.min() >= 2 and fed.count.max() <= 10
  assert fed.count.sum() == 80  # 90 left, but only 8 * 10 fit
  keys = _keys(np.concatenate([task.source_train.x, fed.x[fed.mask]]))
  assert len(set(keys)) == len(keys)
  np.testing.assert_array_equal(fed.x, again.clients.x)
  np.testing.assert_array_equal(task.source_train.y, again.source_train.y)


class TinyDigitsForFedjaxTest(tfds.core.GeneratorBasedBuilder):
  """A real (not mocked) data set, prepared without TensorFlow."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            # `Image` features need TensorFlow to encode PNGs; a uint8 Tensor
            # reads back the same way.
            "image": tfds.features.Tensor(shape=(4, 4, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0, 120),
            "test": self._generate_examples(200, 30)}

  def _generate_examples(self, start, n):
    for i in range(start, start + n):
      image = ((i + np.arange(16)) % 256).astype(np.uint8).reshape(4, 4, 1)
      yield i, {"image": image, "label": i % 10}


def test_real_array_record_files(tmp_path):
  data_dir = str(tmp_path / "tfds")
  TinyDigitsForFedjaxTest(data_dir=data_dir,
                          file_format="array_record").download_and_prepare()
  task = load_tfds_transfer("tiny_digits_for_fedjax_test", 6,
                            partition_method="quantity", alpha=1.0,
                            source_fraction=0.1, data_dir=data_dir, seed=3)
  assert task.num_classes == 10
  assert task.input_shape == (4, 4, 1)
  fed = task.clients
  got_x = np.concatenate([task.source_train.x, fed.x[fed.mask]])
  got_y = np.concatenate([task.source_train.y, fed.y[fed.mask]])
  ids = np.round(got_x[:, 0, 0, 0] * 255).astype(int)  # pixel 0 is the id
  np.testing.assert_array_equal(np.sort(ids), np.arange(120))
  np.testing.assert_array_equal(got_y, ids % 10)
  np.testing.assert_allclose(
      got_x[:, :, :, 0].reshape(-1, 16),
      ((ids[:, None] + np.arange(16)) % 256) / 255.0, atol=1e-6)
  assert len(task.source_train) == 12
  test_ids = np.round(task.target_test.x[:, 0, 0, 0] * 255).astype(int)
  np.testing.assert_array_equal(np.sort(test_ids), np.arange(200, 230))
  np.testing.assert_array_equal(task.target_test.y, test_ids % 10)


def test_missing_dataset_raises_data_error(tmp_path):
  data_dir = str(tmp_path / "empty")
  with pytest.raises(DataError, match=r"'mnist'.*empty.*tfds build mnist"):
    load_tfds_transfer("mnist", 4, data_dir=data_dir)
  with pytest.raises(DataError, match="no_such_dataset_xyz"):
    load_tfds_transfer("no_such_dataset_xyz", 4, data_dir=data_dir)


def test_missing_tfds_package_raises_data_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(DataError, match=r'pip install "fedjax-tl\[tfds\]"'):
    load_tfds_transfer("mnist", 4)


class _NoDecoderSource:
  """A data source failing like tfds does without PIL and OpenCV."""

  def __len__(self):
    return 3

  def __getitem__(self, key):
    raise ImportError("Decoding images with NumPy requires either OpenCV or "
                      "PIL.")


def test_missing_image_decoder_raises_data_error():
  from fedjax_tl.data import tfds_source  # pylint: disable=g-import-not-at-top
  with pytest.raises(DataError, match="pip install pillow"):
    tfds_source._read(_NoDecoderSource(), np.arange(3), "mnist", "train",
                      "image", "label")
