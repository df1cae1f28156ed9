"""Shared fixtures: tiny experiments that compile and run in seconds."""

import contextlib
import os
import pathlib
import signal
import sys
import tempfile
import warnings
from unittest import mock

# The tests' programs are small and brief, and compiling them is most of
# the suite's time: XLA:CPU's code generation at its lowest optimisation
# level compiles them about a third faster (the ResNet round tests of
# test_norms: 238 s to 165 s, cold), and its older elemental emitters
# instead of the fusion emitters about 40% faster again (130 s to 79 s),
# from the same HLO. Set before jax starts; subprocesses inherit them (and
# so share the cache).
FAST_COMPILE = ("--xla_backend_optimization_level=0",
                "--xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = " ".join(filter(None, [
    os.environ.get("XLA_FLAGS"),
    *(flag for flag in FAST_COMPILE
      if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""))]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import fedjax_tl  # noqa: E402
from fedjax_tl import config as config_lib  # noqa: E402
from fedjax_tl.data.federated import FederatedData  # noqa: E402

# Tests build many simulations whose programs are identical HLO; XLA:CPU
# compilation dominates their time, so share compiled programs on disk.
COMPILATION_CACHE = {
    "JAX_COMPILATION_CACHE_DIR": str(
        pathlib.Path(__file__).parent.parent / ".pytest_cache" / "jax"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2"}
jax.config.update("jax_compilation_cache_dir",
                  COMPILATION_CACHE["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


@pytest.fixture(autouse=True)
def _signal_handlers_kept(request):
  """Each test starts with the worker's SIGINT / SIGTERM handlers: one left
  changed is put back, with a warning naming the test, so no later test in
  the worker sees it. (A suite started in the background inherits SIGINT
  ignored, and the notebooks' event loop installs Python's default handler
  in its place; a test that needs a handler sets it.)"""
  before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  yield
  for signum, handler in before.items():
    now = signal.getsignal(signum)
    if now is not handler:
      signal.signal(signum, handler)
      warnings.warn(f"{request.node.nodeid} left {signum.name} handled by "
                    f"{now!r}; put back")


@contextlib.contextmanager
def tfds_mock_data(num_examples):
  """`tfds.testing.mock_data` (skips without tensorflow-datasets), with
  /tmp left as it was: a builder without prepared data makes a
  `/tmp/tmp*tfds` folder it never removes (DatasetInfo's
  initialize_from_bucket), so temporary files go to a folder removed here."""
  tfds = pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("array_record")
  with tempfile.TemporaryDirectory(prefix="fedjax-tl-tfds-") as scratch, \
      mock.patch.object(tempfile, "tempdir", scratch), \
      tfds.testing.mock_data(num_examples=num_examples,
                             policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def tiny_config(**overrides):
  """A validated config small enough for unit tests."""
  return config_lib.validate(tiny_config_dict(**overrides))


def tiny_config_dict(**overrides):
  """The ConfigDict behind `tiny_config`."""
  cfg = config_lib.default_config()
  cfg.num_clients = 60
  cfg.clients_per_round = 12
  cfg.hidden = (16, 8)
  cfg.num_rounds = 4
  cfg.local_steps = 3
  cfg.batch_size = 5
  cfg.pretrain_steps = 30
  cfg.eval_every = 2
  cfg.checkpoint_every = 2
  cfg.chunk_size = 4
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


@pytest.fixture
def tiny_cfg():
  return tiny_config


def cli_args(workdir, **overrides):
  """`python -m fedjax_tl run` of `tiny_config(**overrides)`, every key a
  flag: the same programs as the in-process runs of the tiny config."""
  cfg = tiny_config(**overrides).to_dict()
  flags = [f"--config.{k}={tuple(v) if isinstance(v, list) else v!r}"
           for k, v in cfg.items() if v is not None]
  return [sys.executable, "-m", "fedjax_tl", "run", f"--workdir={workdir}",
          "--no-progress", *flags]


def cli_env():
  """The environment of a CLI subprocess: the package's own source first (a
  plain checkout works too), and the tests' compilation cache, so the
  subprocess compiles little."""
  src = str(pathlib.Path(fedjax_tl.__file__).parents[1])
  return dict(os.environ, **COMPILATION_CACHE,
              PYTHONPATH=os.pathsep.join(
                  [src, *filter(None, [os.environ.get("PYTHONPATH")])]))


def signal_cli(command, *steps, timeout=300, delay=0.0):
  """Runs the CLI `command` (a subprocess) and, for each `(ready, signum)`
  of `steps` in turn, waits until `ready()` holds and then `delay` seconds
  more, then sends `signum`; returns the exit code and stderr once it
  ends. Each signal must find it still running."""
  import subprocess
  import time
  proc = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + timeout
    for ready, signum in steps:
      while proc.poll() is None and time.monotonic() < deadline and \
          not ready():
        time.sleep(0.0005)
      time.sleep(delay)
      assert proc.poll() is None, f"finished first: {proc.stderr.read()}"
      proc.send_signal(signum)
    _, err = proc.communicate(timeout=timeout)
  finally:
    proc.kill()
    proc.wait()
  return proc.returncode, err


# `python -c PAUSED_WRITE NAME ARGS...`: the fedjax-tl command ARGS, whose
# atomic write of a file named NAME (files.write_text_atomic) stops
# for good just before its rename: the temporary file is there, the file
# not yet replaced, so a kill lands mid-write, where a random moment hits
# only rarely (the write takes a millisecond).
PAUSED_WRITE = """
import os, sys, time
name = sys.argv.pop(1)
replace = os.replace
def paused(src, dst, *args, **kwargs):
  if os.path.basename(os.fspath(dst)) == name:
    time.sleep(3600)
  return replace(src, dst, *args, **kwargs)
os.replace = paused
from fedjax_tl.cli import entry
entry()
"""


def paused_writing(command, name):
  """The CLI `command` (`python -m fedjax_tl ...`, as `cli_args`) run so
  that its atomic write of the file `name` never completes (see
  PAUSED_WRITE): its temporary file stays, for a kill to find."""
  assert command[1:3] == ["-m", "fedjax_tl"], command[:3]
  return [command[0], "-c", PAUSED_WRITE, name, *command[3:]]


def writing(path):
  """Whether an atomic write of `path` is in flight: its temporary file
  (`.NAME.XXXXXXXX.tmp`, `tempfile.mkstemp`'s name) exists."""
  import glob
  path = pathlib.Path(path)
  return any(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))


def partial_files(root):
  """What interrupted writes left under `root`: the temporary files of
  atomic writes (a planted symlink aside) and orbax's temporary
  directories; relative paths."""
  return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                if not p.is_symlink() and (p.name.endswith(".tmp") or
                                           "orbax-checkpoint-tmp" in p.name))


def snapshot(root):
  """Every entry under `root`: a file's bytes, a link's target, a dir."""
  if not os.path.lexists(root):
    return {}
  out = {}
  for path in sorted(root.rglob("*")):
    rel = str(path.relative_to(root))
    if path.is_symlink():
      out[rel] = ("link", os.readlink(path))
    elif path.is_dir():
      out[rel] = "dir"
    else:
      out[rel] = path.read_bytes()
  return out


def strict_lines(path):
  """A JSON / JSON-lines file parsed strictly (NaN or Infinity fails)."""
  import json
  path = pathlib.Path(path)

  def refuse(name):
    raise AssertionError(f"{path.name} holds {name}")
  text = path.read_text()
  if path.suffix == ".jsonl":
    return [json.loads(l, parse_constant=refuse) for l in text.splitlines()]
  return [json.loads(text, parse_constant=refuse)]


# Summary and metrics fields (and table columns) that describe the host,
# not the experiment.
HOST_FIELDS = ("wall_seconds", "free_bytes", "data_placement_reason",
               "server_seconds")


def host_free_records(workdir):
  """A run's metrics.jsonl records (strict JSON), host fields aside."""
  return [{k: v for k, v in r.items() if k not in HOST_FIELDS}
          for r in strict_lines(pathlib.Path(workdir) / "metrics.jsonl")]


def host_free_summary(workdir):
  """A run's summary.json (strict JSON), host fields aside."""
  summary = strict_lines(pathlib.Path(workdir) / "summary.json")[0]
  return {k: v for k, v in summary.items() if k not in HOST_FIELDS}


def host_free_table(path):
  """The rows of a CSV or markdown table file (of every table in it, other
  lines as they are), as lists of cells without the columns HOST_FIELDS
  names (each table's own header says which)."""
  path = pathlib.Path(path)
  markdown = path.suffix == ".md"
  rows, drop, previous = [], set(), ""
  for line in path.read_text().splitlines():
    if markdown and not line.startswith("|"):
      rows.append(line)
    else:
      cells = [c.strip() for c in (line.strip("|").split("|") if markdown
                                   else line.split(","))]
      if not rows or (markdown and not previous.startswith("|")):  # header
        drop = {i for i, c in enumerate(cells) if c in HOST_FIELDS}
      rows.append([c for i, c in enumerate(cells) if i not in drop])
    previous = line
  return rows


def disk_full_writing(name):
  """A fault (called with pytest's monkeypatch): the temporary file of
  `name` that write_text_atomic creates cannot be written, its file
  object's write raising ENOSPC as on a full disk (CI cannot mount a small
  disk)."""
  import errno

  def fault(monkeypatch):
    fdopen = os.fdopen

    def failing(fd, *args, **kwargs):
      f = fdopen(fd, *args, **kwargs)
      if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(
          f".{name}."):
        def write(*_):
          raise OSError(errno.ENOSPC, "No space left on device")
        f.write = write
      return f
    monkeypatch.setattr(os, "fdopen", failing)
  return fault


def disk_full_in_events(step):
  """A fault (called with pytest's monkeypatch): the TensorBoard event of
  step `step` (a metrics record's round) cannot be written, ENOSPC."""
  import errno

  def fault(monkeypatch):
    from tensorboardX import record_writer
    from tensorboardX.proto import event_pb2
    write = record_writer.RecordWriter.write

    def failing(self, data):
      if event_pb2.Event.FromString(data).step == step:
        raise OSError(errno.ENOSPC, "No space left on device")
      return write(self, data)
    monkeypatch.setattr(record_writer.RecordWriter, "write", failing)
  return fault


def nan_updates(build):
  """`make_client_update` (`build`) whose every update comes back NaN: a
  broken client library."""
  import jax.numpy as jnp

  def broken(*args, **kwargs):
    update = build(*args, **kwargs)

    def nan_update(*a, **k):
      delta, stats = update(*a, **k)
      return jax.tree.map(lambda d: d * jnp.nan, delta), stats
    return nan_update
  return broken


# `small_simulation`'s `tiers` for a round test of a big model on the tier
# fast path, which compiles the client once per tier: the full model and a
# 1/4 sub-model (the one with the fewest units, where slicing bites).
TWO_TIERS = ((1.0, 0.25), (0.5, 0.5))


def small_simulation(chunk_size=3, algorithm="fedavg", cohort=10,
                     availability=0.6, model="mlp", model_def=None, data=None,
                     client_options=None,
                     tiers=((1.0, 0.5, 0.25), (0.4, 0.3, 0.3)), **kwargs):
  """A 40-device, three-tier simulation of a tiny model on random data.

  `model` is "mlp" or "cnn"; `model_def` replaces it (e.g. an adapter model)
  and `data` the random 8x8x1 images (40 clients). `client_options` are
  further `make_client_update` keywords (e.g. `loss_ignored`).
  `tiers` is `(width fractions, proportions)` (see `TWO_TIERS`).
  `policy` names a registered policy and the keys of `policies.Options`
  (scaler, heterofl_mode, lora_*) are its options; other keyword arguments
  are `Simulation` fields.
  """
  from fedjax_tl import policies
  from fedjax_tl.algorithms import server_optimizer
  from fedjax_tl.client import client_optimizer, make_client_update
  from fedjax_tl.devices import make_population
  from fedjax_tl.models import build_model
  from fedjax_tl.simulation import Simulation
  data = random_federated(num_clients=40) if data is None else data
  population = make_population(40, *tiers, min_availability=availability,
                               seed=0)
  if model_def is None:
    model_def = build_model(model, (8, 8, 1), 10, seed=0, hidden=(16, 8),
                            cnn_channels=(4, 6), cnn_dense=8)
  update = make_client_update(model_def.apply, client_optimizer(0.2, 0.5),
                              local_steps=3, batch_size=4, mu=0.05,
                              dropout=model_def.has_dropout,
                              **(client_options or {}))
  options = {k: kwargs.pop(k) for k in policies.Options._fields
             if k in kwargs}
  kwargs["policy"] = policies.get(kwargs.pop("policy", "heterofl"), **options)
  lr = 0.05 if algorithm == "fedadam" else 1.0
  return Simulation.create(
      model_def, update, server_optimizer(algorithm, lr), data, population,
      cohort_size=cohort, chunk_size=chunk_size, local_steps=3, seed=7,
      **kwargs)


def random_federated(num_clients=40, max_examples=12, shape=(8, 8, 1),
                     classes=10, seed=0) -> FederatedData:
  """Random padded client data with varying counts (some below a batch)."""
  rng = np.random.default_rng(seed)
  count = rng.integers(2, max_examples + 1, num_clients).astype(np.int32)
  mask = np.arange(max_examples)[None] < count[:, None]
  x = rng.normal(size=(num_clients, max_examples, *shape)).astype(np.float32)
  x *= mask.reshape(*mask.shape, *([1] * len(shape)))
  y = (rng.integers(0, classes, (num_clients, max_examples)) * mask).astype(
      np.int32)
  return FederatedData(x, y, count)


def assert_trees_close(a, b, atol=2e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5,
                               atol=atol)


def assert_matches_reference(sim, params, rounds=2, atol=2e-6):
  """The masked round and the per-client reference loop give the same
  params for `rounds` rounds from `params`, with someone aggregated;
  returns the last state."""
  from fedjax_tl.simulation import reference_round
  state = sim.init(params)
  for _ in range(rounds):  # the second round starts from a trained model
    expected = reference_round(sim, state)
    state, stats = sim.round(state)
    assert_trees_close(state.params, expected.params, atol)
  assert int(stats.participants) > 0
  return state


def assert_rounds_agree(masked, rounds=2, atol=2e-6):
  """The tier fast path, the masked round and the per-client reference loop
  give the same states and stats for `rounds` rounds; returns the fast
  simulation."""
  import dataclasses
  from fedjax_tl.simulation import reference_round
  fast = dataclasses.replace(masked, tier_fast_path=True)
  state = fast_state = masked.init(masked.model.init_params)
  for _ in range(rounds):  # the second round starts from a trained model
    expected = reference_round(masked, state)
    state, stats = masked.round(state)
    fast_state, fast_stats = fast.round(fast_state)
    assert_trees_close(fast_state.params, expected.params, atol)
    assert_trees_close(fast_state.params, state.params, atol)
    assert_trees_close(fast_state.opt_state, state.opt_state)
    assert int(fast_state.round) == int(state.round)
    for name, total in state.totals.items():  # traffic, updates, time
      np.testing.assert_allclose(np.asarray(fast_state.totals[name]),
                                 np.asarray(total), rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(float(fast_stats.train_loss),
                               float(stats.train_loss), rtol=1e-5)
    assert int(fast_stats.participants) == int(stats.participants)
    assert float(fast_stats.held_fraction) == float(stats.held_fraction)
  assert int(stats.participants) > 0
  return fast
