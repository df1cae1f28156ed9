"""fedjax_tl on the peer workloads: plain FedAvg, one tier, policy `full`.

Runs in the main environment. The `mlp` workload is our default MLP
(`hidden=(128,)`); `cnn` is pfl-research's `simple_cnn` written as an NNX
module and handed to the engine as a ModelDef, without its dropout (see
README.md: the engine's `apply(params, x)` takes no PRNG key).

  python benchmarks/peers/ours.py --workload mlp --clients-per-round 1000
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import peers_common as common  # noqa: E402
from fedjax_tl import config as config_lib  # noqa: E402
from fedjax_tl.algorithms import server_optimizer  # noqa: E402
from fedjax_tl.client import client_optimizer, make_client_update  # noqa: E402
from fedjax_tl.data.federated import FederatedData  # noqa: E402
from fedjax_tl.devices import make_population  # noqa: E402
from fedjax_tl.models import base  # noqa: E402
from fedjax_tl.runner import auto_chunk_size  # noqa: E402
from fedjax_tl.simulation import Simulation  # noqa: E402


class SimpleCNN(nnx.Module):
  """pfl's `simple_cnn` minus dropout: conv 32 and conv 64 (3x3 valid) +
  ReLU, one 2x2 max-pool, dense 128 + ReLU, dense 10; Glorot-uniform."""

  def __init__(self, input_shape, num_classes: int, *, rngs: nnx.Rngs):
    init = nnx.initializers.glorot_uniform()
    c0, c1 = common.CNN_CONV
    self.conv_0 = nnx.Conv(input_shape[-1], c0, (3, 3), padding="VALID",
                           kernel_init=init, rngs=rngs)
    self.conv_1 = nnx.Conv(c0, c1, (3, 3), padding="VALID", kernel_init=init,
                           rngs=rngs)
    self.spatial = ((input_shape[0] - 4) // 2) * ((input_shape[1] - 4) // 2)
    self.dense_0 = nnx.Linear(self.spatial * c1, common.CNN_DENSE,
                              kernel_init=init, rngs=rngs)
    self.head = nnx.Linear(common.CNN_DENSE, num_classes, kernel_init=init,
                           rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.conv_0(x))
    x = jax.nn.relu(self.conv_1(x))
    x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = jax.nn.relu(self.dense_0(x))
    return self.head(x)

  def layer_specs(self) -> tuple[base.LayerSpec, ...]:
    return (base.LayerSpec("conv_0", None, 0), base.LayerSpec("conv_1", 0, 1),
            base.LayerSpec("dense_0", 1, 2, in_repeat=self.spatial),
            base.LayerSpec("head", 2, None))


def build(workload: common.Workload, seed: int) -> tuple[base.ModelDef, dict]:
  """The model, and Simulation.create keywords it needs."""
  if workload.name == "mlp":
    return base.build_model("mlp", workload.input_shape, workload.num_classes,
                            seed=seed, hidden=(128,)), {}
  module = SimpleCNN(workload.input_shape, workload.num_classes,
                     rngs=nnx.Rngs(params=seed))
  model = base._as_model_def(module, (*common.CNN_CONV, common.CNN_DENSE))  # pylint: disable=protected-access
  # Output positions per example of each conv (for the cost model only; the
  # engine's default assumes SAME convs pooled after each).
  h, w = workload.input_shape[:2]
  positions = (("conv_0", (h - 2) * (w - 2)), ("conv_1", (h - 4) * (w - 4)))
  return model, {"conv_positions": positions}


def default_chunk_size(workload: common.Workload, clients_per_round: int,
                       model: base.ModelDef) -> int:
  """The runner's automatic chunk size for this model and cohort."""
  cfg = config_lib.validate(config_lib.apply_overrides(
      config_lib.default_config(),
      [("model", workload.name), ("clients_per_round", str(clients_per_round)),
       ("num_clients", str(workload.num_clients))]))
  return auto_chunk_size(cfg, base.num_params(model.init_params))


def make_simulation(args: argparse.Namespace) -> tuple[Simulation, dict]:
  workload = common.WORKLOADS[args.workload]
  model, extra = build(workload, args.seed)
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
      unroll=workload.name == "cnn")
  chunk = args.chunk_size or default_chunk_size(workload,
                                                args.clients_per_round, model)
  sim = Simulation.create(
      model, update, server_optimizer("fedavg", workload.server_lr), data,
      population, cohort_size=args.clients_per_round, chunk_size=chunk,
      local_steps=workload.local_steps, seed=args.seed, policy="full",
      batch_size=workload.batch_size, **extra)
  return sim, {"chunk_size": chunk,
               "num_params": base.num_params(model.init_params)}


def main(argv=None) -> dict:
  args = common.parse_args(
      __doc__.split("\n")[0], argv,
      lambda p: p.add_argument("--chunk-size", type=int, default=0,
                               help="clients vmapped together; 0 = the "
                               "runner's automatic choice"))
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
      backend=jax.default_backend(), dropout=False, **info)


if __name__ == "__main__":
  main(sys.argv[1:])
