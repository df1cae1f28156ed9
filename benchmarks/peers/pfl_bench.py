"""pfl-research 0.6.0 (PyTorch backend) on the peer workloads: FedAvg.

Runs in benchmarks/peers/.venvs/pfl (setup.sh), in one process or several
under torchrun (pfl then splits each cohort between the processes):

  .venvs/pfl/bin/python pfl_bench.py --workload cnn
  .venvs/pfl/bin/python -m torch.distributed.run --nproc_per_node 2 \\
      pfl_bench.py --workload cnn

Rounds are timed by a callback at the end of every central iteration; only
central iteration 0 evaluates (pfl always evaluates it), and it is a warm-up.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from pfl.aggregate.simulate import SimulatedBackend  # noqa: E402
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams  # noqa: E402
from pfl.callback.base import TrainingProcessCallback  # noqa: E402
from pfl.data.dataset import Dataset  # noqa: E402
from pfl.data.federated_dataset import FederatedDataset  # noqa: E402
from pfl.data.sampling import get_user_sampler  # noqa: E402
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams  # noqa: E402
from pfl.internal.ops.selector import get_default_framework_module  # noqa: E402
from pfl.metrics import Metrics  # noqa: E402
from pfl.model.pytorch import PyTorchModel  # noqa: E402

import peers_common as common  # noqa: E402
import torch_models  # noqa: E402


class RoundTimer(TrainingProcessCallback):
  """Records the wall-clock end of every central iteration."""

  def __init__(self):
    self.marks = []

  def on_train_begin(self, *, model):
    self.marks.append(time.perf_counter())
    return Metrics()

  def after_central_iteration(self, aggregate_metrics, model, *,
                              central_iteration):
    self.marks.append(time.perf_counter())
    return False, Metrics()


def main(argv=None) -> dict | None:
  args = common.parse_args(
      __doc__.split("\n")[0], argv,
      torch_models.add_options)
  workload = common.WORKLOADS[args.workload]
  dropout = workload.name == "cnn" and not args.no_dropout
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  data = [torch_models.client_tensors(workload, c, args.seed)
          for c in range(workload.num_clients)]
  user_ids = list(range(workload.num_clients))
  federated = FederatedDataset(
      lambda uid: Dataset(raw_data=list(data[uid]), user_id=str(uid)),
      get_user_sampler("minimize_reuse", user_ids))
  net = torch_models.build(workload, dropout)
  model = PyTorchModel(
      model=net, local_optimizer_create=torch.optim.SGD,
      central_optimizer=torch.optim.SGD(net.parameters(),
                                        lr=workload.server_lr))
  timer = RoundTimer()
  FederatedAveraging().run(
      algorithm_params=NNAlgorithmParams(
          central_num_iterations=args.warmup + args.rounds,
          # Only iteration 0 (a warm-up round) evaluates.
          evaluation_frequency=10**9,
          train_cohort_size=args.clients_per_round, val_cohort_size=0),
      backend=SimulatedBackend(training_data=federated, val_data=None),
      model=model,
      model_train_params=NNTrainHyperParams(
          local_learning_rate=workload.client_lr,
          local_num_epochs=workload.epochs,
          local_batch_size=workload.batch_size),
      model_eval_params=NNEvalHyperParams(local_batch_size=workload.batch_size),
      callbacks=[timer])
  distributed = get_default_framework_module().distributed
  if distributed.global_rank != 0:
    return None
  seconds = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
  for r, s in enumerate(seconds):
    print(f"  {'warm-up ' if r < args.warmup else ''}round {r}: {s:.3f}s",
          file=sys.stderr, flush=True)
  return common.report(
      "pfl", args, seconds[args.warmup:], ("pfl", "torch", "numpy"),
      processes=distributed.world_size, torch_threads=torch.get_num_threads(),
      dropout=dropout)


if __name__ == "__main__":
  main(sys.argv[1:])
