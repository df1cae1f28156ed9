"""FedScale traces: safe loading, validation, client mapping, availability."""

import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_tl import traces
from fedjax_tl.errors import DataError

CAPACITY = {5: {"computation": 12.5, "communication": 800.0},
            2: {"computation": 40.0, "communication": 2500.0},
            9: {"computation": 7.0, "communication": 150.5}}
BEHAVE = {
    3: {"duration": 100, "inactive": [20, 70], "finish_time": 100,
        "active": [10, 50], "model": "Pixel"},
    1: {"duration": 50, "inactive": [49], "finish_time": 50, "active": [0],
        "model": "iPhone"},
}


def _write(path, obj, fmt):
  if fmt == "pickle":
    path.write_bytes(pickle.dumps(obj))
  else:
    path.write_text(json.dumps(obj))
  return path


@pytest.mark.parametrize("fmt", ["pickle", "json"])
def test_loads_both_formats_alike(tmp_path, fmt):
  # The extension says nothing: the format is read from the content.
  cap = traces.load_device_capacity(_write(tmp_path / "cap.bin", CAPACITY,
                                           fmt))
  beh = traces.load_behave_trace(_write(tmp_path / "beh.bin", BEHAVE, fmt))
  assert cap == CAPACITY and beh == BEHAVE
  assert all(isinstance(k, int) for k in (*cap, *beh))


def test_old_pickle_protocol_loads(tmp_path):
  path = tmp_path / "cap"
  path.write_bytes(pickle.dumps(CAPACITY, protocol=0))
  assert traces.load_device_capacity(path) == CAPACITY


class Payload:
  """Unpickling this would run a shell command."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


class Custom:
  pass


def test_reduce_payload_is_refused_and_never_runs(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "client_behave_trace"
  path.write_bytes(pickle.dumps({1: Payload(marker)}))
  # The stream really carries the call (posix.system on Linux).
  assert b"system" in path.read_bytes()
  with pytest.raises(DataError) as e:
    traces.load_behave_trace(path)
  message = str(e.value)
  assert str(path) in message and "system" in message and "\n" not in message
  assert not marker.exists()


def test_custom_class_is_refused(tmp_path):
  path = tmp_path / "cap.pkl"
  path.write_bytes(pickle.dumps({1: Custom()}))
  with pytest.raises(DataError, match=r"refused to unpickle global .*Custom"):
    traces.load_device_capacity(path)


def test_numpy_scalar_is_refused(tmp_path):
  path = tmp_path / "cap.pkl"
  path.write_bytes(pickle.dumps(
      {1: {"computation": np.float64(3.0), "communication": 5.0}}))
  with pytest.raises(DataError, match="refused to unpickle global numpy"):
    traces.load_device_capacity(path)


@pytest.mark.parametrize("raw,needle", [
    (b"\x80\x04garbage", "not a valid trace pickle"),
    (b"", "not a valid trace pickle"),
    (b'{"1": {"computation": 1,', "invalid JSON"),
    (b"\xff\xfe{", "not a valid trace pickle"),
])
def test_corrupt_files(tmp_path, raw, needle):
  path = tmp_path / "t"
  path.write_bytes(raw)
  with pytest.raises(DataError, match=needle):
    traces.load_device_capacity(path)


def test_missing_file(tmp_path):
  with pytest.raises(DataError, match="cannot read"):
    traces.load_behave_trace(tmp_path / "absent.pkl")


def _behave(**changes):
  entry = {"duration": 10, "inactive": [5, 9], "finish_time": 10,
           "active": [1, 6], "model": "m"}
  entry.update(changes)
  return {4: dict(BEHAVE[1]), 17: {k: v for k, v in entry.items()
                                   if v is not None}}


@pytest.mark.parametrize("trace,needle", [
    (_behave(active=None), "missing key 'active'"),
    (_behave(finish_time=None), "missing key 'finish_time'"),
    (_behave(active=[1]), "'active' has 1 entries but 'inactive' has 2"),
    (_behave(active=[1, -6]), "'active' must be a list of non-negative"),
    (_behave(inactive="5,9"), "'inactive' must be a list"),
    (_behave(active=[1, 7.5], inactive=[5, 7]), "interval 1 ends before"),
    (_behave(finish_time=0), "'finish_time' must be a positive"),
    (_behave(finish_time="10"), "'finish_time' must be a positive"),
    (_behave(duration=-1), "'duration' must be a non-negative"),
    (_behave(model=3), "'model' must be a string"),
    ({4: dict(BEHAVE[1]), 17: [1, 2]}, "entry must be a dict"),
])
@pytest.mark.parametrize("fmt", ["pickle", "json"])
def test_malformed_behave_names_file_and_client(tmp_path, trace, needle, fmt):
  path = _write(tmp_path / "beh", trace, fmt)
  with pytest.raises(DataError) as e:
    traces.load_behave_trace(path)
  message = str(e.value)
  assert f"{path}: client 17: " in message and needle in message
  assert "\n" not in message


@pytest.mark.parametrize("entry,needle", [
    ({"communication": 1.0}, "missing key 'computation'"),
    ({"computation": -2.0, "communication": 1.0}, "'computation' must be a "
     "positive number, got -2.0"),
    ({"computation": 2.0, "communication": "fast"}, "'communication' must"),
    ({"computation": 2.0, "communication": 0}, "'communication' must"),
    ({"computation": True, "communication": 1.0}, "'computation' must"),
    ({"computation": float("inf"), "communication": 1.0}, "'computation'"),
])
def test_malformed_capacity_names_file_and_client(tmp_path, entry, needle):
  path = _write(tmp_path / "cap", {1: CAPACITY[2], "phone-x": entry},
                "pickle")
  with pytest.raises(DataError) as e:
    traces.load_device_capacity(path)
  assert f"client 'phone-x': {needle}" in str(e.value)
  assert str(path) in str(e.value)


@pytest.mark.parametrize("obj,fmt,needle", [
    ([1, 2], "pickle", "non-empty dict"), ([1, 2], "json", "non-empty dict"),
    ({}, "json", "non-empty dict"), ({1.5: {}}, "pickle", "client id 1.5"),
    (3, "pickle", "non-empty dict")])
def test_top_level_must_be_a_dict_of_ids(tmp_path, obj, fmt, needle):
  path = _write(tmp_path / "cap", obj, fmt)
  with pytest.raises(DataError, match=needle) as e:
    traces.load_device_capacity(path)
  assert str(e.value).startswith(f"{path}: ")


def test_clients_map_to_sorted_keys_modulo():
  # Sorted keys are [2, 5, 9]: device i gets keys[i % 3].
  assert traces.assign_traces(7, CAPACITY) == [2, 5, 9, 2, 5, 9, 2]
  ms, kbps = traces.capacity_arrays(CAPACITY, 4)
  np.testing.assert_array_equal(ms, np.float32([40.0, 12.5, 7.0, 40.0]))
  np.testing.assert_array_equal(kbps, np.float32([2500, 800, 150.5, 2500]))
  assert traces.trace_keys({"b": 0, 3: 0, "a": 0, 1: 0}) == [1, 3, "a", "b"]


def test_interval_arrays_are_padded():
  # Sorted keys [1, 3]: devices 0, 2 get client 1, device 1 client 3.
  iv = traces.availability_intervals(BEHAVE, 3)
  inf = np.inf
  np.testing.assert_array_equal(iv.starts, [[0, inf], [10, 50], [0, inf]])
  np.testing.assert_array_equal(iv.ends, [[49, -inf], [20, 70], [49, -inf]])
  np.testing.assert_array_equal(iv.finish_time, [50, 100, 50])
  # Online shares: 49/50 and (10 + 20)/100.
  np.testing.assert_allclose(traces.online_fraction(*iv),
                             [0.98, 0.3, 0.98], rtol=1e-6)


def _available_loop(t, starts, ends, finish):
  out = []
  for d in range(len(finish)):
    norm = t[d] % finish[d]
    out.append(any(s <= norm <= e for s, e in zip(starts[d], ends[d])))
  return out


def test_available_at_matches_a_python_loop():
  rng = np.random.default_rng(0)
  devices, k = 200, 4
  behave = {}
  for d in range(devices):
    finish = int(rng.integers(2 * k, 60))
    n = int(rng.integers(0, k + 1))
    cuts = np.sort(rng.choice(np.arange(finish), size=2 * n, replace=False))
    behave[d] = {"active": cuts[0::2].tolist(), "inactive": cuts[1::2].tolist(),
                 "finish_time": finish}
  behave = traces.validate_behave(behave, "random")
  iv = traces.availability_intervals(behave, devices)
  fn = jax.jit(traces.available_at)
  for _ in range(5):
    # Times up to 4 periods, so the modulo wraps; integers hit boundaries.
    t = rng.integers(0, 240, devices)
    starts = [behave[d]["active"] for d in range(devices)]
    ends = [behave[d]["inactive"] for d in range(devices)]
    finish = [behave[d]["finish_time"] for d in range(devices)]
    expected = _available_loop(t, starts, ends, finish)
    got = fn(jnp.asarray(t, jnp.float32), *map(jnp.asarray, iv))
    np.testing.assert_array_equal(got, expected)
    # The draw covers both outcomes.
    assert any(expected) and not all(expected)


def test_available_at_scalar_time_and_boundaries():
  iv = traces.availability_intervals(BEHAVE, 2)  # devices: client 1, 3
  # Intervals are inclusive at both ends; t=120 is 20 in client 3's period.
  for t, expected in ((0, [True, False]), (10, [True, True]),
                      (20, [True, True]), (21, [True, False]),
                      (49, [True, False]), (50, [True, True]),
                      (120, [True, True]), (160, [True, True]),
                      (175, [True, False]),
                      (49.5, [False, False]), (99, [True, False])):
    np.testing.assert_array_equal(traces.available_at(t, *iv), expected,
                                  err_msg=f"t={t}")
