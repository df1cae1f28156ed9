"""Containers for centralised and federated (padded, per-client) data.

Federated data is stored padded, `x[clients, max_examples, ...]`, so that the
simulation can gather clients by index and vmap over them with static shapes;
`count[clients]` says how many leading examples of each row are real.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A centralised labelled data set.

  Attributes:
    x: `[examples, *feature_shape]` float32 inputs.
    y: `[examples]` int32 labels.
  """
  x: np.ndarray
  y: np.ndarray

  def __len__(self) -> int:
    return int(self.y.shape[0])


@dataclasses.dataclass(frozen=True)
class FederatedData:
  """Per-client examples, padded to a common length.

  Attributes:
    x: `[clients, max_examples, *feature_shape]` float32; padding rows are 0.
    y: `[clients, max_examples]` int32; padding labels are 0.
    count: `[clients]` int32, the number of real (leading) examples per client.
    client_ids: each row's client id in its source file (natural data sets,
      so that traces and tiers can be tied to real clients); None for
      partitions made here.
  """
  x: np.ndarray
  y: np.ndarray
  count: np.ndarray
  client_ids: tuple[str, ...] | None = None

  @property
  def num_clients(self) -> int:
    return int(self.count.shape[0])

  @property
  def max_examples(self) -> int:
    return int(self.x.shape[1])

  @property
  def mask(self) -> np.ndarray:
    """`[clients, max_examples]` bool, True for real examples."""
    return np.arange(self.max_examples)[None, :] < self.count[:, None]


@dataclasses.dataclass(frozen=True)
class TransferData:
  """Everything an experiment needs: a source task and a federated target task.

  Attributes:
    name: a short name of the data set (for logs and summaries).
    source_train: centralised data the server pretrains on.
    source_test: held-out source-domain data.
    clients: the target domain, spread over the simulated devices.
    target_test: held-out target-domain data (global evaluation).
    num_classes: number of labels.
    client_test: each device's own held-out examples (row i belongs to
      device i of `clients`), for local accuracy; None when not built.
    facts: what the loader knows of the data beyond its arrays (a natural
      data set's files, format, split, examples cut by the cap), for the log
      and summary.json; None when it has nothing to add.
    loss_ignored: target labels the training and evaluation losses leave
      out (a text task's PAD: `data.text.LOSS_IGNORED`); empty: none.
    accuracy_ignored: target labels accuracy leaves out (a text task's
      PAD, OOV and sequence markers: `data.text.ACCURACY_IGNORED`).
  """
  name: str
  source_train: Dataset
  source_test: Dataset
  clients: FederatedData
  target_test: Dataset
  num_classes: int
  client_test: FederatedData | None = None
  facts: Mapping[str, Any] | None = None
  loss_ignored: tuple[int, ...] = ()
  accuracy_ignored: tuple[int, ...] = ()

  @property
  def counting(self) -> dict[str, tuple[int, ...]]:
    """What the evaluators count: `make_evaluator`'s keywords."""
    return {"loss_ignored": self.loss_ignored,
            "accuracy_ignored": self.accuracy_ignored}

  @property
  def input_shape(self) -> tuple[int, ...]:
    return tuple(self.target_test.x.shape[1:])
