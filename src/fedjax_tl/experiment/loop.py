"""The host loop: build the experiment, start from the pretrained model, run
rounds, evaluate and save. Everything with a side effect lives on the host
side; each call of the rounds is one compiled program.
"""

from __future__ import annotations

import contextlib
import pathlib
import sys
import time
from typing import Any

from fedjax_tl import checkpoint, sharding
from fedjax_tl.config import ExperimentConfig
from fedjax_tl.experiment import outputs
from fedjax_tl.experiment.build import build_experiment
from fedjax_tl.experiment.params import (federated_params, initial_params,
                                         prepared_params)
from fedjax_tl.experiment.workdir import check_workdir, start_workdir


def run(cfg: ExperimentConfig, workdir: str | pathlib.Path, *,
        overwrite: bool = False, progress: bool = True,
        quiet: bool = False) -> dict[str, Any]:
  """Runs (or resumes) an experiment in `workdir`; returns the summary."""
  start, workdir = time.perf_counter(), pathlib.Path(workdir)
  log = outputs.logger(quiet)
  replace = check_workdir(workdir, cfg, overwrite)  # before any work
  exp = build_experiment(cfg)
  sim, memory = exp.simulation, exp.simulation.memory_report()
  for line in outputs.describe(exp, memory):
    log(line)
  saved = workdir / "pretrained"
  params, origin, fresh = initial_params(exp, None if replace else saved, log)
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
  metrics = outputs.Metrics(exp, workdir / "metrics.jsonl", start, log)
  metrics.resume(latest)
  if not metrics.records:
    metrics.add(state, 0, None)
  done = int(state.round)
  with _progress_bar(cfg, done, progress and not quiet) as bar:
    while done < cfg.num_rounds:
      # Several rounds per compiled call; the host acts only between calls.
      num = rounds_in_call(done, cfg)
      state, stats = sim.rounds(state, num)
      done += num
      if done % cfg.eval_every == 0 or done == cfg.num_rounds:
        record = metrics.add(state, done, float(stats.train_loss[-1]))
        bar.set_postfix(acc=f"{record['accuracy']:.3f}", worst=(
            f"{min(record['per_tier_accuracy'].values()):.3f}"))
      if done % cfg.checkpoint_every == 0 or done == cfg.num_rounds:
        ckpts.save(done, state)
      bar.update(num)
  ckpts.close()
  summary = outputs.summarize(exp, metrics, state, origin, server_cost,
                              memory)
  outputs.write_summary(workdir, summary)
  return summary


class _NoBar:
  """A progress bar that shows nothing."""

  def set_postfix(self, **kwargs: Any) -> None:
    del kwargs

  def update(self, n: int) -> None:
    del n


@contextlib.contextmanager
def _progress_bar(cfg: ExperimentConfig, done: int, show: bool):
  """A tqdm bar over the rounds left (nothing if none are left or `show`
  is off)."""
  if not show or done >= cfg.num_rounds:
    yield _NoBar()
    return
  from tqdm.auto import tqdm
  bar = tqdm(total=cfg.num_rounds, initial=done, unit="round",
             file=sys.stderr, dynamic_ncols=True)
  try:
    yield bar
  finally:
    bar.close()


def rounds_in_call(done: int, cfg: ExperimentConfig) -> int:
  """Rounds the next compiled call runs after `done` rounds.

  `rounds_per_call`, cut short at the next evaluation, checkpoint or the
  last round, so the host still evaluates and saves where the config says;
  a few distinct counts at most, each compiled once.
  """
  stops = (cfg.num_rounds, done + cfg.eval_every - done % cfg.eval_every,
           done + cfg.checkpoint_every - done % cfg.checkpoint_every)
  return min(cfg.rounds_per_call, *(stop - done for stop in stops))


