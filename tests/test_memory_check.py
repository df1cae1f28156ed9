"""The up-front memory estimate (issue 20, experiment/memory.py) against
sizes counted by hand; the refusals through the CLI are cases of
tests/test_workdir_trust.py's table."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import tiny_config
from fedjax_tl import cost
from fedjax_tl.errors import ConfigError
from fedjax_tl.experiment import build, memory

# The tiny config: 60 digits clients of 48 (+10 local test) examples, an
# MLP 64-16-8-10, batch 5, chunks of 4 clients, FedAvg, no momentum.
TINY_PARAMS = (64 * 16 + 16) + (16 * 8 + 8) + (8 * 10 + 10)  # 1,266
TINY_DATA = 60 * (
    (48 + 10) * (8 * 8 * 1 * 4 + 4)  # float32 images + int32 labels
    + 2 * 4)  # the two int32 counts (training, local test)
TINY_POPULATION = 60 * 7 * 4  # seven 4-byte vectors per device
TINY_MODEL = 4 * TINY_PARAMS * 3  # params, sum of updates, sum of weights
# Per client: held params + their gradient + a batch's activations.
TINY_CLIENT = 4 * (2 * TINY_PARAMS + 5 * (16 + 8 + 10))


def test_estimate_of_the_tiny_config_by_hand():
  cfg = tiny_config()
  plan = memory.estimate(cfg, memory.header_before_loading(cfg))
  assert plan.num_params == TINY_PARAMS
  assert plan.data_bytes == TINY_DATA + TINY_POPULATION
  assert plan.model_bytes == TINY_MODEL
  assert (plan.chunk_size, plan.client_bytes) == (4, TINY_CLIENT)
  assert plan.total == TINY_DATA + TINY_POPULATION + TINY_MODEL + \
      4 * TINY_CLIENT


def test_digits_header_equals_the_loaded_client_arrays():
  """The config-only size of the digits' client arrays is what the loader
  then allocates for them (the fixed source and test pools aside)."""
  cfg = tiny_config()
  data = build.load_data(cfg)
  loaded = sum(a.nbytes for part in (data.clients, data.client_test)
               for a in (part.x, part.y, part.count))
  assert memory.digits_header(cfg).data_bytes == loaded == TINY_DATA


def test_loaded_header_counts_every_array_once():
  """Sources without a header are sized once loaded: every array of the
  data, summed by hand here."""
  data = build.load_data(tiny_config())
  parts = (data.clients, data.client_test, data.source_train,
           data.source_test, data.target_test)
  by_hand = sum(a.nbytes for part in parts for a in vars(part).values()
                if isinstance(a, np.ndarray))
  assert data.source_test is not data.target_test  # digits: distinct sets
  header = memory.loaded_header(data)
  assert header.data_bytes == by_hand > TINY_DATA
  assert (header.clients, header.input_shape, header.num_classes) == (
      (60, 48), (8, 8, 1), 10)


def test_adam_and_momentum_add_their_slots():
  cfg = tiny_config(algorithm="fedadam", client_momentum=0.9)
  plan = memory.estimate(cfg, memory.header_before_loading(cfg))
  assert plan.model_bytes == 4 * TINY_PARAMS * (3 + 2)
  assert plan.client_bytes == 4 * (3 * TINY_PARAMS + 5 * (16 + 8 + 10))


def test_full_training_memory_equals_the_masked_estimate_of_a_full_model():
  """The shapes-only formula is `training_memory_bytes` without masks, on
  a conv model too (its positions)."""
  from fedjax_tl.models import build_model
  model = build_model("cnn", (8, 8, 1), 10, seed=0, cnn_channels=(4, 8),
                      cnn_dense=16)
  positions = cost.conv_positions((8, 8, 1), model.layers, model.init_params)
  for slots in (0, 2):
    assert cost.full_training_memory_bytes(
        model.layers, model.init_params, batch_size=3, positions=positions,
        optimizer_slots=slots) == int(cost.training_memory_bytes(
            model.layers, model.init_params, batch_size=3,
            positions=positions, optimizer_slots=slots))


def test_npz_header_reads_only_the_headers(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / "d.npz"
  np.savez(path, num_classes=np.int64(7),
           source_x=rng.random((20, 4, 4, 1)), source_y=np.zeros(20, int),
           clients_x=rng.random((6, 5, 4, 4, 1)),  # float64: held as float32
           clients_y=np.zeros((6, 5), np.int32),
           clients_count=np.full(6, 5, np.int64),
           test_x=rng.random((10, 4, 4, 1)), test_y=np.zeros(10, np.int64))
  header = memory.npz_header(path)
  assert header.clients == (6, 5) and header.input_shape == (4, 4, 1)
  assert header.num_classes == 7
  assert header.data_bytes == (
      20 * 16 * 4 + 20 * 8 + 6 * 5 * 16 * 4 + 6 * 5 * 4 + 6 * 8 +
      10 * 16 * 4 + 10 * 8 + 8)
  (tmp_path / "bad.npz").write_bytes(b"not a zip")
  assert memory.npz_header(tmp_path / "bad.npz") is None  # the loader says


def test_refused_over_the_limit_unless_memory_check_is_off(monkeypatch):
  monkeypatch.setattr(memory, "available",
                      lambda: [("all", TINY_DATA, "test")])
  cfg = tiny_config()
  # 965,384 bytes needed (942.8 KiB), 905,280 available (884.1 KiB).
  with pytest.raises(ConfigError, match=r"the plan needs ~942\.8 KiB: client "
                     r"data 885\.7 KiB .* over the 884\.1 KiB available "
                     r"\(test\)"):
    memory.check_memory(cfg, memory.header_before_loading(cfg))
  plan = memory.check_memory(tiny_config(memory_check=False),
                             memory.header_before_loading(cfg))
  assert plan.total > TINY_DATA
