"""Shared fixtures: tiny experiments that compile and run in seconds."""

import pathlib

import jax
import numpy as np
import pytest

from fedjax_tl import config as config_lib
from fedjax_tl.data.federated import FederatedData

# Tests build many simulations whose programs are identical HLO; XLA:CPU
# compilation dominates their time, so share compiled programs on disk.
jax.config.update("jax_compilation_cache_dir",
                  str(pathlib.Path(__file__).parent.parent / ".pytest_cache" /
                      "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def tiny_config(**overrides):
  """A validated config small enough for unit tests."""
  return config_lib.validate(tiny_config_dict(**overrides))


def tiny_config_dict(**overrides):
  """The ConfigDict behind `tiny_config`."""
  cfg = config_lib.default_config()
  cfg.num_clients = 60
  cfg.clients_per_round = 12
  cfg.hidden = (16, 8)
  cfg.num_rounds = 4
  cfg.local_steps = 3
  cfg.batch_size = 5
  cfg.pretrain_steps = 30
  cfg.eval_every = 2
  cfg.checkpoint_every = 2
  cfg.chunk_size = 4
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


@pytest.fixture
def tiny_cfg():
  return tiny_config


def random_federated(num_clients=40, max_examples=12, shape=(8, 8, 1),
                     classes=10, seed=0) -> FederatedData:
  """Random padded client data with varying counts (some below a batch)."""
  rng = np.random.default_rng(seed)
  count = rng.integers(2, max_examples + 1, num_clients).astype(np.int32)
  mask = np.arange(max_examples)[None] < count[:, None]
  x = rng.normal(size=(num_clients, max_examples, *shape)).astype(np.float32)
  x *= mask.reshape(*mask.shape, *([1] * len(shape)))
  y = (rng.integers(0, classes, (num_clients, max_examples)) * mask).astype(
      np.int32)
  return FederatedData(x, y, count)
