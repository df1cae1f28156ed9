"""Flower 1.42 (simulation engine, Ray) on the peer workloads: FedAvg.

Runs in benchmarks/peers/.venvs/flower (setup.sh). A ClientApp and a
ServerApp of Flower's Message API run under `flwr.simulation.run_simulation`
with one supernode per client; each client makes its own synthetic data from
its partition id (the same data as every peer) and trains one local epoch of
torch SGD. FedAvg's weighted mean of the client models is server SGD with
learning rate 1 on the mean delta. Rounds are timed by the strategy, from
sending a round's training messages to the end of its aggregation.

  .venvs/flower/bin/python flower_bench.py --workload mlp --cpus-per-client 1
"""

from __future__ import annotations

import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from flwr.app import (ArrayRecord, Context, Message, MetricRecord,  # noqa: E402
                      RecordDict)
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

import peers_common as common  # noqa: E402
import torch_models  # noqa: E402


class TimedFedAvg(FedAvg):
  """FedAvg that records when each round starts and when it is aggregated."""

  def __init__(self, marks: list[float], **kwargs):
    super().__init__(**kwargs)
    self.marks = marks

  def configure_train(self, server_round, arrays, config, grid):
    if not self.marks:
      self.marks.append(time.perf_counter())
    return super().configure_train(server_round, arrays, config, grid)

  def aggregate_train(self, server_round, replies):
    out = super().aggregate_train(server_round, replies)
    self.marks.append(time.perf_counter())
    return out


def make_client_app(args) -> ClientApp:
  workload = common.WORKLOADS[args.workload]
  dropout = workload.name == "cnn" and not args.no_dropout
  app = ClientApp()

  @app.train()
  def train(msg: Message, context: Context) -> Message:
    if args.threads:
      torch.set_num_threads(args.threads)
    cid = int(context.node_config["partition-id"])
    x, y = torch_models.client_tensors(workload, cid, args.seed)
    net = torch_models.build(workload, dropout)
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=workload.client_lr)
    for _ in range(workload.epochs):
      for idx in torch.randperm(len(y)).split(workload.batch_size):
        opt.zero_grad()
        net.loss(x[idx], y[idx]).backward()
        opt.step()
    content = RecordDict({
        "arrays": ArrayRecord(net.state_dict()),
        "metrics": MetricRecord({"num-examples": len(y)})})
    return Message(content=content, reply_to=msg)

  return app


def main(argv=None) -> dict:

  def options(p):
    torch_models.add_options(p)
    p.add_argument("--cpus-per-client", type=float, default=1.0,
                   help="Ray CPUs per client actor (actors = cores / this)")

  args = common.parse_args(__doc__.split("\n")[0], argv, options)
  workload = common.WORKLOADS[args.workload]
  torch.manual_seed(args.seed)
  initial = torch_models.build(workload).state_dict()
  marks: list[float] = []
  server = ServerApp()

  @server.main()
  def server_main(grid: Grid, context: Context) -> None:
    strategy = TimedFedAvg(
        marks, fraction_train=args.clients_per_round / workload.num_clients,
        fraction_evaluate=0.0, min_train_nodes=args.clients_per_round,
        min_available_nodes=workload.num_clients)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(initial),
                   num_rounds=args.warmup + args.rounds)

  # Flower logs every round and client at INFO; keep the output readable.
  logging.getLogger("flwr").setLevel(logging.WARNING)
  run_simulation(
      server_app=server, client_app=make_client_app(args),
      num_supernodes=workload.num_clients,
      backend_config={"client_resources": {"num_cpus": args.cpus_per_client,
                                           "num_gpus": 0.0}})
  seconds = [b - a for a, b in zip(marks, marks[1:])]
  if len(seconds) != args.warmup + args.rounds:
    raise SystemExit(f"flower ran {len(seconds)} of "
                     f"{args.warmup + args.rounds} rounds")
  for r, s in enumerate(seconds):
    print(f"  {'warm-up ' if r < args.warmup else ''}round {r}: {s:.3f}s",
          file=sys.stderr, flush=True)
  return common.report(
      "flower", args, seconds[args.warmup:], ("flwr", "ray", "torch", "numpy"),
      cpus_per_client=args.cpus_per_client,
      dropout=workload.name == "cnn" and not args.no_dropout)


if __name__ == "__main__":
  main(sys.argv[1:])
