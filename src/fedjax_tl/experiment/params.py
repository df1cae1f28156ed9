"""The params the federation starts from: pretrained (or loaded), then as the
migration policy starts from them, then after the server's own preparation.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import numpy as np

from fedjax_tl import checkpoint, files, policies, weights
from fedjax_tl.errors import DivergedError, UserError
from fedjax_tl.experiment.build import Experiment
from fedjax_tl.policies.transfer import pretrain


def initial_params(exp: Experiment, saved: pathlib.Path | None,
                   log: Any) -> tuple[Any, str, bool]:
  """The params migrated onto the devices.

  Returns `(params, origin, fresh)`: where they came from, and whether they
  were just pretrained (and so should be saved). `saved` is this run's own
  earlier pretrained model, if it may be reused. The model's `init_params`
  already hold `init_weights` (build.model_weights): pretrain=none starts
  from them, pretrain=source pretrains them further.
  """
  cfg, model = exp.config, exp.model
  if cfg.pretrain == "none":
    return model.init_params, "none", False
  if cfg.pretrain != "source":
    path = pathlib.Path(cfg.pretrain)
    return checkpoint.load_params(path, model.init_params), cfg.pretrain, False
  if saved is not None and saved.exists():
    try:
      params = checkpoint.load_params(saved, model.init_params)
      return _reinit(params, exp, log), "source", False
    except UserError as e:
      # This run's own copy: pretraining again gives the same params.
      aside = checkpoint.move_aside(saved)
      log(f"{e}; moved to {aside.name}, pretraining again")
  start = time.perf_counter()
  params, loss = pretrain(model.apply, model.init_params,
                          exp.data.source_train, steps=cfg.pretrain_steps,
                          batch_size=cfg.pretrain_batch_size,
                          learning_rate=cfg.pretrain_lr, seed=cfg.seed)
  if not np.isfinite(loss) or checkpoint.first_non_finite(params):
    raise DivergedError(
        f"pretraining on the {exp.data.name} source diverged: final loss "
        f"{loss} after {cfg.pretrain_steps} steps (non-finite; e.g. "
        f"pretrain_lr={cfg.pretrain_lr:g} too high, or source features too "
        "large); nothing was saved")
  log(f"pretrained on {exp.data.name} source ({len(exp.data.source_train)} "
      f"examples, {cfg.pretrain_steps} steps) in "
      f"{time.perf_counter() - start:.1f}s, final loss {loss:.3f}")
  return _reinit(params, exp, log), "source", True


def _reinit(params: Any, exp: Experiment, log: Any) -> Any:
  """The pretrained params with `pretrain_reinit`'s set back to the fresh
  init (again on a reloaded copy: the same values)."""
  patterns = exp.config.pretrain_reinit
  if not patterns:
    return params
  params, names = weights.reset(params, exp.model.init_params, patterns)
  log(f"re-initialised after pretraining (pretrain_reinit): "
      f"{', '.join(names)}")
  return params


def federated_params(exp: Experiment, params: Any) -> Any:
  """The pretrained params as the policy starts from them (`Policy.start`:
  reordered by importance, under fresh adapters, ...)."""
  sim = exp.simulation
  return sim.policy.start(params, sim.model)


def prepared_params(exp: Experiment, params: Any, workdir: pathlib.Path,
                    resuming: bool, log: Any) -> tuple[Any, dict[str, float]]:
  """The params after the policy's server preparation (`Policy.prepare`,
  e.g. distillation into the tiers' widths), and the server's cost.

  Returns the params and `{"server_flops", "server_seconds"}` (zeros for a
  policy without preparation), which it saves in `workdir/<policy>.json`.
  A run resuming from a checkpoint restores its state, so it skips the
  preparation and reports the saved cost.
  """
  cfg, policy = exp.config, exp.simulation.policy
  if policy.prepare is None:
    return params, {"server_flops": 0.0, "server_seconds": 0.0}
  cost_file = workdir / f"{policy.name}.json"
  if resuming and cost_file.exists():
    return params, json.loads(cost_file.read_text())
  params, cost = policy.prepare(policies.ServerPrep(
      exp.model, params, exp.data.source_train, cfg.tier_fractions, cfg.seed))
  log(f"{policy.name}: the server prepared widths "
      f"{', '.join(cfg.tier_names)} before round 0: "
      f"{cost.flops / 1e9:.2f} GFLOP in {cost.seconds:.1f}s, final loss "
      f"{cost.loss:.3f}")
  record = {"server_flops": cost.flops,
            "server_seconds": round(cost.seconds, 3)}
  files.write_json_atomic(cost_file, record)
  return params, record


