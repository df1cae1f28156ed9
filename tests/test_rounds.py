"""Several rounds per compiled call, and client data kept in host memory.

Both must change nothing but speed and memory: checked against plain
one-round calls with the data on the device.
"""

import json

import jax
import numpy as np
import pytest

from conftest import random_federated, small_simulation, tiny_config
from fedjax_tl import placement, runner
from fedjax_tl.devices import make_population
from fedjax_tl.errors import ConfigError


def test_rounds_per_call_matches_single_rounds_and_compiles_once():
  # The default small simulation: its one-round program is shared with
  # other test files through the compilation cache.
  sim = small_simulation()
  start = sim.init(sim.model.init_params)
  one, losses = start, []
  for _ in range(3):
    one, stats = sim.round(one)
    losses.append(float(stats.train_loss))
  scanned, stats = sim.rounds(start, 3)
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(scanned)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(stats.train_loss),
                                np.asarray(losses, np.float32))
  scanned, _ = sim.rounds(scanned, 3)
  assert int(scanned.round) == 6
  assert sim._rounds_jit._cache_size() == 1


def test_host_placed_data_gives_the_device_round():
  device = small_simulation()
  host = small_simulation(data_placement="host")
  assert (device.data_placement, host.data_placement) == ("device", "host")
  assert isinstance(host.arrays.x, placement.HostRows)
  start = device.init(device.model.init_params)
  expected, _ = device.round(start)
  got, stats = host.round(start)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6,
                               atol=1e-7)
  assert int(stats.participants) > 0


def test_placement_choice_rounds_per_call_and_refusals(tmp_path, monkeypatch):
  gib = 2**30
  assert placement.choose("auto", gib, 4 * gib).where == "device"
  assert placement.choose("auto", 3 * gib, 4 * gib).where == "host"
  assert placement.choose("host", 1, 4 * gib).where == "host"
  assert placement.choose("device", gib, None).where == "device"  # unknown
  with pytest.raises(ConfigError, match=r"data_placement='device'.*3\.00 GiB"
                     r".*4\.00 GiB"):
    placement.choose("device", 3 * gib, 4 * gib)

  # The runner: a compiled call stops at every evaluation, checkpoint and
  # the end (eval 5, checkpoint 10, 23 rounds, 4 per call).
  cfg = tiny_config(num_rounds=23, eval_every=5, checkpoint_every=10,
                    rounds_per_call=4)
  done, calls = 0, []
  while done < cfg.num_rounds:
    calls.append(runner.rounds_in_call(done, cfg))
    done += calls[-1]
  assert calls == [4, 1, 4, 1, 4, 1, 4, 1, 3]

  for key, value in (("rounds_per_call", 0), ("data_placement", "gpu")):
    with pytest.raises(ConfigError, match=key):
      tiny_config(**{key: value})
  # Data that does not fit: "auto" keeps it in host memory, "device" is
  # refused before the workdir exists.
  monkeypatch.setattr(placement, "free_memory", lambda: (1000, "test"))
  data = random_federated(num_clients=5)
  population = make_population(5, (1.0, 0.5), (0.5, 0.5),
                               min_availability=0.5, seed=0)
  assert placement.data_bytes(data, population) == (
      data.x.size * 4 + data.y.size * 4 + 7 * 4 * 5)
  where = runner.place_data(tiny_config(), data, population, None)
  assert where.where == "host" and where.data_bytes > 1000
  with pytest.raises(ConfigError, match="data_placement='device'"):
    runner.run(tiny_config(data_placement="device"), tmp_path / "w",
               quiet=True)
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_run_with_rounds_per_call_writes_the_same_metrics(tmp_path):
  common = dict(num_rounds=4, eval_every=2, checkpoint_every=4,
                pretrain="none")
  plain = runner.run(tiny_config(**common), tmp_path / "plain", quiet=True)
  # 3 per call, cut to 2 by every evaluation: one program of 2 rounds.
  fast = runner.run(tiny_config(rounds_per_call=3, **common),
                    tmp_path / "fast", quiet=True)
  assert plain["data_placement"] == "device"  # tiny data fits
  assert fast["chunk_size_reason"] == "set by config.chunk_size"
  assert fast["rounds_per_call"] == 3

  def records(name):
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items()
             if k != "wall_seconds"} for line in lines]

  assert [r["round"] for r in records("fast")] == [0, 2, 4]
  assert records("fast") == records("plain")
