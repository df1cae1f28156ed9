"""Trusting the work directory (issue 20): one owner, one identity, one
history, nothing clobbered, no silent wrong result.

A table of cases, each: what is done to a work directory (or the run), what
must happen (exit code, one line naming the cause), and what must survive
byte-identical. Every case asserts on the directory's content as well as on
the exit code. Runs are in-process through the CLI's `main`; only the lock
needs a second process.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import (cli_args, cli_env, disk_full_in_events,
                      disk_full_writing, host_free_records, nan_updates,
                      partial_files, signal_cli, snapshot, strict_lines,
                      tiny_config)
from fedjax_tl import runner
from fedjax_tl.cli import main
from fedjax_tl.errors import Stopped
from fedjax_tl.experiment import stops
from fedjax_tl.experiment import workdir as workdir_lib

BASE = dict(num_rounds=2)  # the finished run each resume case starts from
MORE = dict(num_rounds=4)  # the same experiment, asked for more rounds


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> pathlib.Path:
  """A finished 2-round run of the tiny config (copied by each case)."""
  workdir = tmp_path_factory.mktemp("base") / "run"
  runner.run(tiny_config(**BASE), workdir, quiet=True)
  return workdir


@dataclasses.dataclass
class Case:
  """What is done, what must happen, what must survive byte-identical."""
  name: str
  setup: Callable[[pathlib.Path, pathlib.Path], None]  # (workdir, tmp)
  code: int
  says: tuple[str, ...] = ()  # fragments of the one stderr line
  never_says: tuple[str, ...] = ()
  overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
  flags: tuple[str, ...] = ()
  from_base: bool = True  # start from a copy of the finished base run
  survive: tuple[str, ...] = ("*",)  # glob patterns; "*": the whole tree
  check: Callable[[pathlib.Path, pathlib.Path, dict], None] | None = None
  argv: Callable[[pathlib.Path, pathlib.Path], list[str]] | None = None
  fault: Callable[[pytest.MonkeyPatch], None] | None = None  # injected


# -- setups --

def _noop(workdir, tmp):
  del workdir, tmp


def _unlink(name):
  return lambda workdir, tmp: (workdir / name).unlink()


def _write(name, text):
  return lambda workdir, tmp: (workdir / name).write_text(text)


def _edit_metrics(edit):
  def setup(workdir, tmp):
    lines = (workdir / "metrics.jsonl").read_text().splitlines(True)
    (workdir / "metrics.jsonl").write_text("".join(edit(lines)))
  return setup


def _edited_record(lines):
  record = json.loads(lines[0])
  record["accuracy"] = 0.999
  return [json.dumps(record) + "\n", *lines[1:]]


def _other_config(workdir, tmp):
  (workdir / "config.json").write_text(json.dumps(
      tiny_config(**BASE, seed=3).to_dict(), indent=2) + "\n")


def _identity_dropped(workdir, tmp):
  meta = workdir / "checkpoints" / "2" / "digest" / "metadata"
  saved = json.loads(meta.read_text())
  del saved["identity"]
  meta.write_text(json.dumps(saved))


def _foreign_dir(workdir, tmp):
  workdir.mkdir()
  (workdir / "config.json").write_text('{"name": "my other tool"}')
  (workdir / "summary.json").write_text('{"theirs": 1}')
  (workdir / "checkpoints").mkdir()
  (workdir / "checkpoints" / "7").write_text("their checkpoint")


def _user_files(workdir, tmp):
  (workdir / "notes.txt").write_text("my notes")
  (workdir / "mydata").mkdir()
  (workdir / "mydata" / "clients.npz").write_bytes(b"\x00\x01")


def _planted_links(workdir, tmp):
  workdir.mkdir()
  (tmp / "victim.txt").write_text("must not change")
  for name in ("config.json", "metrics.jsonl", "summary.json",
               workdir_lib.MANIFEST):
    os.symlink(tmp / "victim.txt", workdir / f".{name}.tmp")


def _killed_writes(workdir, tmp):
  """What kill -9 during atomic writes leaves (a temporary file each), and
  a symlink planted at such a name."""
  (workdir / ".metrics.jsonl.k3x9a2qz.tmp").write_text('{"round": 3, "ha')
  (workdir / ".summary.json.0_ab9xyz.tmp").write_text("{")
  # orbax's temporary directory of a pretrained model being saved.
  half = workdir / "pretrained.orbax-checkpoint-tmp-1234567" / "d"
  half.mkdir(parents=True)
  (half / "0123abcd").write_bytes(b"\0" * 100)
  (tmp / "victim.txt").write_text("must not change")
  os.symlink(tmp / "victim.txt", workdir / ".config.json.abcdefgh.tmp")


def _damaged_checkpoint(workdir, tmp):
  for path in sorted((workdir / "checkpoints" / "2" / "state").rglob("*")):
    if path.is_file() and path.parent.name == "d":
      path.write_bytes(b"garbage")


def _config_file(body):
  def argv(workdir, tmp):
    path = tmp / "cfg.py"
    path.write_text(body)
    return ["run", f"--workdir={workdir}", "--no-progress",
            f"--config={path}"]
  return argv


def _npz_classes(num_classes):
  """A tiny `.npz` data set (6 clients, 4x4x1) declaring `num_classes`."""
  def argv(workdir, tmp):
    rng = np.random.default_rng(0)
    path = tmp / "classes.npz"
    np.savez(path, num_classes=np.int64(num_classes),
             source_x=rng.random((20, 4, 4, 1)), source_y=np.zeros(20, int),
             clients_x=rng.random((6, 5, 4, 4, 1)),
             clients_y=np.zeros((6, 5), int), clients_count=np.full(6, 5),
             test_x=rng.random((10, 4, 4, 1)), test_y=np.zeros(10, int))
    return cli_args(workdir, data=str(path), num_clients=6,
                    clients_per_round=4)[3:]
  return argv


# -- faults injected --

def _enospc(*args):
  return OSError(errno.ENOSPC, "No space left on device", *args)


def _no_event_file(workdir, tmp, before):
  _disk_full_at_round_4(False)(workdir, tmp, before)
  # The failed event file is removed; the next start replays the history.
  assert not list((workdir / "tensorboard").iterdir())


def _disk_full_in_orbax(cls, name):
  """orbax's `cls.save` of step (or path) `name` fails for lack of space,
  halfway: its temporary directory is left behind, as a real write's is."""
  def fault(monkeypatch):
    save = cls.save

    def failing(self, target, *args, **kwargs):
      where = (pathlib.Path(str(self.directory)) / str(target)
               if isinstance(target, int)
               else pathlib.Path(target))
      if where.name != name:
        return save(self, target, *args, **kwargs)
      tmp = where.with_name(f"{name}.orbax-checkpoint-tmp-1234567")
      (tmp / "state").mkdir(parents=True)
      (tmp / "state" / "half").write_bytes(b"\0" * 100)
      raise ValueError("tensorstore write failed") from _enospc()
    monkeypatch.setattr(cls, "save", failing)
  return fault


# -- checks after the command --

def _history_rebuilt(workdir, tmp, before):
  records = strict_lines(workdir / "metrics.jsonl")
  assert [r["round"] for r in records] == [0, 2, 4]
  summary = strict_lines(workdir / "summary.json")[0]
  assert summary["rounds"] == 4
  assert summary["initial_accuracy"] == records[0]["accuracy"]


def _base_history(base_dir):
  return (base_dir / "metrics.jsonl").read_text().splitlines(True)


def _checkpoint_identity(workdir):
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                 if p.name.isdigit())
  meta = json.loads((workdir / "checkpoints" / str(steps[-1]) / "digest" /
                     "metadata").read_text())
  return steps, meta


def _overwritten(workdir, tmp, before):
  steps, meta = _checkpoint_identity(workdir)
  assert steps == [2] and meta["identity"]["config"]["seed"] == 3
  assert json.loads((workdir / "config.json").read_text())["seed"] == 3


def _diverged_after_3(workdir, tmp, before):
  steps, meta = _checkpoint_identity(workdir)
  assert steps == [1, 2] and meta["round"] == 2
  assert meta["history"]["records"] == 3
  records = strict_lines(workdir / "metrics.jsonl")
  assert [r["round"] for r in records] == [0, 1, 2]
  assert not (workdir / "summary.json").exists()


def _diverged_at_once(workdir, tmp, before):
  assert not any(p.name.isdigit() for p in (workdir / "checkpoints").iterdir())
  assert [r["round"] for r in strict_lines(workdir / "metrics.jsonl")] == [0]
  assert not (workdir / "summary.json").exists()


def _nothing_created(workdir, tmp, before):
  assert not os.path.lexists(workdir)


def _links_kept(workdir, tmp, before):
  assert (tmp / "victim.txt").read_text() == "must not change"
  for name in ("config.json", "metrics.jsonl", "summary.json"):
    assert (workdir / f".{name}.tmp").is_symlink()
    strict_lines(workdir / name)
  assert not [p for p in workdir.iterdir() if p.name.endswith(".tmp")
              and not p.is_symlink()]


def _skipped_rounds_null(workdir, tmp, before):
  records = strict_lines(workdir / "metrics.jsonl")
  assert [r["train_loss"] for r in records] == [None, None, None]
  assert [r["skipped_rounds"] for r in records] == [0, 1, 2]
  for name in ("summary.json", "config.json",
               workdir_lib.MANIFEST):
    strict_lines(workdir / name)


def _disk_full_at_round_4(step_saved):
  def check(workdir, tmp, before):
    assert not partial_files(workdir)
    steps, _ = _checkpoint_identity(workdir)
    assert steps == ([2, 4] if step_saved else [2])
  return check


def _disk_full_fresh(*absent):
  def check(workdir, tmp, before):
    assert not partial_files(workdir)
    for name in absent:
      assert not os.path.lexists(workdir / name), name
  return check


def _stale_removed(workdir, tmp, before):
  assert not (workdir / ".metrics.jsonl.k3x9a2qz.tmp").exists()
  assert not (workdir / ".summary.json.0_ab9xyz.tmp").exists()
  assert not (workdir / "pretrained.orbax-checkpoint-tmp-1234567").exists()
  assert (workdir / ".config.json.abcdefgh.tmp").is_symlink()
  assert (tmp / "victim.txt").read_text() == "must not change"
  assert [r["round"] for r in strict_lines(workdir / "metrics.jsonl")] == [
      0, 2, 4]


def _report_not_written(workdir, tmp, before):
  out = tmp / "report"
  assert not partial_files(out) and not (out / "report.md").exists()
  assert list(out.glob("*.png"))  # the plots before it, whole


def _reported(workdir, tmp, before):
  assert (tmp / "report" / "report.md").exists()
  assert not any("corrupt" in p.name for p in
                 (workdir / "checkpoints").iterdir())


CASES = [
    # -- identity --
    Case("no config.json, another seed (break 1)", _unlink("config.json"),
         2, ("no config.json",), overrides=dict(BASE, seed=3, client_lr=0.01)),
    Case("no config.json, --overwrite, no manifest",
         lambda w, t: [_unlink("config.json")(w, t),
                       _unlink(workdir_lib.MANIFEST)(w, t)],
         2, ("neither config.json nor",), ("--overwrite",),
         overrides=dict(BASE, seed=3), flags=("--overwrite",)),
    Case("config.json swapped for another experiment's", _other_config, 2,
         ("checkpoint of round 2", "not this run's", "seed: 0 -> 3"),
         overrides=dict(BASE, seed=3)),
    Case("checkpoint without identity (older version)", _identity_dropped, 2,
         ("checkpoint of round 2", "no identity"), overrides=MORE),
    Case("num_rounds below the rounds done", _noop, 2,
         ("2 rounds done", "num_rounds=1"), overrides=dict(num_rounds=1)),
    # -- one history (break 2) --
    Case("metrics.jsonl missing", _unlink("metrics.jsonl"), 0,
         overrides=MORE, survive=("pretrained/**",), check=_history_rebuilt),
    Case("metrics.jsonl emptied", _write("metrics.jsonl", ""), 0,
         overrides=MORE, survive=("pretrained/**",), check=_history_rebuilt),
    Case("metrics.jsonl truncated mid-line",
         _edit_metrics(lambda lines: [lines[0], lines[1][:40]]), 0,
         overrides=MORE, survive=("pretrained/**",), check=_history_rebuilt),
    Case("metrics.jsonl with a blank line",
         _edit_metrics(lambda lines: [lines[0], "\n", *lines[1:]]), 0,
         overrides=MORE, survive=("pretrained/**",), check=_history_rebuilt),
    Case("metrics.jsonl with bad JSON",
         _edit_metrics(lambda lines: [lines[0], "{oops\n"]), 0,
         overrides=MORE, survive=("pretrained/**",), check=_history_rebuilt),
    Case("metrics.jsonl record edited by hand", _edit_metrics(_edited_record),
         0, overrides=MORE, survive=("pretrained/**",),
         check=_history_rebuilt),
    # -- nothing clobbered --
    Case("foreign config.json, --overwrite", _foreign_dir, 2,
         ("did not write",), ("--overwrite",), from_base=False,
         flags=("--overwrite",)),
    Case("--overwrite removes only our outputs", _user_files, 0,
         overrides=dict(BASE, seed=3), flags=("--overwrite",),
         survive=("notes.txt", "mydata/**"), check=_overwritten),
    Case("symlinks planted at the old temporary names", _planted_links, 0,
         overrides=BASE, from_base=False, survive=(), check=_links_kept),
    Case("temporary files of killed writes, and a planted link",
         _killed_writes, 0, overrides=MORE,
         survive=("pretrained/**", "checkpoints/2/**"),
         check=_stale_removed),
    # -- no silent wrong result --
    Case("global model NaN after round 3 (injected)", _noop, 3,
         ("round 3", "non-finite", "checkpoints/2 (round 2)"),
         overrides=dict(num_rounds=4, eval_every=1, checkpoint_every=1,
                        keep_checkpoints=3, pretrain="none"),
         from_base=False, survive=(), check=_diverged_after_3),
    Case("server_lr=1e30", _noop, 3, ("round 2", "non-finite",
                                      "No checkpoint was saved yet"),
         overrides=dict(num_rounds=2, server_lr=1e30, pretrain="none"),
         from_base=False, survive=(), check=_diverged_at_once),
    Case("pretraining diverges (pretrain_lr=1e30)", _noop, 3,
         ("pretraining", "diverged", "nothing was saved"),
         overrides=dict(BASE, pretrain_lr=1e30), from_base=False,
         survive=(), check=_nothing_created),
    Case("every update NaN: skipped rounds, strict JSON", _noop, 0,
         overrides=dict(num_rounds=2, eval_every=1, pretrain="none"),
         from_base=False, survive=(), check=_skipped_rounds_null),
    # -- refused up front --
    Case("config file calls sys.exit(0)", _noop, 2, ("sys.exit(0)",),
         from_base=False, survive=(), check=_nothing_created,
         argv=_config_file("import sys\nsys.exit(0)\n")),
    Case("config file raises", _noop, 2, ("cannot load", "boom"),
         from_base=False, survive=(), check=_nothing_created,
         argv=_config_file("raise RuntimeError('boom')\n")),
    # -- refused up front: a plan that cannot fit this machine's memory --
    Case("memory: num_clients=999999999999", _noop, 2,
         ("the plan needs", "999,999,999,999 clients", "available",
          "memory_check=False"), overrides=dict(num_clients=999_999_999_999),
         from_base=False, survive=(), check=_nothing_created),
    Case("memory: hidden=(100000000,), --overwrite", _noop, 2,
         ("the plan needs", "7,500,000,010 params"), ("--overwrite",),
         overrides=dict(BASE, hidden=(100_000_000,)), flags=("--overwrite",)),
    Case("memory: a .npz declaring num_classes=1e8", _noop, 2,
         ("the plan needs", "900,000,408 params"), from_base=False, survive=(),
         check=_nothing_created, argv=_npz_classes(100_000_000)),
    # -- disk full (ENOSPC) at each write site: one line, exit 1 --
    Case("disk full: config.json", _noop, 1,
         ("disk full writing", "config.json", "nothing partial"),
         overrides=MORE, fault=disk_full_writing("config.json")),
    Case("disk full: manifest", _noop, 1,
         ("disk full writing", workdir_lib.MANIFEST), overrides=BASE,
         from_base=False, survive=(),
         check=_disk_full_fresh(workdir_lib.MANIFEST, "config.json"),
         fault=disk_full_writing(workdir_lib.MANIFEST)),
    Case("disk full: metrics.jsonl (round 4's record)", _noop, 1,
         ("disk full writing", "metrics.jsonl"), overrides=MORE,
         survive=("metrics.jsonl", "summary.json", "checkpoints/2/**",
                  "pretrained/**"),
         check=_disk_full_at_round_4(False),
         fault=disk_full_writing("metrics.jsonl")),
    Case("disk full: summary.json", _noop, 1,
         ("disk full writing", "summary.json"), overrides=MORE,
         survive=("summary.json", "checkpoints/2/**", "pretrained/**"),
         check=_disk_full_at_round_4(True),
         fault=disk_full_writing("summary.json")),
    Case("disk full: TensorBoard events (round 4's record)", _noop, 1,
         ("disk full writing", "tensorboard/events", "TensorBoard events"),
         overrides=MORE, survive=("summary.json", "checkpoints/2/**",
                                  "pretrained/**"),
         check=_no_event_file, fault=disk_full_in_events(4)),
    Case("disk full: checkpoint of round 4 (orbax)", _noop, 1,
         ("disk full writing", "checkpoints/4", "checkpoint of round 4"),
         overrides=MORE, survive=("summary.json", "checkpoints/2/**",
                                  "pretrained/**"),
         check=_disk_full_at_round_4(False),
         fault=_disk_full_in_orbax(ocp.CheckpointManager, "4")),
    Case("disk full: the pretrained model (orbax)", _noop, 1,
         ("disk full writing", "pretrained", "the pretrained model"),
         overrides=BASE, from_base=False, survive=(),
         check=_disk_full_fresh("pretrained", "checkpoints/2"),
         fault=_disk_full_in_orbax(ocp.StandardCheckpointer, "pretrained")),
    Case("disk full: <policy>.json (the server's distillation cost)", _noop,
         1, ("disk full writing", "distill.json", "nothing partial"),
         overrides=dict(BASE, policy="distill", distill_steps=4),
         from_base=False, survive=(),
         check=_disk_full_fresh("distill.json", "checkpoints/2",
                                "summary.json"),
         fault=disk_full_writing("distill.json")),
    # -- readers never rename or delete --
    Case("report on a workdir with a damaged checkpoint", _damaged_checkpoint,
         0, check=_reported,
         argv=lambda w, t: ["report", str(w), f"--out={t / 'report'}"]),
    Case("disk full: report.md (report)", _noop, 1,
         ("disk full writing", "report.md", "nothing partial"),
         check=_report_not_written,
         argv=lambda w, t: ["report", str(w), f"--out={t / 'report'}"],
         fault=disk_full_writing("report.md")),
]


def _nan_after(round_index):
  """Simulation.rounds, but the global model turns NaN once it has run
  `round_index` rounds."""
  from fedjax_tl.simulation import Simulation
  rounds = Simulation.rounds

  def patched(self, state, num):
    state, stats = rounds(self, state, num)
    if int(state.round) >= round_index:
      state = state._replace(params=jax.tree.map(
          lambda p: p * jnp.nan, state.params))
    return state, stats
  return patched


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_workdir_case(case, base, tmp_path, capsys, monkeypatch):
  workdir = tmp_path / "run"
  if case.from_base:
    shutil.copytree(base, workdir, symlinks=True)
  case.setup(workdir, tmp_path)
  if case.name.startswith("global model NaN"):
    from fedjax_tl.simulation import Simulation
    monkeypatch.setattr(Simulation, "rounds", _nan_after(3))
  if case.name.startswith("every update NaN"):
    from fedjax_tl.experiment import build as build_lib
    monkeypatch.setattr(build_lib, "make_client_update",
                        nan_updates(build_lib.make_client_update))
  if case.fault is not None:
    case.fault(monkeypatch)
  before = snapshot(workdir)
  argv = (case.argv(workdir, tmp_path) if case.argv else
          [*cli_args(workdir, **case.overrides)[3:], *case.flags])
  capsys.readouterr()
  code = main(argv)
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert code == case.code, err[-2000:]
  if case.code:
    assert len(errors) == 1, err[-2000:]  # one line, no traceback
    assert "Traceback" not in err, err[-2000:]
    for fragment in case.says:
      assert fragment in errors[0], errors[0]
    for fragment in case.never_says:
      assert fragment not in errors[0], errors[0]
  else:
    assert not errors, err[-2000:]
    for fragment in case.says:
      assert fragment in err, err[-2000:]
  after = snapshot(workdir)
  if "*" in case.survive:
    assert after.keys() == before.keys()
    for key in before:
      assert after[key] == before[key], key
  for pattern in case.survive:
    if pattern == "*":
      continue
    kept = [p for p in before if pathlib.PurePath(p).match(pattern) or
            p.startswith(pattern.rstrip("*").rstrip("/") + "/") or
            p == pattern.rstrip("/*")]
    assert kept, pattern
    for key in kept:
      assert after.get(key) == before[key], key
  if case.name.startswith("metrics.jsonl"):
    assert "rebuilt from the 2 records saved with the checkpoint of round 2" \
        in err
    lines = (workdir / "metrics.jsonl").read_text().splitlines(True)
    assert lines[:2] == _base_history(base)
  if case.check is not None:
    case.check(workdir, tmp_path, before)


# -- one owner: a second process --


def test_second_run_is_refused_naming_the_holder(tmp_path, capsys):
  """A run holding the lock: a second exits 2 at once naming its pid and
  changes nothing; once the holder is killed (-9), the kernel has released
  the lock."""
  workdir = tmp_path / "run"
  holder = subprocess.Popen(
      cli_args(workdir, num_rounds=10_000, eval_every=5_000,
               checkpoint_every=5_000),
      env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    lock = workdir / workdir_lib.LOCK
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and holder.poll() is None and not (
        lock.exists() and lock.read_text().strip()):
      time.sleep(0.05)
    assert holder.poll() is None, holder.stderr.read().decode()[-2000:]
    assert lock.read_text().strip() == str(holder.pid)
    time.sleep(1.0)  # the holder is building / pretraining now
    before = {k: v for k, v in snapshot(workdir).items()}
    start = time.monotonic()
    code = main([*cli_args(workdir, num_rounds=10_000, eval_every=5_000,
                           checkpoint_every=5_000)[3:]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"process {holder.pid}" in err and "in use" in err
    assert time.monotonic() - start < 5  # at once, before any work
    assert lock.read_text().strip() == str(holder.pid)  # untouched
    after = snapshot(workdir)
    for key in before.keys() & after.keys():
      if key in (workdir_lib.LOCK, "config.json"):
        assert after[key] == before[key], key
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    holder.stderr.close()
  with workdir_lib.locked(workdir):  # released by the kernel
    assert (workdir / workdir_lib.LOCK).read_text().strip() == str(
        os.getpid())
  assert (workdir / workdir_lib.LOCK).read_text() == ""


def test_atomic_write_is_strict_and_follows_no_planted_link(tmp_path):
  from fedjax_tl import files
  target = tmp_path / "out.json"
  victim = tmp_path / "victim"
  victim.write_text("keep")
  os.symlink(victim, tmp_path / ".out.json.tmp")
  files.write_json_atomic(target, {"a": float("nan"), "b": [np.inf]})
  assert json.loads(target.read_text()) == {"a": None, "b": [None]}
  assert victim.read_text() == "keep"
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      ".out.json.tmp", "out.json", "victim"]


# -- clean stops: SIGINT / SIGTERM, a subprocess each --

STOP_CONFIG = dict(num_rounds=30, eval_every=1, checkpoint_every=1,
                   keep_checkpoints=2, pretrain="none",
                   local_test_examples=0)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> pathlib.Path:
  workdir = tmp_path_factory.mktemp("full") / "run"
  runner.run(tiny_config(**STOP_CONFIG), workdir, quiet=True)
  return workdir


def _signal_when(workdir, signum, ready, **overrides):
  """Runs the CLI, sends `signum` once `ready(workdir)` holds; returns the
  exit code and stderr."""
  return signal_cli(cli_args(workdir, **{**STOP_CONFIG, **overrides}),
                    (lambda: ready(workdir), signum))


def _at_round(n):
  def ready(workdir):
    try:
      lines = (workdir / "metrics.jsonl").read_text().splitlines()
      return bool(lines) and json.loads(lines[-1])["round"] >= n
    except (OSError, ValueError):
      return False
  return ready


def _writing_a_step(workdir):
  """orbax is writing a checkpoint step (its temporary directory exists)."""
  try:
    return any("orbax-checkpoint-tmp" in n
               for n in os.listdir(workdir / "checkpoints"))
  except OSError:
    return False


def _compiling(workdir):
  """Round 0 evaluated and recorded: the first call of the rounds is being
  compiled (or read from the compilation cache) next."""
  return _at_round(0)(workdir)


@pytest.mark.parametrize("signum,ready,overrides", [
    (signal.SIGINT, _at_round(2), {}),
    # Checkpoints every 4 rounds: the round reached is saved off schedule.
    (signal.SIGTERM, _at_round(2), dict(checkpoint_every=4)),
    pytest.param(signal.SIGINT, _writing_a_step, {}, marks=pytest.mark.slow),
    pytest.param(signal.SIGINT, _compiling, {}, marks=pytest.mark.slow)],
    ids=["SIGINT", "SIGTERM, off the checkpoint schedule",
         "SIGINT during a checkpoint write", "SIGINT during compilation"])
def test_signal_stops_cleanly_and_the_same_command_resumes(
    signum, ready, overrides, uninterrupted, tmp_path):
  workdir = tmp_path / "run"
  code, err = _signal_when(workdir, signum, ready, **overrides)
  reached = _stopped_cleanly(workdir, code, err, signum, uninterrupted)
  _resumes_to_the_end(workdir, reached, uninterrupted, **overrides)


def _stopped_cleanly(workdir, code, err, signum, uninterrupted, twice=False):
  """One line "stopped at round N", no traceback; the records those of the
  uninterrupted run; round N checkpointed with its N + 1 records (unless a
  second signal abandoned the writes); no summary, nothing partial.
  Returns N."""
  lines = err.strip().splitlines()
  assert code == 128 + signum, err[-2000:]
  assert "Traceback" not in err and "Exception" not in err, err[-2000:]
  stopped = [line for line in lines if line.startswith("stopped at round")]
  assert len(stopped) == 1 and lines[-1] == stopped[0], err[-2000:]
  assert stopped[0].endswith(
      ("(signalled twice: checkpoint writes in flight abandoned)"
       if twice else "") + "; the same command resumes"), stopped[0]
  reached = int(stopped[0].split()[3].rstrip(";"))
  assert 0 <= reached < STOP_CONFIG["num_rounds"]
  records = host_free_records(workdir)
  assert records == host_free_records(uninterrupted)[:len(records)]
  if not twice and reached:
    steps, meta = _checkpoint_identity(workdir)
    assert steps[-1] == reached and meta["history"]["records"] == reached + 1
    assert len(records) == reached + 1
  assert not (workdir / "summary.json").exists()
  if not twice:
    assert not partial_files(workdir)
  return reached


def _resumes_to_the_end(workdir, reached, uninterrupted, **overrides):
  """The same command again, to the end: the uninterrupted run's numbers,
  nothing partial left."""
  proc = subprocess.run(cli_args(workdir, **{**STOP_CONFIG, **overrides}),
                        env=cli_env(), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  if reached:
    assert "resuming from the checkpoint of round" in proc.stderr
  assert host_free_records(workdir) == host_free_records(uninterrupted)
  assert not partial_files(workdir)


@pytest.mark.slow
def test_second_sigint_stops_at_once_and_the_same_command_resumes(
    uninterrupted, tmp_path):
  """A real second Ctrl-C: SIGINT at round 2, then another while the stop
  writes its checkpoint (orbax's temporary step present: the first was
  handled, since Python creates it). Two signals within one compiled call
  would reach Python's handler as one, as a quick double press does. The
  second stops at once (one line, no traceback, exit 130), abandoning the
  writes in flight; the same command resumes to the uninterrupted run's
  numbers."""
  workdir = tmp_path / "run"
  stale = []

  def temporary():
    try:
      return {(e.name, e.inode()) for e in os.scandir(workdir / "checkpoints")
              if "orbax-checkpoint-tmp" in e.name}
    except OSError:
      return set()

  def writing_a_new_step():  # first called right after the first SIGINT
    if not stale:
      stale.append(temporary())
    return bool(temporary() - stale[0])
  code, err = signal_cli(cli_args(workdir, **STOP_CONFIG),
                         (lambda: _at_round(2)(workdir), signal.SIGINT),
                         (writing_a_new_step, signal.SIGINT))
  reached = _stopped_cleanly(workdir, code, err, signal.SIGINT,
                             uninterrupted, twice=True)
  assert reached >= 2
  _resumes_to_the_end(workdir, reached, uninterrupted)


def test_sigint_while_building_writes_nothing(tmp_path):
  """SIGINT as soon as the run holds the lock (building, compiling): it
  stops at the first boundary, before anything else is written."""
  workdir = tmp_path / "run"

  def locked(workdir):
    lock = workdir / workdir_lib.LOCK
    return lock.exists() and bool(lock.read_text().strip())
  code, err = _signal_when(workdir, signal.SIGINT, locked,
                           pretrain="source")
  assert code == 130 and "Traceback" not in err, err[-2000:]
  assert err.strip().splitlines()[-1] == (
      "stopped before any round ran; the same command resumes"), err
  assert not os.path.lexists(workdir)  # the lock's, removed with it


# `python -c SIGNAL_ON_IMPORT NAMES ARGS...`: the fedjax-tl command ARGS,
# sent SIGINT by itself as each module of NAMES (comma-separated, in
# order) starts to be imported: the handler runs inside the import
# machinery, where an exception could fail an extension's initialisation
# or be swallowed by an `except Exception`.
SIGNAL_ON_IMPORT = """
import builtins, os, signal, sys
names = sys.argv.pop(1).split(",")
real = builtins.__import__
def importing(name, *args, **kwargs):
  if names and name == names[0]:
    names.pop(0)
    os.kill(os.getpid(), signal.SIGINT)
  return real(name, *args, **kwargs)
builtins.__import__ = importing
from fedjax_tl.cli import entry
entry()
"""


@pytest.mark.parametrize("names, line", [
    ("jax", "stopped before the run started; the same command resumes"),
    ("jax,fedjax_tl.experiment.build", "stopped by SIGINT (signalled twice)")],
    ids=["once", "twice"])
def test_sigint_while_importing_jax_is_one_line(tmp_path, names, line):
  """A Ctrl-C while the command imports jax (before any run handler) is
  held until jax is loaded and the config read: one line, exit 130,
  nothing written; a second one leaves at once, also one line."""
  workdir = tmp_path / "run"
  command = cli_args(workdir, **BASE)
  proc = subprocess.run(
      [command[0], "-c", SIGNAL_ON_IMPORT, names, *command[3:]],
      env=cli_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 130, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [line], proc.stderr[-2000:]
  assert not os.path.lexists(workdir)


def test_a_signal_held_outside_a_run_stops_it_before_any_round():
  """A signal noted by an outer handler (the command's, a comparison's)
  and not yet acted on is the run's from its first check; one the run
  noted after its last check goes back to the outer handler."""
  outer = stops.StopFlag()
  previous = {s: signal.signal(s, outer.handle) for s in stops.SIGNALS}
  try:
    outer.handle(signal.SIGTERM, None)
    with stops.stop_on_signals() as flag:
      assert signal.getsignal(signal.SIGINT) == flag.handle
      with pytest.raises(Stopped) as stopped:
        flag.check()
    assert stopped.value.exit_code == 143
    outer.signum = None
    with stops.stop_on_signals() as flag:
      assert not flag.requested
      os.kill(os.getpid(), signal.SIGINT)  # handled before the next line
      assert flag.signum == signal.SIGINT
    assert outer.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) == outer.handle
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def test_run_restores_the_signal_handlers(base, tmp_path):
  """The Python API leaves no handler of its own installed."""
  def mine(signum, frame):
    del signum, frame
  previous = (signal.signal(signal.SIGTERM, mine),
              signal.signal(signal.SIGINT, signal.default_int_handler))
  try:
    shutil.copytree(base, tmp_path / "run", symlinks=True)
    runner.run(tiny_config(**BASE), tmp_path / "run", quiet=True)
    assert signal.getsignal(signal.SIGTERM) is mine
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGTERM, previous[0])
    signal.signal(signal.SIGINT, previous[1])


# -- extending a run keeps what its identity derived from num_rounds --

SCALEFL = dict(policy="scalefl", hidden=(16, 8, 8), scalefl_kd_gamma=5.0,
               pretrain="none", local_test_examples=0)


def _unset(argv, key):
  """`argv` without its `--config.KEY=` flag: the key left unset."""
  return [arg for arg in argv if not arg.startswith(f"--config.{key}=")]


@pytest.mark.slow  # three tiny runs: about 25 s of CPU
def test_extending_a_scalefl_run_keeps_its_distillation_start(tmp_path,
                                                             capsys):
  """ScaleFL's distillation start left unset follows num_rounds (the
  authors' `round > num_rounds * 0.25`): extending a finished 2-round run
  (start 1) to 4 rounds (start 2) is refused in one line naming both and
  the flag, nothing changed; with the old start passed it resumes, and its
  records are those of a straight 4-round run with that start."""
  workdir, straight = tmp_path / "run", tmp_path / "straight"
  done = tiny_config(**SCALEFL, num_rounds=2)
  assert done.scalefl_kd_start == 1  # the first r > 2 / 4
  runner.run(done, workdir, quiet=True)
  before = snapshot(workdir)
  capsys.readouterr()
  extended = cli_args(workdir, **SCALEFL, num_rounds=4)[3:]
  assert main(_unset(extended, "scalefl_kd_start")) == 2
  assert capsys.readouterr().err == (
      f"error: --workdir={str(workdir)!r} holds this run with "
      "scalefl_kd_start=1, not 2 (when unset it follows num_rounds: 2 "
      "there, 4 here); pass --config.scalefl_kd_start=1 to extend it as it "
      "ran, or --overwrite to replace it\n")
  assert snapshot(workdir) == before
  assert main(cli_args(workdir, **SCALEFL, num_rounds=4,
                       scalefl_kd_start=1)[3:]) == 0
  assert "resuming from the checkpoint of round 2" in capsys.readouterr().err
  runner.run(tiny_config(**SCALEFL, num_rounds=4, scalefl_kd_start=1),
             straight, quiet=True)
  assert len(host_free_records(workdir)) == 3  # rounds 0, 2 and 4
  assert host_free_records(workdir) == host_free_records(straight)
