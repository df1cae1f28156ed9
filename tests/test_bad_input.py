"""Bad input: data files, trace files and configs end in one-line errors.

Each fault is checked for the error class and the file or key it names;
the property-based tests (hypothesis) feed random configs, overrides,
arrays and trace structures to the validation and loading layer, which
may only succeed or raise ConfigError / DataError / UserError.
"""

import json
import os
import pickle

import hypothesis
import ml_collections
import numpy as np
import pytest
from hypothesis import strategies as st

from conftest import tiny_config_dict
from fedjax_tl import cli, runner, traces
from fedjax_tl import config as config_lib
from fedjax_tl.data.npz_source import load_npz_transfer
from fedjax_tl.errors import ConfigError, DataError

CLIENTS, EXAMPLES, SHAPE, CLASSES = 6, 5, (4, 4, 1), 3
# 50 fixed examples each in CI; FEDJAX_TL_PROPERTY_EXAMPLES=N searches N
# fresh random ones.
_EXAMPLES = int(os.environ.get("FEDJAX_TL_PROPERTY_EXAMPLES", 0))
PROPERTY = hypothesis.settings(
    max_examples=_EXAMPLES or 50, derandomize=not _EXAMPLES, deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck))


def _arrays(seed=0):
  """A valid npz data set: 6 clients of 1-5 examples, 4x4x1, 3 classes."""
  rng = np.random.default_rng(seed)
  count = rng.integers(1, EXAMPLES + 1, CLIENTS)
  return dict(
      num_classes=np.int64(CLASSES),
      source_x=rng.random((20, *SHAPE), np.float32),
      source_y=rng.integers(0, CLASSES, 20),
      clients_x=rng.random((CLIENTS, EXAMPLES, *SHAPE), np.float32),
      clients_y=rng.integers(0, CLASSES, (CLIENTS, EXAMPLES)),
      clients_count=count,
      test_x=rng.random((10, *SHAPE)), test_y=rng.integers(0, CLASSES, 10))


def _save(path, arrays):
  with open(path, "wb") as f:
    np.savez(f, **arrays)
  return path


def _set(key, index, value):
  def mutate(a):
    a[key] = np.array(a[key], dtype=np.result_type(a[key], type(value)))
    a[key][index] = value
  return mutate


def _replace(key, value):
  return lambda a: a.__setitem__(key, value)


@pytest.mark.parametrize("mutate,needle", [
    (_set("clients_y", (1, 0), 3), "clients labels outside [0, 3) in 1 "
     "(first at index (1, 0)) examples (e.g. 3)"),
    (_set("test_y", 4, -1), "target_test labels outside [0, 3)"),
    (_set("source_x", (2, 0, 0, 0), np.nan),
     "source_train has non-finite (NaN or Inf) features in 1 (first at "
     "index 2) examples"),
    (_set("clients_x", (0, 0, 1, 1, 0), np.inf), "clients has non-finite"),
    (_set("clients_count", 3, 0), "clients has 1 client(s) without examples "
     "(first: client 3)"),
    (_set("clients_count", 0, EXAMPLES + 1), "clients counts must be in "
     "[0, 5]"),
    (_replace("clients_y", np.zeros((CLIENTS, EXAMPLES + 1), int)),
     "clients has features of shape (6, 5, 4, 4, 1) but labels of shape "
     "(6, 6)"),
    (_replace("source_y", np.zeros(19, int)), "source_train has features "
     "of shape (20, 4, 4, 1) but labels of shape (19,)"),
    (_replace("test_x", np.zeros((10, 4, 4, 2))), "target_test features are "
     "(4, 4, 2), but the clients' are (4, 4, 1)"),
    (_replace("test_y", np.zeros(10)), "test_y must hold integers"),
    (_replace("source_x", np.full((20, *SHAPE), "a")),
     "source_x must hold real numbers"),
    (_replace("num_classes", np.arange(3)), "num_classes must be a scalar"),
    (lambda a: a.pop("test_y"), "missing array(s) test_y"),
    (lambda a: a.__setitem__("clients_cnt", a.pop("clients_count")),
     "unknown array 'clients_cnt' (did you mean 'clients_count'?)"),
    (lambda a: a.__setitem__("source_test_x", a["test_x"]),
     "source_test_x without source_test_y"),
])
def test_bad_npz_data_is_a_data_error_naming_file_and_problem(
    tmp_path, mutate, needle):
  arrays = _arrays()
  mutate(arrays)
  path = _save(tmp_path / "mine.npz", arrays)
  with pytest.raises(DataError) as e:
    load_npz_transfer(path, CLIENTS)
  assert str(e.value).startswith(f"{path}: ") and needle in str(e.value)


def test_npz_padding_is_ignored_and_zeroed(tmp_path):
  arrays = _arrays()
  arrays["clients_count"][:] = 2
  arrays["clients_x"][:, 2:] = np.nan  # padding: never read
  arrays["clients_y"][:, 2:] = 99
  data = load_npz_transfer(_save(tmp_path / "ok.npz", arrays), CLIENTS)
  assert not data.clients.x[:, 2:].any() and not data.clients.y[:, 2:].any()
  np.testing.assert_array_equal(data.clients.x[:, :2],
                                arrays["clients_x"][:, :2])
  assert data.clients.y.dtype == np.int32 and data.num_classes == CLASSES
  assert data.source_test is data.target_test


@pytest.mark.slow
def test_npz_data_set_runs_end_to_end(tmp_path):
  path = _save(tmp_path / "mine.npz", _arrays())
  cfg = config_lib.validate(tiny_config_dict(
      data=str(path), num_clients=CLIENTS, clients_per_round=3, num_rounds=1,
      hidden=(8,), pretrain_steps=5, chunk_size=3))
  summary = runner.run(cfg, tmp_path / "w", quiet=True)
  assert summary["data"] == "mine.npz" and summary["rounds"] == 1
  assert summary["local_accuracy"] is None  # no client_test_* arrays


@pytest.mark.parametrize("content,needle", [
    (b"not a zip at all", "not a readable .npz archive"),
    (None, "no such data file"),
    ("truncated", "not a readable .npz archive"),
    ("pickled", "not a readable .npz archive"),
    ("clients", "holds 6 clients but config.num_clients=7"),
])
def test_unreadable_npz_file(tmp_path, content, needle):
  path = tmp_path / "data.npz"
  if content == "truncated":
    raw = _save(path, _arrays()).read_bytes()
    path.write_bytes(raw[:len(raw) * 2 // 3])
  elif content == "pickled":  # object arrays are refused, never unpickled
    _save(path, dict(_arrays(), test_y=np.array([{"a": 1}], dtype=object)))
  elif content == "clients":
    _save(path, _arrays())
  elif content is not None:
    path.write_bytes(content)
  with pytest.raises(DataError, match="^" + str(path)) as e:
    load_npz_transfer(path, 7 if content == "clients" else CLIENTS)
  assert needle in str(e.value)


def _cli(capsys, workdir, *overrides):
  code = cli.main(["run", f"--workdir={workdir}", "--no-progress",
                   "--config.num_clients=6", "--config.clients_per_round=3",
                   *overrides])
  err = capsys.readouterr().err.strip()
  return code, err


@pytest.mark.parametrize("kind", ["npz", "behave", "capacity"])
def test_cli_bad_file_exits_2_with_one_line_and_writes_nothing(
    tmp_path, capsys, kind):
  bad = tmp_path / "bad.npz"
  if kind == "npz":
    arrays = _arrays()
    arrays["clients_y"][0, 0] = 7
    _save(bad, arrays)
    flags = [f"--config.data={bad}"]
  else:  # a trace of the other kind: valid JSON, wrong format
    other = ({0: {"computation": 5.0, "communication": 800.0}}
             if kind == "behave" else
             {0: {"active": [0], "inactive": [5], "finish_time": 10}})
    bad.write_text(json.dumps(other))
    flags = [f"--config.{'behave' if kind == 'behave' else 'device'}_trace="
             f"{bad}", "--config.hidden=(8,)", "--config.pretrain=none"]
  code, err = _cli(capsys, tmp_path / "w", *flags)
  assert code == 2 and len(err.splitlines()) == 1, err
  assert err.startswith(f"error: {bad}: ")
  assert {"npz": "labels outside", "behave": "missing key 'active'",
          "capacity": "missing key 'computation'"}[kind] in err
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("source,needle", [
    ("def get_config():\n  raise KeyError('lr')\n",
     "get_config() raised KeyError: 'lr'"),
    ("def get_config():\n  return {'seed': 0}\n",
     "get_config() returned a dict, not a ConfigDict"),
    ("def get_config(:\n", "cannot load"),
])
def test_cli_bad_config_file_exits_2_with_one_line(tmp_path, capsys, source,
                                                   needle):
  path = tmp_path / "mine.py"
  path.write_text(source)
  code, err = _cli(capsys, tmp_path / "w", f"--config={path}")
  assert code == 2 and len(err.splitlines()) == 1 and needle in err, err


# -- config relations --

@pytest.mark.parametrize("overrides,needle", [
    (dict(clients_per_round=61), "config.clients_per_round=61: must be <= "
     "num_clients (60)"),
    (dict(tier_fractions=(1.0, 0.0)), "in (0, 1]"),
    (dict(tier_fractions=(1.0, 1.5)), "in (0, 1]"),
    (dict(tier_proportions=(0.5, 0.3, 0.1, 0.05)), "sum to 1"),
    (dict(data=3), "config.data=3: must be digits"),
    (dict(seed=2**31), "config.seed=2147483648: must be < 2**31"),
    (dict(alpha=10**400), "must be a finite number"),
    (dict(compare_policies=(["heterofl"],)), "config.compare_policies"),
    (dict(device_classes=(["x"], "a", "b", "c")), "config.device_classes"),
    (dict(pretrain="bad\0path"), "config.pretrain="),
    (dict(capacity_mix="a1-b1", tier_fractions=3), "config.capacity_mix"),
    (dict(eval_every=0), "config.eval_every=0: must be >= 1"),
    (dict(dp=1), "config.dp=1: must be True or False"),
    (dict(dp=True, dp_noise_multiplier=-1.0),
     "config.dp_noise_multiplier=-1.0: must be >= 0"),
    (dict(dp=True, dp_clip_norm=0.0), "config.dp_clip_norm=0.0: must be > 0"),
    (dict(dp=True, dp_delta=1.0), "config.dp_delta=1.0: must be in (0, 1)"),
    (dict(dp=True, dp_accountant="gdp"), "config.dp_accountant='gdp': must "
     "be one of rdp, pld"),
    (dict(dp=True, dp_target_quantile=1.0), "config.dp_target_quantile"),
    (dict(dp=True, dp_adaptive_clip=True, dp_noise_multiplier=4.0,
          dp_count_noise=1.0), "config.dp_count_noise=1.0: must be > "
     "dp_noise_multiplier / 2 (2)"),
    (dict(dp=True, aggregator="median"), "config.aggregator='median': must "
     "be 'mean' with dp=True"),
    (dict(dp=True, policy="hetlora"), "config.policy='hetlora': cannot run "
     "with dp=True"),
    (dict(dp=True, overcommit=1.5), "config.overcommit=1.5: must be 1 with "
     "dp=True"),
])
def test_config_relations_and_types(overrides, needle):
  raw = tiny_config_dict().to_dict()
  raw.update(overrides)  # a plain dict: no ConfigDict type checks first
  with pytest.raises(ConfigError) as e:
    config_lib.validate(ml_collections.ConfigDict(raw))
  assert needle in str(e.value)


# -- property-based: random input, only our errors or success --

_SCALARS = (st.none() | st.booleans() | st.integers(-2**40, 2**40) |
            st.integers() | st.floats(allow_nan=True, allow_infinity=True) |
            st.text(max_size=8))
_VALUES = _SCALARS | st.tuples(_SCALARS) | st.lists(_SCALARS, max_size=4).map(
    tuple) | st.lists(_SCALARS, max_size=3)
_KEYS = sorted(config_lib.default_config().keys())


@PROPERTY
@hypothesis.given(changes=st.dictionaries(
    st.sampled_from(_KEYS) | st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
    _VALUES,
    max_size=3))
def test_random_config_values_validate_or_raise_config_error(changes):
  raw = tiny_config_dict().to_dict()
  raw.update(changes)
  try:
    cfg = config_lib.validate(ml_collections.ConfigDict(raw))
  except ConfigError as e:
    hypothesis.event("ConfigError")
    assert "\n" not in str(e) and str(e).startswith("config.")
  else:
    hypothesis.event("valid")
    assert cfg.clients_per_round <= cfg.num_clients
    assert abs(sum(cfg.tier_proportions) - 1) < 1e-6


class _Validated(Exception):
  """Raised by the stubbed runner once the CLI has validated everything."""


@PROPERTY
@hypothesis.given(overrides=st.lists(st.tuples(
    st.sampled_from(_KEYS) | st.text(max_size=6),
    st.sampled_from(["1", "-1", "0.5", "1e999", "nan", "(1,", "()", "None",
                     "True", "'x'", "[1, 2]", "(0.5, 0.5)", "digits", ""])
    | st.text(max_size=10)), max_size=3))
def test_random_cli_overrides_exit_2_with_one_line_or_validate(
    overrides, monkeypatch, capsys):
  def stub(cfg, *args, **kwargs):
    assert isinstance(cfg, config_lib.ExperimentConfig)
    raise _Validated
  monkeypatch.setattr(runner, "run", stub)
  flags = [f"--config.{key}={value}" for key, value in overrides]
  try:
    code = cli.main(["run", "--no-progress", "--workdir=/nonexistent/w",
                     *flags])
  except _Validated:
    hypothesis.event("validated")
    return
  hypothesis.event("exit 2")
  err = capsys.readouterr().err
  assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err


_DTYPES = st.sampled_from([np.float32, np.float64, np.int64, np.uint8,
                           np.bool_, np.complex64, "<U2"])


@st.composite
def _malformed_arrays(draw):
  """A valid data set with up to three random faults."""
  arrays = _arrays(draw(st.integers(0, 3)))
  for _ in range(draw(st.integers(1, 3))):
    key = draw(st.sampled_from(sorted(arrays) + ["client_test_x", "extra"]))
    fault = draw(st.sampled_from(["drop", "random", "nan", "label", "count",
                                  "shape"]))
    if fault == "drop":
      arrays.pop(key, None)
    elif fault == "random" or key not in arrays:
      shape = tuple(draw(st.lists(st.integers(0, 4), max_size=4)))
      arrays[key] = np.zeros(shape, draw(_DTYPES))
    elif fault == "shape" and arrays[key].ndim:
      arrays[key] = arrays[key][:max(0, arrays[key].shape[0] - 1)]
    elif arrays[key].size:
      value = {"nan": np.nan, "label": draw(st.integers(-5, 10)),
               "count": draw(st.integers(-1, 7))}.get(fault, 0)
      flat = np.array(arrays[key], np.result_type(arrays[key], type(value)))
      flat.reshape(-1)[draw(st.integers(0, flat.size - 1))] = value
      arrays[key] = flat
  return arrays


@PROPERTY
@hypothesis.given(arrays=_malformed_arrays())
def test_random_malformed_npz_loads_or_raises_data_error(tmp_path_factory,
                                                         arrays):
  path = _save(tmp_path_factory.mktemp("npz") / "d.npz", arrays)
  try:
    data = load_npz_transfer(path, CLIENTS)
  except DataError as e:
    hypothesis.event("DataError")
    assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
  else:  # what loads is what the simulation may assume
    real = data.clients.mask
    assert data.clients.count.min() >= 1 and np.isfinite(data.clients.x).all()
    assert ((data.clients.y[real] >= 0) &
            (data.clients.y[real] < data.num_classes)).all()
    hypothesis.event("loaded")


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(
        max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["active", "inactive", "finish_time", "duration",
                         "model", "computation", "communication", "0", "x"]),
        inner, max_size=5), max_leaves=12)


_NUMBER = st.integers(-2, 10**6) | st.floats(-1, 1e7) | st.sampled_from(
    [float("nan"), float("inf"), 10**40, True, "3"])


@st.composite
def _trace_entry(draw):
  """A plausible entry of either trace kind, perhaps with a bad field."""
  starts = sorted(draw(st.lists(st.floats(0, 1e5), max_size=3)))
  entry = {"active": starts,
           "inactive": [t + draw(st.floats(0, 100)) for t in starts],
           "finish_time": draw(_NUMBER), "computation": draw(_NUMBER),
           "communication": draw(_NUMBER)}
  if draw(st.booleans()):
    entry[draw(st.sampled_from(sorted(entry) + ["duration", "model"]))] = (
        draw(_JSON))
  return entry


@PROPERTY
@hypothesis.given(trace=st.dictionaries(st.integers(0, 5) | st.text(
    max_size=3), _trace_entry() | _JSON, max_size=3), as_pickle=st.booleans(),
                  cut=st.none() | st.integers(0, 40))
def test_random_trace_files_load_or_raise_data_error(tmp_path_factory, trace,
                                                     as_pickle, cut):
  path = tmp_path_factory.mktemp("trace") / "t"
  raw = pickle.dumps(trace) if as_pickle else json.dumps(trace).encode()
  path.write_bytes(raw if cut is None else raw[:cut])
  for load in (traces.load_behave_trace, traces.load_device_capacity):
    try:
      loaded = load(path)
    except DataError as e:
      hypothesis.event(f"{load.__name__}: DataError")
      assert str(e).startswith(f"{path}") and "\n" not in str(e)
      continue
    hypothesis.event(f"{load.__name__}: loaded")
    if load is traces.load_behave_trace:  # usable as loaded
      traces.online_fraction(*traces.availability_intervals(loaded, 7))
    else:
      traces.capacity_arrays(loaded, 7)
