"""An optuna study over the client learning rate and local steps.

Maximises the worst tier's final accuracy on a small version of the default
experiment (200 devices, 20 per round), through the Python API:

  pip install -e ".[search]"
  python examples/optuna_search.py --trials 3 --rounds 5
  fedjax-tl report runs/optuna/trial_* --out runs/optuna/report
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import fedjax_tl


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--trials", type=int, default=20)
  parser.add_argument("--rounds", type=int, default=20,
                      help="federated rounds per trial")
  parser.add_argument("--workdir", default="runs/optuna",
                      help="each trial's run directory goes under it")
  parser.add_argument("--seed", type=int, default=0,
                      help="the sampler's and the experiments' seed")
  parser.add_argument("--storage", default=None,
                      help="optuna storage URL, e.g. sqlite:///study.db, to "
                           "keep (and resume) the study")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    import optuna
  except ImportError:
    print("error: this example needs optuna: pip install -e '.[search]'",
          file=sys.stderr)
    return 2
  workdir = pathlib.Path(args.workdir)
  # Trials differ in values, rarely in shapes: most compiled programs (the
  # evaluators, the rounds of a repeated local_steps) are reused from disk.
  import jax
  jax.config.update("jax_compilation_cache_dir", str(workdir / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  # The small experiment every trial starts from; a bad value fails here.
  base = fedjax_tl.get_config(
      num_clients=200, clients_per_round=20, num_rounds=args.rounds,
      eval_every=args.rounds, checkpoint_every=args.rounds, seed=args.seed)
  # Pretraining does not depend on the searched values: the first trial
  # pretrains, later ones reuse its saved model.
  pretrained = workdir / "trial_0" / "pretrained"

  def objective(trial: optuna.Trial) -> float:
    config = fedjax_tl.get_config(
        base,
        client_lr=trial.suggest_float("client_lr", 0.01, 0.5, log=True),
        local_steps=trial.suggest_int("local_steps", 1, 10),
        pretrain=str(pretrained) if pretrained.exists() else "source")
    result = fedjax_tl.run(config, workdir / f"trial_{trial.number}",
                           overwrite=True, quiet=True)
    # Kept with the trial: trials_dataframe() shows them too.
    trial.set_user_attr("accuracy", result.accuracy)
    trial.set_user_attr("bytes_up", result.summary["bytes_up"])
    print(f"trial {trial.number}: client_lr={config.client_lr:.4f} "
          f"local_steps={config.local_steps} -> worst tier "
          f"{result.worst_tier_accuracy:.3f}, global {result.accuracy:.3f}",
          flush=True)
    return result.worst_tier_accuracy

  optuna.logging.set_verbosity(optuna.logging.WARNING)
  study = optuna.create_study(
      direction="maximize", study_name="fedjax_tl_worst_tier",
      storage=args.storage, load_if_exists=args.storage is not None,
      sampler=optuna.samplers.TPESampler(seed=args.seed))
  study.optimize(objective, n_trials=args.trials)
  columns = ["number", "value", "params_client_lr", "params_local_steps",
             "user_attrs_accuracy"]
  print(study.trials_dataframe()[columns].rename(
      columns={"value": "worst_tier", "user_attrs_accuracy": "accuracy"}
  ).to_string(index=False))
  best = study.best_trial
  print(f"best: trial {best.number}, worst-tier accuracy {best.value:.3f} "
        f"with {best.params}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
