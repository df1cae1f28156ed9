"""Refused up front: the memory a plan needs, estimated before anything big
is allocated (issue 20; docs/reliability.md).

A config such as `num_clients=999999999999`, `hidden=(100000000,)` or a
`.npz` declaring `num_classes=1e8` would otherwise end, minutes later, in an
out-of-memory traceback (or the kernel's OOM killer). `build_experiment`
calls :func:`check_memory` first: the padded client arrays come from the
config and the data's header (the digits' fixed shapes, an `.npz` file's
array headers; other sources once loaded), the model's parameter count
from `jax.eval_shape` of its builder (nothing allocated), the round from the
chunk of vmapped clients times one client's training memory
(`cost.full_training_memory_bytes`). The estimate is a lower bound of what
the run holds (no copies, workspaces or compiled programs counted), so a
plan refused cannot fit; `memory_check=False` skips the check.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import zipfile
from typing import Any, Iterator, NamedTuple

import jax
import numpy as np

from fedjax_tl import cost, models, placement
from fedjax_tl.config import ExperimentConfig
from fedjax_tl.data.federated import TransferData
from fedjax_tl.errors import ConfigError
from fedjax_tl.experiment.chunks import choose_chunk_size

_GIB = 2.0**30
# Per-device vectors of the population (placement.data_bytes): 4 bytes each.
_POPULATION_BYTES = 4 * placement.POPULATION_VECTORS
# Server optimiser state values per parameter (algorithms.server_optimizer):
# SGD keeps none, Adam and Yogi two moments.
_SERVER_SLOTS = {"fedadam": 2, "fedyogi": 2}
# The digits task's fixed shapes (data/digits.py): 8x8 grey images, 10 classes.
_DIGITS_SHAPE, _DIGITS_CLASSES = (8, 8, 1), 10


class DataHeader(NamedTuple):
  """What the estimate needs of the data, read without loading it.

  Attributes:
    clients: the padded client arrays' leading shape `(clients, examples)`.
    input_shape: one example's features.
    num_classes: the labels (the model's logits).
    data_bytes: every array of the data as held in memory (clients padded,
      their test examples, the source and test sets).
    what: how the client arrays were sized, for the message.
  """
  clients: tuple[int, int]
  input_shape: tuple[int, ...]
  num_classes: int
  data_bytes: int
  what: str


class MemoryPlan(NamedTuple):
  """The estimate (bytes) and the figures behind it."""
  data_bytes: int        # the data and the population's per-device vectors
  num_params: int | None  # None: the model could not be sized abstractly
  model_bytes: int       # params, the round's sums, the server optimiser
  chunk_size: int
  client_bytes: int      # one client's training memory
  round_bytes: int       # chunk_size x client_bytes
  what: str

  @property
  def total(self) -> int:
    return self.data_bytes + self.model_bytes + self.round_bytes

  def describe(self) -> str:
    parts = [f"client data {_size(self.data_bytes)} ({self.what})"]
    if self.num_params is not None:
      parts += [f"model {_size(self.model_bytes)} ({self.num_params:,} "
                "params with the round's sums and the server optimiser)",
                f"round {_size(self.round_bytes)} (a chunk of "
                f"{self.chunk_size} clients x {_size(self.client_bytes)} of "
                "training each)"]
    return f"~{_size(self.total)}: " + ", ".join(parts)


def _size(num_bytes: float) -> str:
  if num_bytes >= 2**30:
    return f"{num_bytes / _GIB:,.2f} GiB"
  if num_bytes >= 2**20:
    return f"{num_bytes / 2**20:,.2f} MiB"
  return f"{num_bytes / 2**10:,.1f} KiB"


def digits_header(cfg: ExperimentConfig) -> DataHeader:
  """The embedded digits' arrays from the config alone: `num_clients` x
  `max_examples` float32 images, int32 labels and counts, and
  `local_test_examples` more per client (the fixed-size source and test
  pools, ~1,800 images, are left out)."""
  rows = cfg.max_examples + cfg.local_test_examples
  per_example = 4 * math.prod(_DIGITS_SHAPE) + 4  # features + a label
  data = cfg.num_clients * (rows * per_example + 4 * (
      1 + (cfg.local_test_examples > 0)))
  return DataHeader((cfg.num_clients, cfg.max_examples), _DIGITS_SHAPE,
                    _DIGITS_CLASSES, data,
                    f"{cfg.num_clients:,} clients x {cfg.max_examples} "
                    f"examples x {_DIGITS_SHAPE} float32")


def npz_header(path: str | pathlib.Path) -> DataHeader | None:
  """An `.npz` data set's sizes from its arrays' headers (nothing else is
  read but the scalar `num_classes`); None when the file is not a readable
  archive of the expected arrays (its loader then names the problem)."""
  shapes, dtypes = {}, {}
  try:
    with zipfile.ZipFile(path) as archive:
      for info in archive.infolist():
        name = info.filename.removesuffix(".npy")
        with archive.open(info) as f:
          version = np.lib.format.read_magic(f)
          read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)
          shape, _, dtype = read(f)
          if name == "num_classes" and shape == () and dtype.kind in "iu":
            classes = int(np.frombuffer(f.read(dtype.itemsize), dtype)[0])
        shapes[name], dtypes[name] = tuple(shape), dtype
    clients = shapes["clients_x"]
    if len(clients) < 3:
      return None
    classes = int(classes)
  except Exception:  # pylint: disable=broad-except  # the loader reports it
    return None
  # Features are held as float32 (npz_source casts them), the rest as is.
  data = sum(math.prod(shape) * (4 if name.endswith("_x") else
                                 dtypes[name].itemsize)
             for name, shape in shapes.items())
  return DataHeader(clients[:2], clients[2:], max(classes, 1), data,
                    f"{clients[0]:,} clients x {clients[1]} examples x "
                    f"{clients[2:]} float32 in {pathlib.Path(path).name}")


def _arrays(value: Any) -> Iterator[np.ndarray]:
  """The numpy arrays in `value`'s dataclass fields, recursively."""
  if isinstance(value, np.ndarray):
    yield value
  elif dataclasses.is_dataclass(value):
    for field in dataclasses.fields(value):
      yield from _arrays(getattr(value, field.name))


def loaded_header(data: TransferData) -> DataHeader:
  """The sizes of data already loaded (sources without a header to read):
  every array it holds, each once (a source may serve its test set as the
  source's test set too)."""
  arrays = {id(a): a for a in _arrays(data)}
  x = data.clients.x
  return DataHeader(x.shape[:2], data.input_shape, data.num_classes,
                    sum(a.nbytes for a in arrays.values()),
                    f"{x.shape[0]:,} clients x {x.shape[1]} examples x "
                    f"{x.shape[2:]} {x.dtype}")


def header_before_loading(cfg: ExperimentConfig) -> DataHeader | None:
  """The data's header where it can be had without loading (digits, an
  `.npz` file); None for the other sources."""
  if cfg.data == "digits":
    return digits_header(cfg)
  if cfg.data.endswith(".npz"):
    return npz_header(cfg.data)
  return None


def _model_shapes(cfg: ExperimentConfig, header: DataHeader
                  ) -> tuple[Any, Any] | None:
  """`(layers, params as ShapeDtypeStructs)` of the config's model, built
  abstractly (`jax.eval_shape`: no parameter is allocated); None when the
  model cannot be built so (its real build then reports why)."""
  layers = []

  def build():
    model = models.build_model(
        cfg.model, header.input_shape, header.num_classes, seed=cfg.seed,
        **{key: getattr(cfg, key) for key in models.Options._fields})
    layers.append(model.layers)
    return model.init_params

  try:
    shapes = jax.eval_shape(build)
  except Exception:  # pylint: disable=broad-except
    return None
  return layers[0], shapes


def estimate(cfg: ExperimentConfig, header: DataHeader) -> MemoryPlan:
  """The plan's memory: data (+ the population's per-device vectors), the
  model (params, the round's sums of updates and of weights, the server
  optimiser's slots) and the round (a chunk of vmapped clients, each
  training the full model: `cost.full_training_memory_bytes`)."""
  data = header.data_bytes + _POPULATION_BYTES * header.clients[0]
  built = _model_shapes(cfg, header)
  if built is None:
    return MemoryPlan(data, None, 0, 0, 0, 0, header.what)
  layers, shapes = built
  num_params = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))
  model = cost.BYTES_PER_VALUE * num_params * (
      3 + _SERVER_SLOTS.get(cfg.algorithm, 0))
  client = cost.full_training_memory_bytes(
      layers, shapes, batch_size=cfg.batch_size,
      positions=cost.conv_positions(header.input_shape, layers, shapes),
      optimizer_slots=int(cfg.client_momentum > 0))
  chunk = min(choose_chunk_size(cfg, num_params)[0], cfg.clients_per_round)
  return MemoryPlan(data, num_params, model, chunk, client, chunk * client,
                    header.what)


def available() -> list[tuple[str, int, str]]:
  """`(part, bytes, source)` limits: on CPU the host's available RAM for
  everything; on an accelerator the host's RAM for the data (loaded there
  first) and the device's allocator limit for the model and the round."""
  host = placement.host_memory()
  if jax.default_backend() == "cpu":
    return [("all", *host)]
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  limits = [("data", *host)]
  if "bytes_limit" in stats:
    limits.append(("model", int(stats["bytes_limit"]),
                   f"{device.platform} memory_stats bytes_limit"))
  return limits


def check_memory(cfg: ExperimentConfig, header: DataHeader) -> MemoryPlan:
  """Refuses (ConfigError, exit 2) a plan whose estimate exceeds this
  machine's memory, in one line with the estimate and the limit; returns
  the plan. `memory_check=False` skips it."""
  plan = estimate(cfg, header)
  if not cfg.memory_check:
    return plan
  for part, limit, source in available():
    if limit is None:
      continue
    need = {"all": plan.total, "data": plan.data_bytes,
            "model": plan.model_bytes + plan.round_bytes}[part]
    if need > limit:
      raise ConfigError(
          f"the plan needs {plan.describe()}; over the {_size(limit)} "
          f"available ({source}). Reduce num_clients, max_examples, the "
          "model or chunk_size, or set config.memory_check=False to try "
          "anyway")
  return plan
