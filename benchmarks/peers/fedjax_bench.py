"""fedjax 0.0.17 on the peer workloads: `fed_avg.federated_averaging`.

Runs in benchmarks/peers/.venvs/fedjax (setup.sh). Models are Haiku modules
through `fedjax.create_model_from_haiku`; the `cnn` keeps pfl's dropout
(`--no-dropout` drops it). Clients run with fedjax's default (jit) backend.

  .venvs/fedjax/bin/python fedjax_bench.py --workload cnn
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fedjax  # noqa: E402
import haiku as hk  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from fedjax.algorithms import fed_avg  # noqa: E402

import peers_common as common  # noqa: E402

GLOROT = hk.initializers.VarianceScaling(1.0, "fan_avg", "uniform")


def forward(workload: common.Workload, dropout: bool):
  """The Haiku forward pass `f(batch, is_train)` of the workload's model."""

  def mlp(batch, is_train=True):
    del is_train
    x = jax.nn.relu(hk.Linear(128)(batch["x"]))
    return hk.Linear(workload.num_classes)(x)

  def cnn(batch, is_train=True):
    x = batch["x"]
    for channels in common.CNN_CONV:
      x = jax.nn.relu(hk.Conv2D(channels, (3, 3), padding="VALID",
                                w_init=GLOROT)(x))
    x = hk.max_pool(x, (2, 2), (2, 2), padding="VALID")
    if dropout and is_train:
      x = hk.dropout(hk.next_rng_key(), common.CNN_DROPOUT[0], x)
    x = hk.Flatten()(x)
    x = jax.nn.relu(hk.Linear(common.CNN_DENSE, w_init=GLOROT)(x))
    if dropout and is_train:
      x = hk.dropout(hk.next_rng_key(), common.CNN_DROPOUT[1], x)
    return hk.Linear(workload.num_classes, w_init=GLOROT)(x)

  return mlp if workload.name == "mlp" else cnn


def main(argv=None) -> dict:
  args = common.parse_args(
      __doc__.split("\n")[0], argv,
      lambda p: p.add_argument("--no-dropout", action="store_true"))
  workload = common.WORKLOADS[args.workload]
  dropout = workload.name == "cnn" and not args.no_dropout
  sample = {"x": np.zeros((1, *workload.input_shape), np.float32),
            "y": np.zeros(1, np.int32)}
  model = fedjax.create_model_from_haiku(
      transformed_forward_pass=hk.transform(forward(workload, dropout)),
      sample_batch=sample,
      train_loss=lambda b, p: fedjax.metrics.unreduced_cross_entropy_loss(
          b["y"], p),
      train_kwargs={"is_train": True}, eval_kwargs={"is_train": False})
  x, y = common.all_client_data(workload, args.seed)
  data = fedjax.InMemoryFederatedData(
      {f"{c:04d}": {"x": x[c], "y": y[c]} for c in range(workload.num_clients)})
  algorithm = fed_avg.federated_averaging(
      grad_fn=fedjax.model_grad(model),
      client_optimizer=fedjax.optimizers.sgd(workload.client_lr),
      server_optimizer=fedjax.optimizers.sgd(workload.server_lr),
      client_batch_hparams=fedjax.ShuffleRepeatBatchHParams(
          batch_size=workload.batch_size, num_epochs=workload.epochs))
  state = algorithm.init(model.init(jax.random.PRNGKey(args.seed)))
  sampler = fedjax.client_samplers.UniformGetClientSampler(
      data, args.clients_per_round, seed=args.seed)

  def run_round(_):
    nonlocal state
    state, _ = algorithm.apply(state, sampler.sample())
    jax.block_until_ready(state.params)

  seconds = common.time_rounds(run_round, args.warmup, args.rounds)
  return common.report(
      "fedjax", args, seconds,
      ("fedjax", "jax", "jaxlib", "dm-haiku", "numpy"),
      backend=jax.default_backend(), dropout=dropout)


if __name__ == "__main__":
  main(sys.argv[1:])
