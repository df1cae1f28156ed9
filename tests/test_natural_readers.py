"""Readers of natural federated data sets, on files written here in each
project's own format: fedjax's SQLite (msgpack + zlib blobs), TFF's HDF5,
LEAF's JSON and Hugging Face's parquet."""

import io
import json
import sqlite3

import numpy as np
import pytest

from fedjax_tl import cli, config as config_lib
from fedjax_tl.data.natural import (count_clients, load_natural_transfer,
                                    read_client_texts)
from fedjax_tl.errors import ConfigError, DataError

h5py = pytest.importorskip("h5py")
msgpack = pytest.importorskip("msgpack")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
from natural_files import write_hdf5, write_sqlite  # noqa: E402

SIZES = {"f0000_14": 5, "f0102_33": 1, "f0007_01": 3}  # file order
TEST_SIZES = {"f0000_14": 2, "f0102_33": 1, "f0007_01": 1}
TEXT = {"ROMEO": ["But soft, what light — through yonder window?",
                  "It is the east ☀ and Juliet is the sun."],
        "JULIET": ["Ô Romeo, Romeo!"],
        "NURSE": ["Ay, ay, a thousand times. Ça va ßß ü.", "x", "Peace!"]}


def _images(sizes, seed):
  """Per client: pixels [n, 28, 28] in [0, 1] (paper 1) and labels."""
  rng = np.random.default_rng(seed)
  return {c: (rng.random((n, 28, 28)).astype(np.float32),
              rng.integers(0, 62, n).astype(np.int32))
          for c, n in sizes.items()}


def _femnist_features(images):
  return {c: {"pixels": p, "label": y} for c, (p, y) in images.items()}


def _bytes_array(strings):
  out = np.empty(len(strings), dtype=object)
  out[:] = [s.encode("utf-8") for s in strings]
  return out


def _windows(text, length=80):
  """LEAF's Shakespeare examples of one text: windows and next chars."""
  return ([text[i:i + length] for i in range(len(text) - length)],
          [text[i + length] for i in range(len(text) - length)])


# -- expectations, plain numpy --

def _expect_clients(fed, images, ids, width):
  assert fed.client_ids == tuple(ids)
  assert fed.x.shape == (len(ids), width, 28, 28, 1)
  for row, c in enumerate(ids):
    pixels, labels = images[c]
    n = min(len(labels), width)
    assert fed.count[row] == n
    np.testing.assert_allclose(fed.x[row, :n, :, :, 0], 1.0 - pixels[:n],
                               atol=1e-6)
    np.testing.assert_array_equal(fed.y[row, :n], labels[:n])
    assert not fed.x[row, n:].any() and not fed.y[row, n:].any()


@pytest.fixture
def femnist_files(tmp_path):
  train, test = _images(SIZES, 0), _images(TEST_SIZES, 1)
  write_sqlite(tmp_path / "federated_emnist_train.sqlite",
               _femnist_features(train))
  write_sqlite(tmp_path / "federated_emnist_test.sqlite",
               _femnist_features(test))
  return tmp_path, train, test


def test_sqlite_femnist_arrays_counts_and_ids(femnist_files):
  root, train, test = femnist_files
  data = load_natural_transfer("femnist",
                               str(root / "federated_emnist_train.sqlite"))
  ids = list(SIZES)  # rowid order
  _expect_clients(data.clients, train, ids, 5)
  _expect_clients(data.client_test, test, ids, 2)
  np.testing.assert_array_equal(
      data.target_test.y, np.concatenate([test[c][1] for c in ids]))
  assert data.num_classes == 62 and data.facts["format"] == "sqlite"
  assert count_clients("femnist", str(root)) == 3


def test_cap_keeps_the_first_examples_and_counts_the_cut(femnist_files):
  root, train, _ = femnist_files
  data = load_natural_transfer("femnist", str(root), max_client_examples=2,
                               num_clients=2)
  _expect_clients(data.clients, train, list(SIZES)[:2], 2)
  assert data.facts["examples_cut"] == 3 and data.facts["clients_cut"] == 1
  assert data.facts["examples"] == 6


def test_hdf5_femnist_and_cifar100(tmp_path):
  train, test = _images(SIZES, 2), _images(TEST_SIZES, 3)
  write_hdf5(tmp_path / "fed_emnist_train.h5", _femnist_features(train))
  write_hdf5(tmp_path / "fed_emnist_test.h5", _femnist_features(test))
  data = load_natural_transfer("femnist", str(tmp_path / "fed_emnist_train.h5"))
  _expect_clients(data.clients, train, sorted(SIZES), 5)  # TFF: sorted ids
  rng = np.random.default_rng(4)
  cifar = {split: {str(c): {"image": rng.integers(0, 256, (n, 32, 32, 3)
                                                   ).astype(np.uint8),
                            "label": rng.integers(0, 100, n),
                            "coarse_label": rng.integers(0, 20, n)}
                   for c, n in enumerate(sizes)}
           for split, sizes in (("train", (4, 1, 2)), ("test", (3, 2)))}
  for split in cifar:
    write_hdf5(tmp_path / f"fed_cifar100_{split}.h5", cifar[split])
  data = load_natural_transfer("cifar100",
                               str(tmp_path / "fed_cifar100_train.h5"))
  assert data.client_test is None and data.clients.client_ids == ("0", "1",
                                                                  "2")
  np.testing.assert_allclose(data.clients.x[0, :4],
                             cifar["train"]["0"]["image"] / 255, atol=1e-6)
  np.testing.assert_array_equal(data.target_test.y, np.concatenate(
      [cifar["test"][c]["label"] for c in ("0", "1")]))


def test_leaf_femnist_train_and_test_dirs(tmp_path):
  train, test = _images(SIZES, 5), _images(TEST_SIZES, 6)
  for split, images in (("train", train), ("test", test)):
    (tmp_path / split).mkdir()
    doc = {"users": list(images), "num_samples": [len(y) for _, y in
                                                  images.values()],
           "user_data": {c: {"x": p.reshape(len(y), 784).tolist(),
                             "y": y.tolist()} for c, (p, y) in
                         images.items()}}
    (tmp_path / split / f"all_data_0_niid_0_keep_0_{split}_9.json").write_text(
        json.dumps(doc))
  data = load_natural_transfer("femnist", str(tmp_path), data_format="leaf")
  _expect_clients(data.clients, train, list(SIZES), 5)
  _expect_clients(data.client_test, test, list(SIZES), 2)


def _png(pixels):
  from PIL import Image
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="PNG")
  return out.getvalue()


def test_parquet_femnist_grouped_by_writer_and_split_per_client(tmp_path):
  rng = np.random.default_rng(7)
  writers = ["w2"] * 3 + ["w1"] * 12 + ["w3"] + ["w2"] * 2  # interleaved
  pixels = rng.integers(0, 256, (len(writers), 28, 28)).astype(np.uint8)
  labels = rng.integers(0, 62, len(writers))
  pq.write_table(pa.table({
      "image": [{"bytes": _png(p), "path": None} for p in pixels],
      "writer_id": writers, "hsf_id": [0] * len(writers),
      "character": labels}), tmp_path / "train-00000-of-00001.parquet")
  data = load_natural_transfer("femnist", str(tmp_path), seed=3)
  assert data.clients.client_ids == ("w2", "w1", "w3")  # first-row order
  for row, w in enumerate(("w2", "w1", "w3")):
    rows = [i for i, x in enumerate(writers) if x == w]
    n_train = len(rows) if len(rows) < 2 else (
        1 if len(rows) == 2 else max(1, int(0.9 * len(rows))))
    assert data.clients.count[row] == n_train
    assert data.client_test.count[row] == len(rows) - n_train
    got = sorted(data.clients.y[row, :n_train].tolist() +
                 data.client_test.y[row, :len(rows) - n_train].tolist())
    assert got == sorted(labels[rows].tolist())
  first = data.clients.x[2, 0, :, :, 0]  # w3's one example
  np.testing.assert_allclose(first, 1 - pixels[15] / 255, atol=1e-6)


def test_shakespeare_texts_in_every_format(tmp_path):
  clients = {c: {"snippets": _bytes_array(s)} for c, s in TEXT.items()}
  write_sqlite(tmp_path / "shakespeare_train.sqlite", clients)
  write_sqlite(tmp_path / "shakespeare_test.sqlite", clients)
  write_hdf5(tmp_path / "shakespeare_train.h5", clients)
  write_hdf5(tmp_path / "shakespeare_test.h5", clients)
  for name, order in (("shakespeare_train.sqlite", list(TEXT)),
                      ("shakespeare_train.h5", sorted(TEXT))):
    ids, texts = read_client_texts("shakespeare", str(tmp_path / name))
    assert ids == order
    assert texts["text"] == [TEXT[c] for c in order]
  long = {c: " ".join(s) * 8 for c, s in TEXT.items()}  # > 80 characters
  leaf = tmp_path / "leaf"
  for split in ("train", "test"):
    (leaf / split).mkdir(parents=True)
    doc = {"users": list(long), "num_samples": [], "user_data": {}}
    for c, text in long.items():
      xs, ys = _windows(text)
      doc["user_data"][c] = {"x": xs, "y": ys}
      doc["num_samples"].append(len(ys))
    (leaf / split / f"all_{split}.json").write_text(json.dumps(doc))
  ids, texts = read_client_texts("shakespeare", str(leaf))
  assert ids == list(long) and texts["text"] == [[long[c]] for c in long]
  rows = [(c, x, y) for c, t in long.items() for x, y in zip(*_windows(t))]
  pq.write_table(pa.table({"character_id": [r[0] for r in rows],
                           "x": [r[1] for r in rows],
                           "y": [r[2] for r in rows]}),
                 tmp_path / "shakespeare_train.parquet")
  ids, texts = read_client_texts("shakespeare",
                                 str(tmp_path / "shakespeare_train.parquet"))
  for c, got in zip(ids, texts["text"]):  # LEAF's contiguous 90% train
    n = len(long[c]) - 80
    assert got == [long[c][:int(0.9 * n) + 80]]


def test_stackoverflow_strings(tmp_path):
  posts = {"123": {"tokens": ["how do i join", "ok"], "tags": ["sql|join",
                                                               "x"],
                   "title": ["Join ?", "é"]}, "7": {
                       "tokens": ["one"], "tags": ["python"], "title": ["t"]}}
  clients = {c: {k: _bytes_array(v) for k, v in f.items()}
             for c, f in posts.items()}
  write_sqlite(tmp_path / "stackoverflow_train.sqlite", clients)
  write_sqlite(tmp_path / "stackoverflow_test.sqlite", clients)
  ids, texts = read_client_texts("stackoverflow", str(tmp_path))
  assert ids == ["123", "7"]
  for name in ("tokens", "tags", "title"):
    assert texts[name] == [posts[c][name] for c in ids]


# -- damaged files: one line naming the file --

def _damage_sqlite(root, how):
  path = root / "federated_emnist_train.sqlite"
  if how == "truncated":
    path.write_bytes(path.read_bytes()[:1500])
  elif how == "schema":
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE federated_data RENAME TO other")
    db.commit()
    db.close()
  else:  # float labels
    path.unlink()
    bad = _femnist_features(_images(SIZES, 0))
    bad["f0102_33"]["label"] = bad["f0102_33"]["label"].astype(np.float32)
    write_sqlite(path, bad)
  return path


@pytest.mark.parametrize("how,needle", [
    ("truncated", ""), ("schema", "federated_data"),
    ("dtype", "expected integer labels")])
def test_damaged_sqlite_is_one_line_naming_the_file(femnist_files, how,
                                                    needle):
  path = _damage_sqlite(femnist_files[0], how)
  with pytest.raises(DataError) as e:
    load_natural_transfer("femnist", str(path))
  assert str(path) in str(e.value) and needle in str(e.value)
  assert len(str(e.value).splitlines()) == 1


def test_damaged_hdf5_leaf_and_parquet(tmp_path):
  cases = {"fed_emnist_train.h5": b"\x89HDF\r\n\x1a\n" + b"\0" * 40,
           "train.json": b'{"users": ["a"], "user_data": {',
           "x_train.parquet": b"PAR1" + b"\0" * 40}
  for name, content in cases.items():
    path = tmp_path / name
    path.write_bytes(content)
    path.with_name(name.replace("train", "test")).write_bytes(content)
    with pytest.raises(DataError) as e:
      load_natural_transfer("femnist", str(path))
    assert str(path) in str(e.value) and len(str(e.value).splitlines()) == 1
  write_hdf5(tmp_path / "w_train.h5", {"a": {"pixels": np.zeros((2, 27, 28)),
                                             "label": np.zeros(2, int)}})
  write_hdf5(tmp_path / "w_test.h5", {"a": {"pixels": np.zeros((2, 28, 28)),
                                            "label": np.zeros(2, int)}})
  with pytest.raises(DataError, match=r"'pixels'.*shape \(2, 27, 28\)"):
    load_natural_transfer("femnist", str(tmp_path / "w_train.h5"))


def test_missing_file_says_where_to_get_it(tmp_path):
  with pytest.raises(DataError, match="storage.googleapis.com/gresearch"):
    load_natural_transfer("femnist", str(tmp_path / "nope.sqlite"))


# -- config and CLI --

def test_config_defaults_num_clients_to_the_files(femnist_files):
  root = femnist_files[0]
  cfg = config_lib.default_config()
  cfg.data, cfg.data_path, cfg.clients_per_round = "femnist", str(root), 2
  validated = config_lib.validate(cfg)
  assert validated.num_clients == 3 and validated.pretrain == "none"
  cfg.pretrain = "source"
  with pytest.raises(ConfigError, match="config.pretrain='source'"):
    config_lib.validate(cfg)


@pytest.mark.parametrize("damage", ["truncated", "dtype", "missing"])
def test_cli_bad_natural_file_exits_2_and_writes_nothing(
    femnist_files, capsys, damage):
  root = femnist_files[0]
  path = (root / "absent.sqlite" if damage == "missing" else
          _damage_sqlite(root, damage))
  workdir = root / "w"
  code = cli.main(["run", f"--workdir={workdir}", "--no-progress",
                   "--config.data=femnist", f"--config.data_path={path}",
                   "--config.clients_per_round=2", "--config.num_clients=3",
                   "--config.model=mlp", "--config.hidden=(8,)"])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1 and str(path) in err, err
  assert not workdir.exists()


@pytest.mark.slow
def test_a_run_on_a_natural_file_records_its_data_facts(tmp_path):
  sizes = {f"w{i}": 2 + i % 4 for i in range(8)}
  write_sqlite(tmp_path / "federated_emnist_train.sqlite",
               _femnist_features(_images(sizes, 8)))
  write_sqlite(tmp_path / "federated_emnist_test.sqlite",
               _femnist_features(_images({c: 1 for c in sizes}, 9)))
  rng = np.random.default_rng(0)
  np.savez(tmp_path / "src.npz", source_x=rng.random((20, 28, 28, 1)),
           source_y=rng.integers(0, 10, 20))
  workdir = tmp_path / "w"
  code = cli.main(["run", f"--workdir={workdir}", "--no-progress",
                   "--config.data=femnist", f"--config.data_path={tmp_path}",
                   f"--config.source={tmp_path / 'src.npz'}",
                   "--config.max_client_examples=4",
                   "--config.clients_per_round=4", "--config.num_rounds=1",
                   "--config.eval_every=1", "--config.pretrain_steps=2",
                   "--config.local_test_examples=0", "--config.hidden=(8,)",
                   "--config.chunk_size=4", "--config.batch_size=2",
                   "--config.local_steps=1"])
  assert code == 0
  summary = json.loads((workdir / "summary.json").read_text())
  facts = summary["data_facts"]
  real = sum(min(n, 4) for n in sizes.values())
  assert summary["num_clients"] == 8 and summary["pretrain"] == "source"
  assert facts["client_examples"] == real and facts["padded_width"] == 4
  assert facts["padding_waste"] == round((8 * 4 - real) / real, 4)
  assert facts["examples_cut"] == sum(max(0, n - 4) for n in sizes.values())


@pytest.mark.parametrize("overrides,needle", [
    (dict(data="stackoverflow", data_path="x"), "its task is not built yet"),
    (dict(data="shakespeare", data_path="x"), "cannot read text"),
    (dict(data="femnist"), "needs config.data_path"),
    (dict(data_path="x"), "is for natural data"),
    (dict(source="cifar10"), "is for natural data"),
])
def test_config_refuses_natural_keys_out_of_place(overrides, needle):
  cfg = config_lib.default_config()
  for key, value in overrides.items():
    cfg[key] = value
  with pytest.raises(ConfigError, match=needle) as e:
    config_lib.validate(cfg)
  assert len(str(e.value).splitlines()) == 1


def test_a_round_on_femnist_writers_equals_the_per_client_loop(tmp_path):
  from conftest import assert_rounds_agree, small_simulation
  from fedjax_tl.models import build_model
  sizes = {f"f{i:04d}_00": 1 + (i * 7) % 11 for i in range(40)}  # skewed
  write_sqlite(tmp_path / "federated_emnist_train.sqlite",
               _femnist_features(_images(sizes, 4)))
  write_sqlite(tmp_path / "federated_emnist_test.sqlite",
               _femnist_features(_images({c: 1 for c in sizes}, 5)))
  data = load_natural_transfer("femnist", str(tmp_path),
                               max_client_examples=8)
  model = build_model("mlp", (28, 28, 1), 62, seed=0, hidden=(16, 8))
  assert_rounds_agree(small_simulation(model_def=model, data=data.clients))


def test_an_emnist_source_is_turned_upright_as_femnist_is(femnist_files,
                                                          monkeypatch):
  # tfds stores EMNIST transposed (tensorflow/datasets#812); FEMNIST's
  # writers are upright, so the source is transposed to match.
  from fedjax_tl.data import tfds_source
  from fedjax_tl.data.federated import Dataset
  from fedjax_tl.data.natural.source import with_source
  tmp_path, _, _ = femnist_files
  image = np.zeros((1, 28, 28, 1), np.float32)
  image[0, 2, 20] = 1.0  # row 2, column 20
  part = Dataset(x=image, y=np.zeros(1, np.int32))
  monkeypatch.setattr(tfds_source, "load_tfds_splits",
                      lambda *a, **k: (part, part, 10))
  data = load_natural_transfer("femnist", str(tmp_path))
  for source, where in (("emnist/digits", (20, 2)), ("mnist", (2, 20))):
    x = with_source(data, source).source_train.x
    assert x[0, where[0], where[1], 0] == 1.0 and x.sum() == 1.0
