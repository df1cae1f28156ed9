"""fedjax_tl on the peer workloads: plain FedAvg, one tier, policy `full`.

Runs in the main environment. The `mlp` workload is our default MLP
(`hidden=(128,)`); `cnn` is the built-in `simple_cnn` (pfl-research's
CIFAR-10 model), trained with its dropout (0.25, 0.5) as the peers do
(`--no-dropout` drops it).

  python benchmarks/peers/ours.py --workload mlp --clients-per-round 1000
  python benchmarks/peers/ours.py --workload cnn
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import peers_common as common  # noqa: E402
from fedjax_tl import config as config_lib  # noqa: E402
from fedjax_tl import policies  # noqa: E402
from fedjax_tl.algorithms import server_optimizer  # noqa: E402
from fedjax_tl.client import client_optimizer, make_client_update  # noqa: E402
from fedjax_tl.data.federated import FederatedData  # noqa: E402
from fedjax_tl.devices import make_population  # noqa: E402
from fedjax_tl import models  # noqa: E402
from fedjax_tl.runner import auto_chunk_size  # noqa: E402
from fedjax_tl.simulation import Simulation  # noqa: E402


def build(workload: common.Workload, seed: int,
          dropout: bool = True) -> models.ModelDef:
  """The workload's model: our MLP, or the built-in simple_cnn."""
  if workload.name == "mlp":
    return models.build_model("mlp", workload.input_shape,
                              workload.num_classes, seed=seed, hidden=(128,))
  model = models.build_model("simple_cnn", workload.input_shape,
                             workload.num_classes, seed=seed,
                             dropout=None if dropout else 0.0)
  # The peers build the same layers (peers_common).
  assert tuple(model.groups.values()) == (*common.CNN_CONV, common.CNN_DENSE)
  assert model.dropout == (common.CNN_DROPOUT if dropout else (0.0, 0.0))
  return model


def default_chunk_size(workload: common.Workload, clients_per_round: int,
                       model: models.ModelDef) -> int:
  """The runner's automatic chunk size for this model and cohort."""
  cfg = config_lib.validate(config_lib.apply_overrides(
      config_lib.default_config(),
      [("model", "mlp" if workload.name == "mlp" else "simple_cnn"),
       ("clients_per_round", str(clients_per_round)),
       ("num_clients", str(workload.num_clients))]))
  return auto_chunk_size(cfg, models.num_params(model.init_params))


def make_simulation(args: argparse.Namespace) -> tuple[Simulation, dict]:
  workload = common.WORKLOADS[args.workload]
  model = build(workload, args.seed, dropout=not args.no_dropout)
  x, y = common.all_client_data(workload, args.seed)
  data = FederatedData(x=x, y=y, count=np.full(workload.num_clients,
                                               workload.examples, np.int32))
  # One tier of full width, every device always online: plain FedAvg.
  population = make_population(workload.num_clients, (1.0,), (1.0,),
                               min_availability=1.0, seed=args.seed)
  # As the runner does by default: unrolled local steps for convolutions.
  update = make_client_update(
      model.apply, client_optimizer(workload.client_lr),
      local_steps=workload.local_steps, batch_size=workload.batch_size,
      unroll=workload.name == "cnn", dropout=model.has_dropout)
  chunk = args.chunk_size or default_chunk_size(workload,
                                                args.clients_per_round, model)
  sim = Simulation.create(
      model, update, server_optimizer("fedavg", workload.server_lr), data,
      population, cohort_size=args.clients_per_round, chunk_size=chunk,
      local_steps=workload.local_steps, seed=args.seed,
      policy=policies.get("full"),
      batch_size=workload.batch_size,
      activation_masks=not getattr(args, "param_masks", False))
  return sim, {"chunk_size": chunk,
               "num_params": models.num_params(model.init_params)}


def main(argv=None) -> dict:
  def extra(p):
    p.add_argument("--chunk-size", type=int, default=0,
                   help="clients vmapped together; 0 = the runner's "
                   "automatic choice")
    p.add_argument("--no-dropout", action="store_true",
                   help="cnn: train simple_cnn without its dropout")
    p.add_argument("--param-masks", action="store_true",
                   help="mask the params at every local step instead of the "
                   "activations (Simulation.activation_masks=False)")

  args = common.parse_args(__doc__.split("\n")[0], argv, extra)
  sim, info = make_simulation(args)
  state = sim.init(sim.model.init_params)

  def run_round(_):
    nonlocal state
    state, stats = sim.round(state)
    jax.block_until_ready((state, stats))
    # Every slot must hold a client, or fewer steps ran than are counted.
    assert int(stats.participants) == args.clients_per_round, stats

  seconds = common.time_rounds(run_round, args.warmup, args.rounds)
  return common.report(
      "ours", args, seconds, ("fedjax_tl", "jax", "jaxlib", "flax", "numpy"),
      backend=jax.default_backend(), dropout=sim.model.has_dropout, **info)


if __name__ == "__main__":
  main(sys.argv[1:])
