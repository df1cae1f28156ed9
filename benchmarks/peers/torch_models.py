"""The peer workloads' models in PyTorch, for the pfl and Flower benchmarks.

Inputs are NCHW (the synthetic NHWC images are transposed once, up front).
`loss` and `metrics` are the methods pfl's PyTorchModel calls.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import peers_common as common


class _Classifier(nn.Module):
  """Cross-entropy `loss(x, y)` and a `metrics(x, y)` dict for pfl."""

  def loss(self, x, y, eval=False):  # pylint: disable=redefined-builtin
    self.eval() if eval else self.train()  # pylint: disable=expression-not-assigned
    return F.cross_entropy(self(x), y)

  def metrics(self, x, y, eval=False):  # pylint: disable=redefined-builtin
    from pfl.metrics import Weighted  # only pfl evaluates
    with torch.no_grad():
      loss = self.loss(x, y, eval=eval).item()
    return {"loss": Weighted(loss * len(x), len(x))}


class MLP(_Classifier):
  """Linear(64,128) + ReLU + Linear(128,10)."""

  def __init__(self, workload: common.Workload):
    super().__init__()
    self.dense = nn.Linear(int(np.prod(workload.input_shape)), 128)
    self.head = nn.Linear(128, workload.num_classes)

  def forward(self, x):
    return self.head(F.relu(self.dense(x.flatten(1))))


class SimpleCNN(_Classifier):
  """pfl's `simple_cnn`: conv 32, conv 64 (3x3 valid) + ReLU, 2x2 max-pool,
  dropout 0.25, dense 128 + ReLU, dropout 0.5, dense 10; Glorot-uniform."""

  def __init__(self, workload: common.Workload, dropout: bool = True):
    super().__init__()
    c0, c1 = common.CNN_CONV
    self.conv_0 = nn.Conv2d(workload.input_shape[-1], c0, 3)
    self.conv_1 = nn.Conv2d(c0, c1, 3)
    self.drop_0 = nn.Dropout(common.CNN_DROPOUT[0] if dropout else 0.0)
    self.dense = nn.Linear(common.CNN_FLAT, common.CNN_DENSE)
    self.drop_1 = nn.Dropout(common.CNN_DROPOUT[1] if dropout else 0.0)
    self.head = nn.Linear(common.CNN_DENSE, workload.num_classes)
    for layer in (self.conv_0, self.conv_1, self.dense, self.head):
      nn.init.xavier_uniform_(layer.weight)
      nn.init.zeros_(layer.bias)

  def forward(self, x):
    x = F.relu(self.conv_1(F.relu(self.conv_0(x))))
    x = self.drop_0(F.max_pool2d(x, 2))
    x = self.drop_1(F.relu(self.dense(x.flatten(1))))
    return self.head(x)


def add_options(parser: argparse.ArgumentParser) -> None:
  """The options of the torch peers' scripts."""
  parser.add_argument("--no-dropout", action="store_true",
                      help="cnn without its dropout layers (as ours runs)")
  parser.add_argument("--threads", type=int, default=0,
                      help="torch intra-op threads per process; 0 = torch's "
                      "default (one per core, 1 under torchrun)")


def build(workload: common.Workload, dropout: bool = True) -> _Classifier:
  return MLP(workload) if workload.name == "mlp" else SimpleCNN(workload,
                                                                 dropout)


def client_tensors(workload: common.Workload, cid: int, seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
  """Client `cid`'s `(x, y)` as torch tensors, images NCHW."""
  x, y = common.client_data(workload, cid, seed)
  if x.ndim == 4:
    x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
  return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
