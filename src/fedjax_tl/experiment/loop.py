"""The host loop: build the experiment, start from the pretrained model, run
rounds, evaluate and save. Everything with a side effect lives on the host
side; each call of the rounds is one compiled program.
"""

from __future__ import annotations

import contextlib
import pathlib
import time
from typing import Any, Mapping

from fedjax_tl import checkpoint, sharding
from fedjax_tl.config import ExperimentConfig
from fedjax_tl.experiment import outputs, stops, writers
from fedjax_tl.experiment import summary as summary_lib
from fedjax_tl.experiment import progress as progress_lib
from fedjax_tl.experiment.build import build_experiment
from fedjax_tl.experiment.params import (federated_params, initial_params,
                                         prepared_params)
from fedjax_tl.errors import DiskFullError, DivergedError
from fedjax_tl.experiment.workdir import (check_checkpoints, check_workdir,
                                          locked, run_identity,
                                          start_workdir)


def run(cfg: ExperimentConfig, workdir: str | pathlib.Path, *,
        overwrite: bool = False, progress: bool = True,
        quiet: bool = False,
        arrays: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Runs (or resumes) an experiment in `workdir`; returns the summary.

  `arrays`: the data when `cfg.data` is `arrays` (`build.load_data`).

  Holds the workdir's lock throughout (a second run is refused at once).
  Raises UserError (exit 2) for a workdir that is not this run's to resume,
  DivergedError (exit 3) when the model turns non-finite, DiskFullError
  (exit 1) when a write finds no space, and Stopped (exit 130 / 143) on
  SIGINT / SIGTERM: the handlers stop the run at the next boundary between
  compiled calls and are restored when it ends.
  """
  start, workdir = time.perf_counter(), pathlib.Path(workdir)
  check_workdir(workdir, cfg, overwrite)  # read only: refused before a lock
  with stops.stop_on_signals() as stop, locked(workdir):
    return _run_locked(cfg, workdir, overwrite, progress, quiet, start, stop,
                       arrays)


def _run_locked(cfg: ExperimentConfig, workdir: pathlib.Path,
                overwrite: bool, progress: bool, quiet: bool,
                start: float, stop: stops.StopFlag,
                arrays: Mapping[str, Any] | None) -> dict[str, Any]:
  # A few lines over ~60: the steps share the experiment's state.
  log = outputs.logger(quiet)
  replace = check_workdir(workdir, cfg, overwrite)  # again, under the lock
  exp = build_experiment(cfg, arrays)
  sim, memory = exp.simulation, exp.simulation.memory_report()
  for line in outputs.describe(exp, memory):
    log(line)
  stop.check()  # a signal while building: nothing was written yet
  saved = workdir / "pretrained"
  params, origin, fresh = initial_params(exp, None if replace else saved, log)
  stop.check()  # ... or while pretraining
  identity = run_identity(cfg, exp, params)
  if not replace:  # checkpoints of another identity: refused, untouched
    check_checkpoints(workdir, identity)
  # Global arrays on the mesh: under jax.distributed, orbax saves only those.
  params = sharding.replicate(params, sim.mesh)
  # Only once the inputs have proved good is anything in the workdir touched.
  start_workdir(workdir, cfg, replace)
  if fresh:
    checkpoint.save_params(saved, params)
  params = federated_params(exp, params)
  ckpts = checkpoint.RoundCheckpoints(workdir / "checkpoints",
                                      cfg.keep_checkpoints)
  # The newest checkpoint that reads back intact (bad ones are moved aside,
  # each reported in one line); only the structure of `like` matters.
  restored, latest = ckpts.restore_latest(sim.init(params), log)
  params, server_cost = prepared_params(exp, params, workdir,
                                        restored is not None, log)
  state = sim.init(params) if restored is None else restored
  if restored is not None:
    log(f"resuming from the checkpoint of round {latest}")
  # Closed however the run ends, so the events written so far are on disk.
  with writers.opened(cfg.writers, workdir, cfg.to_dict()) as writer:
    metrics = outputs.Metrics(exp, workdir / "metrics.jsonl", start, log,
                              writer)
    # The history saved with the checkpoint is the truth; no checkpoint: a
    # fresh start whose round-0 record is evaluated anew.
    metrics.resume(latest, None if restored is None else
                   ckpts.metadata.get("history"))
    if not metrics.records:
      metrics.add(state, 0, None)
    try:
      state = _rounds(cfg, sim, state, metrics, ckpts, identity,
                      progress and not quiet, stop)
    except DiskFullError:
      with contextlib.suppress(Exception):
        ckpts.close()  # the earlier checkpoint writes in flight finish
      raise
    ckpts.close()
    summary = summary_lib.summarize(exp, metrics, state, origin, server_cost,
                                memory)
    summary_lib.write_summary(workdir, summary)
    writer.finish(cfg.to_dict(), metrics.final(state))
  return summary


def _rounds(cfg: ExperimentConfig, sim: Any, state: Any,
            metrics: outputs.Metrics, ckpts: checkpoint.RoundCheckpoints,
            identity: dict[str, Any], progress: bool,
            stop: stops.StopFlag) -> Any:
  """Runs the rounds left, evaluating and saving where the config says;
  returns the last state. A signal stops it once the current call's
  evaluation and saving are done: the round reached is saved (off the
  schedule if need be), the writes in flight finish, Stopped is raised."""
  done = int(state.round)
  stop.check(f"at round {done}")  # a signal while compiling or restoring
  with contextlib.closing(progress_lib.make(
      cfg.num_rounds, done, progress)) as bar:
    while done < cfg.num_rounds:
      # Several rounds per compiled call; the host acts only between calls.
      num = rounds_in_call(done, cfg)
      state, stats = sim.rounds(state, num)
      done += num
      stop.where = f"at round {done}"  # what a second signal names
      _check_finite(state, done, num, ckpts)  # before it is saved
      if done % cfg.eval_every == 0 or done == cfg.num_rounds:
        record = metrics.add(state, done, outputs.train_loss(stats))
        bar.set_postfix(acc=f"{record['accuracy']:.3f}", worst=(
            f"{min(record['per_tier_accuracy'].values()):.3f}"))
      stopping = stop.requested  # read once: what is saved is what is said
      if stopping or done % cfg.checkpoint_every == 0 or \
          done == cfg.num_rounds:
        ckpts.save(done, state, {"identity": identity,
                                 "history": metrics.history()})
      bar.update(num)
      if stopping:
        ckpts.close()  # the writes in flight finish
        stop.check()
  return state


def _check_finite(state: Any, done: int, num: int,
                  ckpts: checkpoint.RoundCheckpoints) -> None:
  """Stops the run (DivergedError, exit 3) when the global model holds a
  NaN or Inf, naming the round, the first such array and the last finite
  checkpoint (kept; the non-finite state is never saved)."""
  bad = checkpoint.first_non_finite(state.params)
  if bad is None:
    return
  ckpts.close()  # the writes in flight finish first
  last = ckpts.latest_round()
  rounds = f"round {done}" if num == 1 else f"rounds {done - num + 1}-{done}"
  raise DivergedError(
      f"{rounds}: the global model became non-finite (NaN/Inf in params"
      f"{bad}), e.g. from a diverging server_lr or client_lr; stopped. "
      + ("No checkpoint was saved yet" if last is None else
         f"The last finite checkpoint is checkpoints/{last} (round {last}), "
         "kept"))


def rounds_in_call(done: int, cfg: ExperimentConfig) -> int:
  """Rounds the next compiled call runs after `done` rounds.

  `rounds_per_call`, cut short at the next evaluation, checkpoint or the
  last round, so the host still evaluates and saves where the config says;
  a few distinct counts at most, each compiled once.
  """
  stops = (cfg.num_rounds, done + cfg.eval_every - done % cfg.eval_every,
           done + cfg.checkpoint_every - done % cfg.checkpoint_every)
  return min(cfg.rounds_per_call, *(stop - done for stop in stops))


