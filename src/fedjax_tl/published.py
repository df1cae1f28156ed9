"""Published federated setups (HeteroFL, FedRolex, FjORD) as configs.

`configs/mnist.py`, `configs/emnist.py` and `configs/cifar10.py` build on
:func:`published_config`; the `:key=value,...` part of `--config=FILE:...`
picks a variant (model, partition, capacity mix, method).
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from fedjax_tl.config import default_config, parse_capacity_mix
from fedjax_tl.errors import ConfigError

# Train split sizes of the tfds data sets (emnist: its default config,
# byclass, 62 classes), to turn local epochs into local steps.
TRAIN_EXAMPLES = {"mnist": 60_000, "emnist": 697_932, "cifar10": 50_000}
# The server's hold-out: unused by these from-scratch setups (pretrain=none),
# but the tfds loader keeps one, so it is kept small.
SOURCE_FRACTION = 0.01
# HeteroFL's models (authors' repository, src/utils.py): "conv" hidden sizes
# 64-128-256-512 and "mlp" 512-256-128. Our CNN adds a dense layer before its
# head (HeteroFL's conv pools globally instead) and has no normalisation.
CNN_CHANNELS = (64, 128, 256, 512)
CNN_DENSE = 512
MLP_HIDDEN = (512, 256, 128)

# Named capacity mixes: HeteroFL's combinations and FedRolex's
# uniform and real-world device mixes; "pset" is FjORD's p-set, uniform over
# widths 0.2 .. 1.0 (not HeteroFL levels).
MIXES = {"a": "a1", "a-e": "a1-e1", "a-b-c-d-e": "a1-b1-c1-d1-e1", "e": "e1",
         "uniform": "a1-b1-c1-d1-e1", "real-world": "a6-b10-c11-d18-e55"}
PSET = (0.2, 0.4, 0.6, 0.8, 1.0)

# Each method's published local training. `rounds` is
# (IID, non-IID). FedRolex's and Federated Dropout's batch size, optimiser
# and rounds are not published: FedRolex is built on HeteroFL's code, so
# HeteroFL's are assumed. FjORD's momentum and weight decay are not recorded
# either; plain SGD is assumed.
_HETEROFL_SGD = dict(batch_size=10, client_lr=0.1, client_momentum=0.9,
                     weight_decay=5e-4, rounds=(400, 800))
METHODS = {
    "heterofl": dict(policy="heterofl", heterofl_mode="dynamic", epochs=5,
                     mix="a-e", **_HETEROFL_SGD),
    "fedrolex": dict(policy="fedrolex", epochs=1, mix="uniform",
                     **_HETEROFL_SGD),
    "fed_dropout": dict(policy="fed_dropout", epochs=1, mix="uniform",
                        **_HETEROFL_SGD),
    "fjord": dict(policy="fjord", epochs=1, mix="pset", batch_size=32,
                  client_lr=0.1, client_momentum=0.0, weight_decay=0.0,
                  rounds=(500, 500)),
}
METHODS["fjord_kd"] = dict(METHODS["fjord"], fjord_distill=True)
MODELS = ("cnn", "mlp", "preresnet18", "resnet18", "mobilenetv2")
# The model each method's paper trains on a data set, where we build it
# (elsewhere: the CNN). CIFAR-10: HeteroFL's PreResNet18 with its static
# batch norm; the standard ResNet18 with GroupNorm for FedRolex (and
# Federated Dropout, its baseline) and FjORD.
PAPER_MODELS = {"cifar10": dict(heterofl="preresnet18", fedrolex="resnet18",
                                fed_dropout="resnet18", fjord="resnet18",
                                fjord_kd="resnet18")}
VARIANT_KEYS = ("model", "alpha", "mix", "method")


def fail_variant(key: str, value: str, requirement: str) -> None:
  raise ConfigError(f"--config variant {key}={value!r}: {requirement}")


def parse_variants(arg: str | None, keys: tuple[str, ...] = VARIANT_KEYS
                   ) -> dict[str, str]:
  """`"model=cnn,alpha=0.1"` as `{"model": "cnn", "alpha": "0.1"}`, the
  keys among `keys` (a config file's variants).

  Raises:
    ConfigError: naming the entry, for an unknown or repeated key or an
      entry without `=`.
  """
  variants = {}
  for entry in (arg or "").split(","):
    if not entry.strip():
      continue
    key, eq, value = (s.strip() for s in entry.partition("="))
    if not eq:
      raise ConfigError(f"--config variant {entry.strip()!r}: expected "
                        f"key=value with key among {', '.join(keys)}")
    if key not in keys:
      fail_variant(key, value, f"unknown key {key!r}; variants are "
                   f"{', '.join(keys)}")
    if key in variants:
      fail_variant(key, value, "given twice")
    variants[key] = value
  return variants


def epoch_steps(mean_examples: float, batch_size: int) -> int:
  """One local epoch of the mean client, in local steps (at least 1): the
  engine runs the same steps on every client."""
  return max(1, math.ceil(mean_examples / batch_size))


def mean_client_examples(kind: str, data_path: str) -> float:
  """A natural data set's mean train examples per client holding any,
  read from its files (Shakespeare: 80-character sequences, as
  data.text.load_text_transfer cuts them)."""
  if kind == "shakespeare":
    from fedjax_tl.data.natural import read_client_texts
    from fedjax_tl.data.text import num_sequences
    _, texts = read_client_texts(kind, data_path)
    sizes = [num_sequences(s) for s in texts["text"]]
  else:
    from fedjax_tl.data.natural import (find_files, open_readers,
                                        train_clients)
    files = find_files(kind, data_path)
    reader, _, _ = open_readers(files, kind)
    sizes = [n for _, n in train_clients(reader, None, files.origin)]
  return sum(sizes) / len(sizes)


def natural_config(data: str, method: dict[str, Any], data_path: str | None,
                   mean_examples: float | None = None
                   ) -> ml_collections.ConfigDict:
  """The adaptive-optimisation paper's setup on a natural data set, as
  configs/femnist.py, shakespeare.py and cifar100.py share it: every client
  online, 10 a round, the full model for all (one tier), client SGD without
  momentum or weight decay, `method`'s algorithm, learning rates, batch
  size and rounds, and one local epoch of the mean client as local steps,
  counted from the files at `data_path` (else `mean_examples`)."""
  c = default_config()
  c.data = data
  c.clients_per_round = 10
  c.min_availability = 1.0
  c.policy = "full"
  c.tier_fractions = (1.0,)
  c.tier_proportions = (1.0,)
  for key in ("algorithm", "client_lr", "server_lr", "server_eps",
              "batch_size", "num_rounds", "eval_every"):
    c[key] = method[key]
  c.client_momentum = 0.0
  c.weight_decay = 0.0
  c.checkpoint_every = 50
  if data_path is not None:
    c.data_path = data_path
    mean_examples = mean_client_examples(data, data_path)
  c.local_steps = epoch_steps(mean_examples, c.batch_size)
  return c


def local_steps(dataset: str, num_clients: int, epochs: int,
                batch_size: int) -> tuple[int, int]:
  """`(examples per client, local steps)` for `epochs` local epochs.

  The clients share the train split less the server's hold-out evenly; an
  epoch is ceil(examples / batch) steps.
  """
  total = TRAIN_EXAMPLES[dataset]
  pool = total - int(round(SOURCE_FRACTION * total))
  per_client = math.ceil(pool / num_clients)
  return per_client, epochs * math.ceil(per_client / batch_size)


def published_config(dataset: str, arg: str | None = None, *,
                     num_clients: int = 100, clients_per_round: int = 10,
                     defaults: dict[str, str] | None = None
                     ) -> ml_collections.ConfigDict:
  """The published setup of a method on a tfds data set, as a ConfigDict.

  Args:
    dataset: a key of TRAIN_EXAMPLES.
    arg: the variant string, `key=value` pairs joined by commas:
      `model` (one of MODELS; default: the method's paper model on the
      data set, PAPER_MODELS, else cnn), `alpha` (`iid`, or a Dirichlet
      concentration > 0 for label skew), `mix` (a named mix of MIXES,
      `pset`, or any HeteroFL mix such as `a2-b8`; default: the method's)
      and `method` (a key of METHODS).
    num_clients: clients in the population.
    clients_per_round: clients sampled each round.
    defaults: the data set's own variant defaults (e.g. `{"alpha": "1"}`).

  Returns:
    A ConfigDict that `config.validate` accepts: training from scratch
    (pretrain=none) with the method's local epochs (as steps), batch size,
    optimiser, rounds and width policy.

  Raises:
    ConfigError: a bad variant, naming its key and value.
  """
  given = parse_variants(arg)
  v = {"alpha": "iid", "method": "heterofl", **(defaults or {}), **given}
  if v["method"] not in METHODS:
    fail_variant("method", v["method"], f"must be one of {', '.join(METHODS)}")
  v.setdefault("model", PAPER_MODELS.get(dataset, {}).get(v["method"],
                                                         "cnn"))
  if v["model"] not in MODELS:
    fail_variant("model", v["model"], f"must be one of {', '.join(MODELS)}")
  method = METHODS[v["method"]]

  c = default_config()
  _set_population(c, dataset, v["model"], num_clients, clients_per_round)
  iid = _set_partition(c, v["alpha"])
  _set_mix(c, v.get("mix", method["mix"]))
  _set_method(c, method, dataset, num_clients, iid)
  return c


def _set_population(c: ml_collections.ConfigDict, dataset: str, model: str,
                    num_clients: int, clients_per_round: int) -> None:
  """The data set, its clients and HeteroFL's model sizes (the CNN's and
  MLP's; the ResNets keep their own 64-128-256-512)."""
  c.data = dataset
  c.pretrain = "none"
  c.source_fraction = SOURCE_FRACTION
  c.num_clients = num_clients
  c.clients_per_round = clients_per_round
  # Every client is online: the cohort is a uniform sample of all of them.
  c.min_availability = 1.0
  c.model = model
  c.cnn_channels = CNN_CHANNELS
  c.cnn_dense = CNN_DENSE
  c.hidden = MLP_HIDDEN


def _set_partition(c: ml_collections.ConfigDict, alpha_text: str) -> bool:
  """The `alpha` variant as the partition; returns whether it is IID.

  Raises:
    ConfigError: `alpha_text` is neither "iid" nor a number > 0.
  """
  iid = alpha_text == "iid"
  if iid:
    c.partition = "iid"
  else:
    try:
      alpha = float(alpha_text)
    except ValueError:
      alpha = float("nan")
    if not (math.isfinite(alpha) and alpha > 0):
      fail_variant("alpha", alpha_text, "must be 'iid' or a number > 0 (the "
            "Dirichlet concentration of each client's label mix)")
    c.partition = "dirichlet"
    c.alpha = alpha
  return iid


def _set_mix(c: ml_collections.ConfigDict, mix: str) -> None:
  """The `mix` variant as tier widths and shares.

  Raises:
    ConfigError: `mix` is neither named nor a valid HeteroFL mix.
  """
  if mix == "pset":
    c.tier_fractions = PSET
    c.tier_proportions = (1 / len(PSET),) * len(PSET)
  else:
    c.capacity_mix = MIXES.get(mix, mix)
    try:
      parse_capacity_mix(c.capacity_mix)
    except ConfigError as e:
      fail_variant("mix", mix, f"must be one of {', '.join([*MIXES, 'pset'])} or a "
            f"HeteroFL mix such as 'a2-b8' ({e})")


def _set_method(c: ml_collections.ConfigDict, method: dict, dataset: str,
                num_clients: int, iid: bool) -> None:
  """The method's width policy, local training, rounds and output cadence."""
  c.policy = method["policy"]
  c.heterofl_mode = method.get("heterofl_mode", "fix")
  c.fjord_distill = method.get("fjord_distill", False)
  per_client, steps = local_steps(dataset, num_clients, method["epochs"],
                                  method["batch_size"])
  c.min_examples = 1
  c.max_examples = per_client
  c.local_steps = steps
  c.batch_size = method["batch_size"]
  c.client_lr = method["client_lr"]
  c.client_momentum = method["client_momentum"]
  c.weight_decay = method["weight_decay"]
  c.num_rounds = method["rounds"][0 if iid else 1]
  c.eval_every = 10
  c.checkpoint_every = 50
