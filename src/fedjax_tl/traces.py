"""FedScale-format device traces: safe loading, validation, per-device arrays.

Reads `client_device_capacity` (speed, bandwidth) and `client_behave_trace`
(online intervals) from local pickle or JSON files without executing anything,
and turns them into padded arrays that jit-compiled code can query.
"""

from __future__ import annotations

import io
import json
import math
import pathlib
import pickle
from typing import Any, Hashable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_tl.errors import DataError

CapacityTrace = dict[Hashable, dict[str, float]]
BehaveTrace = dict[Hashable, dict[str, Any]]


class _RefusedGlobal(Exception):
  """Raised inside the unpickler when the stream names any global."""


class _RestrictedUnpickler(pickle.Unpickler):
  """Accepts only the pickle opcodes for plain containers and scalars.

  Every class, function or reduce callable reaches the unpickler through
  `find_class`; refusing all of them leaves dicts, lists, tuples, sets,
  numbers, strings, bytes, bools and None, so a trace file cannot run code.
  """

  def find_class(self, module: str, name: str) -> Any:
    raise _RefusedGlobal(f"{module}.{name}")


def _short(value: Any, limit: int = 60) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _int_keys(pairs: list[tuple[str, Any]]) -> dict[Any, Any]:
  # JSON keys are strings; FedScale's client ids are ints. Converting decimal
  # keys makes a JSON trace map clients exactly like its pickled twin.
  return {int(k) if k.removeprefix("-").isdecimal() else k: v
          for k, v in pairs}


def load_trace_file(path: str | pathlib.Path) -> Any:
  """Reads a trace file: JSON if it starts with `{` or `[`, else a pickle.

  The format is decided by content, not extension: `{` and `[` are not pickle
  opcodes, so no pickle starts with them. In JSON, object keys that are
  decimal integers become ints, as FedScale's pickled client ids are. Pickles
  go through an unpickler that refuses every global.

  Raises:
    DataError: unreadable file, invalid JSON or pickle, or a pickle that names
      any global (class, function), which is refused, never imported.
  """
  path = pathlib.Path(path)
  try:
    raw = path.read_bytes()
  except OSError as e:
    raise DataError(f"{path}: cannot read trace file ({e.strerror or e})"
                    ) from None
  if raw.lstrip()[:1] in (b"{", b"["):
    try:
      return json.loads(raw.decode("utf-8"), object_pairs_hook=_int_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise DataError(f"{path}: invalid JSON trace ({e})") from None
    except RecursionError:
      raise DataError(f"{path}: invalid JSON trace (nested too deeply)"
                      ) from None
  try:
    return _RestrictedUnpickler(io.BytesIO(raw)).load()
  except _RefusedGlobal as e:
    raise DataError(f"{path}: refused to unpickle global {e}; trace pickles "
                    "may hold only dicts, lists, numbers and strings"
                    ) from None
  except Exception as e:  # pylint: disable=broad-except
    # A corrupt stream can fail with almost any exception type.
    raise DataError(f"{path}: not a valid trace pickle "
                    f"({type(e).__name__}: {_short(str(e))})") from None


def _is_number(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def _check_top(path: pathlib.Path, trace: Any) -> None:
  if not isinstance(trace, dict) or not trace:
    raise DataError(f"{path}: a trace must be a non-empty dict of client id "
                    f"-> entry, got {_short(trace)}")
  for cid in trace:
    if isinstance(cid, bool) or not isinstance(cid, (int, str)):
      raise DataError(f"{path}: client id {_short(cid)} must be an int or "
                      "a string")


def validate_capacity(trace: Any, path: str | pathlib.Path) -> CapacityTrace:
  """Checks a `client_device_capacity` trace; returns it as plain floats.

  Each entry must hold `computation` (ms per sample, > 0) and `communication`
  (kbit/s, > 0); other keys are ignored.

  Raises:
    DataError: naming the file, the client and the problem.
  """
  path = pathlib.Path(path)
  _check_top(path, trace)
  out = {}
  for cid, entry in trace.items():
    where = f"{path}: client {cid!r}"
    if not isinstance(entry, dict):
      raise DataError(f"{where}: entry must be a dict, got {_short(entry)}")
    for key in ("computation", "communication"):
      if key not in entry:
        raise DataError(f"{where}: missing key {key!r}")
      value = entry[key]
      if not _is_number(value) or value <= 0:
        raise DataError(f"{where}: {key!r} must be a positive number, got "
                        f"{_short(value)}")
    out[cid] = {"computation": float(entry["computation"]),
                "communication": float(entry["communication"])}
  return out


def validate_behave(trace: Any, path: str | pathlib.Path) -> BehaveTrace:
  """Checks a `client_behave_trace`.

  Required per client: `active` and `inactive` (equal-length lists of
  non-negative times, `active[i] <= inactive[i]`) and `finish_time` (> 0).
  `duration` (non-negative number) and `model` (string) are checked when
  present; the simulation does not use them, and some traces omit them.

  Raises:
    DataError: naming the file, the client and the problem.
  """
  path = pathlib.Path(path)
  _check_top(path, trace)
  for cid, entry in trace.items():
    where = f"{path}: client {cid!r}"
    if not isinstance(entry, dict):
      raise DataError(f"{where}: entry must be a dict, got {_short(entry)}")
    for key in ("active", "inactive", "finish_time"):
      if key not in entry:
        raise DataError(f"{where}: missing key {key!r}")
    for key in ("active", "inactive"):
      times = entry[key]
      if not isinstance(times, (list, tuple)) or not all(
          _is_number(t) and t >= 0 for t in times):
        raise DataError(f"{where}: {key!r} must be a list of non-negative "
                        f"numbers, got {_short(times)}")
    active, inactive = entry["active"], entry["inactive"]
    if len(active) != len(inactive):
      raise DataError(f"{where}: 'active' has {len(active)} entries but "
                      f"'inactive' has {len(inactive)}")
    for i, (start, end) in enumerate(zip(active, inactive)):
      if start > end:
        raise DataError(f"{where}: interval {i} ends before it starts "
                        f"(active {start!r} > inactive {end!r})")
    finish = entry["finish_time"]
    if not _is_number(finish) or finish <= 0:
      raise DataError(f"{where}: 'finish_time' must be a positive number, got "
                      f"{_short(finish)}")
    if "duration" in entry and not (_is_number(entry["duration"])
                                    and entry["duration"] >= 0):
      raise DataError(f"{where}: 'duration' must be a non-negative number, "
                      f"got {_short(entry['duration'])}")
    if "model" in entry and not isinstance(entry["model"], str):
      raise DataError(f"{where}: 'model' must be a string, got "
                      f"{_short(entry['model'])}")
  return trace


def load_device_capacity(path: str | pathlib.Path) -> CapacityTrace:
  """Loads and validates a `client_device_capacity` file (pickle or JSON)."""
  return validate_capacity(load_trace_file(path), path)


def load_behave_trace(path: str | pathlib.Path) -> BehaveTrace:
  """Loads and validates a `client_behave_trace` file (pickle or JSON)."""
  return validate_behave(load_trace_file(path), path)


def trace_keys(trace: Mapping[Hashable, Any]) -> list[Hashable]:
  """The trace's client ids in a fixed order (ints first, then strings)."""
  return sorted(trace, key=lambda k: (isinstance(k, str), k))


def assign_traces(num_devices: int,
                  trace: Mapping[Hashable, Any]) -> list[Hashable]:
  """The trace key of each device: `keys[device % len(keys)]` (FedScale's rule).

  Device `i` plays client id `i`; keys are sorted so the mapping does not
  depend on how the file was written.
  """
  keys = trace_keys(trace)
  return [keys[i % len(keys)] for i in range(num_devices)]


def capacity_arrays(capacity: CapacityTrace,
                    num_devices: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-device `(ms_per_sample[devices], kbps[devices])`, float32.

  FedScale's trace has one bandwidth for both directions; pass `kbps` as both
  `down_kbps` and `up_kbps` to the cost model.
  """
  keys = assign_traces(num_devices, capacity)
  ms = np.asarray([capacity[k]["computation"] for k in keys], np.float32)
  kbps = np.asarray([capacity[k]["communication"] for k in keys], np.float32)
  return ms, kbps


class Intervals(NamedTuple):
  """Online intervals, padded to a common count.

  Attributes:
    starts: `[devices, K]` interval starts; padding is `+inf`.
    ends: `[devices, K]` interval ends (inclusive); padding is `-inf`, so a
      padded slot never contains any time.
    finish_time: `[devices]` period of each device's trace.
  """
  starts: np.ndarray
  ends: np.ndarray
  finish_time: np.ndarray


def availability_intervals(behave: BehaveTrace, num_devices: int) -> Intervals:
  """Padded float32 interval arrays for each device's assigned trace.

  K is the most intervals any assigned trace has (at least 1). Times are
  float32: integer times are exact up to 2**24 s (about 194 days).
  """
  keys = assign_traces(num_devices, behave)
  k = max(1, max(len(behave[key]["active"]) for key in keys))
  starts = np.full((num_devices, k), np.inf, np.float32)
  ends = np.full((num_devices, k), -np.inf, np.float32)
  for i, key in enumerate(keys):
    n = len(behave[key]["active"])
    starts[i, :n] = behave[key]["active"]
    ends[i, :n] = behave[key]["inactive"]
  finish = np.asarray([behave[key]["finish_time"] for key in keys], np.float32)
  return Intervals(starts, ends, finish)


def available_at(t: jax.Array | float, starts: jax.Array, ends: jax.Array,
                 finish_time: jax.Array) -> jax.Array:
  """Whether each device is online at time `t` (seconds). Usable under jit.

  A device is online when `starts[d, i] <= t mod finish_time[d] <= ends[d, i]`
  for some interval i: its trace repeats with period `finish_time`.

  Args:
    t: a scalar time, or `[devices]` times (one per device).
    starts: `[devices, K]` interval starts, `+inf` padding.
    ends: `[devices, K]` interval ends, `-inf` padding.
    finish_time: `[devices]` trace periods.

  Returns:
    `[devices]` bool.
  """
  norm = jnp.mod(t, finish_time)[..., None]
  return jnp.any((starts <= norm) & (norm <= ends), axis=-1)


def seconds_until_online(t: jax.Array | float, starts: jax.Array,
                         finish_time: jax.Array) -> jax.Array:
  """Seconds from time `t` until some device's next online interval starts.

  Starts are taken strictly after `t mod finish_time[d]`, wrapping into the
  next period; usable under jit. 0 when no device has any interval.

  Args:
    t: a scalar time (seconds).
    starts: `[devices, K]` interval starts, `+inf` padding.
    finish_time: `[devices]` trace periods.

  Returns:
    float32 `[]` seconds.
  """
  norm = jnp.mod(t, finish_time)[..., None]
  wait = jnp.where(starts > norm, starts - norm,
                   starts + finish_time[..., None] - norm)
  soonest = jnp.min(wait)
  return jnp.where(jnp.isfinite(soonest), soonest, 0.0).astype(jnp.float32)


def online_fraction(starts: np.ndarray, ends: np.ndarray,
                    finish_time: np.ndarray) -> np.ndarray:
  """`[devices]` share of each period spent online, a per-round probability.

  Intervals are clipped to `[0, finish_time]` and assumed not to overlap
  (FedScale's are disjoint); a device with no interval gets 0.
  """
  finish = np.asarray(finish_time, np.float64)[:, None]
  lo = np.clip(np.asarray(starts, np.float64), 0, finish)
  hi = np.clip(np.asarray(ends, np.float64), 0, finish)
  online = np.where(np.isfinite(starts), np.maximum(hi - lo, 0), 0).sum(-1)
  return np.clip(online / finish[:, 0], 0, 1).astype(np.float32)
