"""The natural data sets' published setups: configs/femnist.py,
configs/shakespeare.py and configs/cifar100.py.

Their real files are not on this machine: each config is checked on small
fixture files written here in fedjax's SQLite or TFF's HDF5 format, and the
tfds sources of the transfer variants come from `tfds.testing.mock_data`.
The published values below are transcribed by hand from the publishers'
files (each assertion names its file).
"""

import json
import math
import pathlib

import jax
import numpy as np
import pytest

from conftest import tfds_mock_data
from fedjax_tl import models, runner
from fedjax_tl.config import apply_overrides, load_config, validate
from fedjax_tl.errors import ConfigError

h5py = pytest.importorskip("h5py")
msgpack = pytest.importorskip("msgpack")
from natural_files import write_hdf5, write_roles, write_sqlite  # noqa: E402

CONFIGS = pathlib.Path(__file__).parent.parent / "configs"
# Fixture clients: more than a published cohort of 10, of uneven sizes.
FEMNIST_SIZES = {f"f{i:04d}_{i % 7:02d}": 1 + (i * 5) % 7 for i in range(12)}
CIFAR_SIZES = [3, 1, 2, 4, 2, 1, 3, 2, 1, 2, 3, 1]
WORDS = ["to", "be", "or", "not", "my", "lord", "the", "king", "é"]


def _femnist(root):
  rng = np.random.default_rng(0)
  for split, sizes in (("train", FEMNIST_SIZES),
                       ("test", {c: 1 for c in FEMNIST_SIZES})):
    write_sqlite(root / f"federated_emnist_{split}.sqlite", {
        c: {"pixels": rng.random((n, 28, 28)).astype(np.float32),
            "label": rng.integers(0, 62, n).astype(np.int32)}
        for c, n in sizes.items()})
  return root


def _cifar100(root):
  rng = np.random.default_rng(1)
  for split, sizes in (("train", CIFAR_SIZES), ("test", (2, 3))):
    write_hdf5(root / f"fed_cifar100_{split}.h5", {
        str(c): {"image": rng.integers(0, 256, (n, 32, 32, 3)).astype(
                     np.uint8),
                 "label": rng.integers(0, 100, n),
                 "coarse_label": rng.integers(0, 20, n)}
        for c, n in enumerate(sizes)})
  return root


def _shakespeare(root):
  """12 roles; each one's last snippet is its test text (as TFF splits)."""
  rng = np.random.default_rng(2)
  roles = {f"ROLE{i}": [" ".join(rng.choice(WORDS, rng.integers(20, 60)))
                        for _ in range(2 + i % 3)] for i in range(12)}
  write_roles(root, roles)
  return root, roles


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("natural")
  for name in ("femnist", "cifar100", "shakespeare"):
    (root / name).mkdir()
  _, roles = _shakespeare(root / "shakespeare")
  return {"femnist": _femnist(root / "femnist"),
          "cifar100": _cifar100(root / "cifar100"),
          "shakespeare": root / "shakespeare", "roles": roles}


def _load(name, variant):
  return load_config(f"{CONFIGS / name}.py:{variant}")


def _sequences(snippets):
  """80-character sequences of snippets framed by BOS/EOS, by hand."""
  return math.ceil((sum(len(s.encode()) + 2 for s in snippets) - 1) / 80)


# Every setup: all of the files' clients, 10 a round (each publisher's
# clients per round), all online, the full model, plain client SGD.
COMMON = dict(clients_per_round=10, min_availability=1.0, policy="full",
              tier_fractions=(1.0,), tier_proportions=(1.0,),
              client_momentum=0.0, weight_decay=0.0, num_clients=12,
              masked_ce=False)
# google-research/federated optimization/docs/hyperparameters.md: the
# "Default values" table (clients per round, batch size, total rounds) and
# the best client / server learning rates and epsilon (log10), by task.
REDDI = {
    ("femnist", "fedavg"): dict(batch_size=20, num_rounds=1500,
                                algorithm="fedavg", client_lr=10 ** -1,
                                server_lr=10 ** 0),
    ("femnist", "fedadam"): dict(batch_size=20, num_rounds=1500,
                                 algorithm="fedadam", client_lr=10 ** -1.5,
                                 server_lr=10 ** -2.5, server_eps=10 ** -4),
    ("femnist", "fedyogi"): dict(batch_size=20, num_rounds=1500,
                                 algorithm="fedyogi", client_lr=10 ** -1.5,
                                 server_lr=10 ** -2.5, server_eps=10 ** -4),
    ("shakespeare", "fedavg"): dict(batch_size=4, num_rounds=1200,
                                    algorithm="fedavg", client_lr=10 ** 0,
                                    server_lr=10 ** 0),
    ("shakespeare", "fedadam"): dict(batch_size=4, num_rounds=1200,
                                     algorithm="fedadam", client_lr=10 ** 0,
                                     server_lr=10 ** -2, server_eps=10 ** -3),
    ("shakespeare", "fedyogi"): dict(batch_size=4, num_rounds=1200,
                                     algorithm="fedyogi", client_lr=10 ** 0,
                                     server_lr=10 ** -2, server_eps=10 ** -3),
    ("cifar100", "fedavg"): dict(batch_size=20, num_rounds=4000,
                                 algorithm="fedavg", client_lr=10 ** -1,
                                 server_lr=10 ** 0.5),
    ("cifar100", "fedadam"): dict(batch_size=20, num_rounds=4000,
                                  algorithm="fedadam", client_lr=10 ** -1.5,
                                  server_lr=10 ** 0, server_eps=10 ** -1),
    ("cifar100", "fedyogi"): dict(batch_size=20, num_rounds=4000,
                                  algorithm="fedyogi", client_lr=10 ** -1.5,
                                  server_lr=10 ** 0, server_eps=10 ** -1),
}
# google/fedjax experiments/fed_avg/fed_avg.EMNIST_CONV.flags and
# fed_avg.SHAKESPEARE_CHARACTER.flags (server Adam = this engine's fedadam;
# beta2 0.99 in the flags, the engine's too).
FEDJAX = {
    "femnist": dict(num_rounds=1500, algorithm="fedadam", server_lr=1.0,
                    server_eps=0.01, client_lr=0.001, batch_size=10),
    "shakespeare": dict(num_rounds=1500, algorithm="fedavg", server_lr=1.0,
                        client_lr=0.03162278, batch_size=10),
}
# The models: google-research/federated utils/models/emnist_models.py
# create_conv_dropout_model / fedjax/models/emnist.py ConvDropoutModule;
# fedjax/models/shakespeare.py create_lstm_model() (embed_size=8,
# lstm_hidden_size=256, lstm_num_layers=2); google-research/federated
# optimization/README.md "ResNet-18 (with GroupNorm layers)", its group
# count tfa's default in 2020 (2).
MODELS = {"femnist": dict(model="simple_cnn"),
          "shakespeare": dict(model="lstm", embed_dim=8, hidden=(256, 256)),
          "cifar100": dict(model="resnet18", norm="group", norm_groups=2,
                           resnet_widths=(64, 128, 256, 512))}


def _epoch(name, files, batch_size):
  """One local epoch of the fixture's mean client, in steps, by hand."""
  if name == "femnist":
    sizes = list(FEMNIST_SIZES.values())
  elif name == "cifar100":
    sizes = CIFAR_SIZES
  else:
    sizes = [_sequences(s[:-1]) for s in files["roles"].values()]
  return max(1, math.ceil(sum(sizes) / len(sizes) / batch_size))


def _cases():
  for (name, method) in REDDI:
    yield name, method
  for name in FEDJAX:
    yield name, "fedjax"


@pytest.mark.parametrize("name,method", list(_cases()))
def test_each_config_validates_to_the_published_settings(files, name,
                                                         method):
  config = _load(name, f"method={method},data_path={files[name]}")
  cfg = validate(config)
  published = REDDI.get((name, method)) or FEDJAX[name]
  want = {**COMMON, **MODELS[name], **published, "data": name,
          "data_path": str(files[name]), "source": "none",
          "pretrain": "none",
          "local_steps": _epoch(name, files, published["batch_size"])}
  for key, value in want.items():
    got = getattr(cfg, key)
    if isinstance(value, float):
      assert got == pytest.approx(value, rel=1e-9), (name, method, key)
    else:
      assert got == value, (name, method, key)


def test_the_published_epochs_without_the_files(files):
  # tensorflow_federated/python/simulation/datasets/emnist.py
  # (only_digits=False): 3,400 users, 671,585 train examples; one epoch
  # of the mean writer: ceil(197.5 / 20) = 10 steps, ceil(197.5 / 10) = 20.
  assert _load("femnist", "").local_steps == 10
  assert _load("femnist", "method=fedjax").local_steps == 20
  # .../datasets/cifar100.py: "Each client has 100 samples"; 100 / 20.
  assert _load("cifar100", "method=fedadam").local_steps == 5
  # --config.data_path instead of the variant: the same config, validated.
  config = apply_overrides(_load("femnist", ""),
                           [("data_path", repr(str(files["femnist"])))])
  assert validate(config).num_clients == 12


def test_transfer_variants_set_their_source(files):
  femnist = validate(_load("femnist", "source=emnist/digits,data_path="
                           f"{files['femnist']}"))
  assert (femnist.source, femnist.pretrain) == ("emnist/digits", "source")
  cifar = validate(_load("cifar100",
                         f"source=cifar10,data_path={files['cifar100']}"))
  assert (cifar.source, cifar.pretrain) == ("cifar10", "source")
  # CIFAR-10's labels name other classes than CIFAR-100's: a new head.
  assert cifar.pretrain_reinit == ("head/.*",) and not femnist.pretrain_reinit
  assert cifar.algorithm == "fedavg" and cifar.num_rounds == 4000


@pytest.mark.parametrize("name,variant,named", [
    ("femnist", "method=fedprox", "method='fedprox'"),
    ("femnist", "source=emnist/letters", "source='emnist/letters'"),
    ("femnist", "alpha=0.1", "alpha='0.1'"),
    ("cifar100", "source=mnist", "source='mnist'"),
    ("cifar100", "method=fedjax", "method='fedjax'"),
    ("shakespeare", "model=mlp,data_path=x", "model='mlp'"),
    ("shakespeare", "method=fedavg", "data_path=FILE_OR_DIR"),
])
def test_bad_variants_are_one_line_naming_them(name, variant, named):
  with pytest.raises(ConfigError) as e:
    _load(name, variant)
  assert named in str(e.value) and len(str(e.value).splitlines()) == 1


def _parameters(cfg, shape, classes):
  """The config's model's parameter count (shapes only, no compilation)."""
  def init():
    return models.build_model(
        cfg.model, shape, classes, seed=0,
        **{k: getattr(cfg, k) for k in models.Options._fields}).init_params
  return sum(math.prod(a.shape) for a in jax.tree.leaves(jax.eval_shape(init)))


def test_the_models_are_built_at_their_sizes(files):
  femnist = validate(_load("femnist", f"data_path={files['femnist']}"))
  # google-research/federated utils/models/emnist_models.py,
  # create_conv_dropout_model's docstring (only_digits=True): 1,199,882.
  assert _parameters(femnist, (28, 28, 1), 10) == 1_199_882
  # 62 classes: the last dense layer 128 x 62 + 62 instead of 128 x 10 + 10.
  assert _parameters(femnist, (28, 28, 1), 62) == 1_199_882 - 1_290 + 7_998
  # CIFAR-100's resnet18 (GroupNorm, 2 groups): the 10-class model's
  # 11,173,962 (docs/models.md) plus 90 more head rows of 512 + 1.
  cifar = validate(_load("cifar100", f"data_path={files['cifar100']}"))
  assert _parameters(cifar, (32, 32, 3), 100) == 11_173_962 + 90 * 513


def _tiny(config, **extra):
  overrides = dict(clients_per_round=3, local_steps=1, batch_size=2,
                   num_rounds=2, eval_every=1, checkpoint_every=2,
                   local_test_examples=0, **extra)
  return validate(apply_overrides(config, [(k, repr(v))
                                           for k, v in overrides.items()]))


def test_a_tiny_run_of_the_shakespeare_config(files, tmp_path):
  cfg = _tiny(_load("shakespeare", f"data_path={files['shakespeare']}"),
              hidden=(8, 8), embed_dim=4)
  summary = runner.run(cfg, tmp_path, quiet=True, progress=False)
  assert summary["rounds"] == 2 and summary["num_clients"] == 12
  assert summary["pretrain"] == "none" and 0 <= summary["accuracy"] <= 1
  sequences = sum(_sequences(s[:-1]) for s in files["roles"].values())
  assert summary["data_facts"]["client_examples"] == sequences
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["model"] == "lstm" and saved["algorithm"] == "fedavg"


def test_a_tiny_run_of_the_femnist_transfer_config(files, tmp_path):
  # The transfer variant: the server pretrains on (mock) tfds
  # emnist/digits, then the writers train the published CNN.
  cfg = _tiny(_load("femnist", "method=fedyogi,source=emnist/digits,"
                    f"data_path={files['femnist']}"), pretrain_steps=2,
              pretrain_batch_size=4, max_client_examples=4)
  with tfds_mock_data(16):
    summary = runner.run(cfg, tmp_path, quiet=True, progress=False)
  assert summary["rounds"] == 2 and summary["num_clients"] == 12
  assert summary["pretrain"] == "source" and 0 <= summary["accuracy"] <= 1
  assert summary["data_facts"]["source_examples"] == 16
  assert summary["data_facts"]["examples_cut"] == sum(
      max(0, n - 4) for n in FEMNIST_SIZES.values())


def test_the_cifar100_transfer_source_loads_under_the_clients(files):
  from fedjax_tl.experiment.build import load_data
  cfg = validate(_load("cifar100", "method=fedyogi,source=cifar10,"
                       f"data_path={files['cifar100']}"))
  with tfds_mock_data(12):
    data = load_data(cfg)
  assert data.num_classes == 100 and data.input_shape == (32, 32, 3)
  assert data.source_train.x.shape[1:] == (32, 32, 3)
  assert data.source_train.y.max() < 10  # CIFAR-10's labels, head kept
  # TFF's ids sorted as strings, as HDF5ClientData lists them.
  assert data.clients.client_ids == tuple(sorted(str(i) for i in range(12)))
  assert data.client_test is None and len(data.target_test) == 5
