"""The round sharded over a `clients` mesh of forced CPU devices and processes.

XLA's forced host device count must be set before jax starts, so every
multi-device case runs in a subprocess; it checks the sharded round against
the per-client reference loop on one device.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import jax
import pytest

from conftest import FAST_COMPILE, tiny_config
from fedjax_tl import runner, sharding
from fedjax_tl.errors import ConfigError

TESTS = pathlib.Path(__file__).parent


def _run(script: str, devices: int, *args: str,
         wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
  """Runs `script` in python on `devices` forced CPU devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
             + " ".join(FAST_COMPILE),
             PYTHONPATH=os.pathsep.join(
                 [str(TESTS), os.environ.get("PYTHONPATH", "")]))
  command = [sys.executable, "-c", textwrap.dedent(script), *args]
  if not wait:
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  proc = subprocess.run(command, env=env, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


# Runs `rounds` rounds of `sim` against `reference_round` of the same
# simulation on one device (params within float tolerance), and against its
# one-device round (accounting totals).
_COMPARE = """
import jax
import numpy as np
from conftest import small_simulation
from fedjax_tl import sharding
from fedjax_tl.simulation import reference_round

def compare(sim, rounds=2, **kwargs):
  one = small_simulation(chunk_size=sim.chunk_size, cohort=sim.cohort_size,
                         **kwargs)
  state = sim.init(sim.model.init_params)
  expected = unsharded = one.init(one.model.init_params)
  for _ in range(rounds):
    state, stats = sim.round(state)
    expected = reference_round(one, expected)
    unsharded, _ = one.round(unsharded)
    for a, b in zip(jax.tree.leaves(state.params),
                    jax.tree.leaves(expected.params)):
      assert a.sharding.is_fully_replicated
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                 atol=2e-6)
    for name in expected.totals:
      np.testing.assert_allclose(np.asarray(state.totals[name]),
                                 np.asarray(unsharded.totals[name]),
                                 rtol=1e-6)
    for name in expected.privacy:
      np.testing.assert_allclose(np.asarray(state.privacy[name]),
                                 np.asarray(expected.privacy[name]),
                                 rtol=1e-5)
  return state
"""


def test_round_on_a_mesh_of_8_and_of_3_matches_the_one_device_loop():
  _run(_COMPARE + """
assert jax.device_count() == 8
mesh = sharding.make_mesh(0)
assert mesh.size == 8 and mesh.axis_names == ("clients",)
sim = small_simulation(chunk_size=8, cohort=10, mesh=mesh)
x = sim.arrays.x
assert len(x.sharding.device_set) == 8
assert x.sharding.spec == jax.sharding.PartitionSpec("clients")
# Each device holds 40 / 8 clients' rows, not a copy of all of them.
assert {s.data.shape[0] for s in x.addressable_shards} == {5}
assert sim.arrays.tier.sharding.is_fully_replicated
compare(sim)

# DP-FedAvg: every client clipped inside each device's share of a chunk,
# the noise drawn once on the replicated sums (adaptive clip norm too).
from fedjax_tl.privacy import Privacy
dp = Privacy(noise_multiplier=0.5, clip_norm=0.05, sampling_rate=0.25,
             delta=1e-5, adaptive=True, count_noise=1.0)
state = compare(small_simulation(chunk_size=8, cohort=10, mesh=mesh,
                                 privacy=dp), privacy=dp)
assert float(state.privacy["clip_norm"]) != 0.05

# 40 devices over a mesh of 3: rows padded to 42, padding never sampled;
# and the tier fast path, whose whole chunks split over the mesh.
mesh3 = sharding.make_mesh(3)
sim = small_simulation(chunk_size=6, cohort=10, mesh=mesh3,
                       tier_fast_path=True)
assert sim.arrays.x.shape[0] == 42
assert {s.data.shape[0] for s in sim.arrays.x.addressable_shards} == {14}
compare(sim)

try:
  small_simulation(chunk_size=4, mesh=mesh3)
except ValueError as e:
  assert "chunk_size 4" in str(e), e
else:
  raise AssertionError("chunk_size 4 on a mesh of 3 was accepted")
""", 8)


@pytest.mark.slow
def test_runner_on_8_devices_matches_one_device(tmp_path):
  proc = _run("""
import json, sys
from conftest import tiny_config
from fedjax_tl import runner
from fedjax_tl.errors import ConfigError

summaries = []
for devices in (8, 1):
  cfg = tiny_config(num_rounds=2, eval_every=1, chunk_size=0,
                    num_devices=devices)
  summaries.append(runner.run(cfg, f"{sys.argv[1]}/d{devices}",
                              progress=False))
assert runner.experiment_mesh(tiny_config(chunk_size=16)).size == 8
try:
  runner.experiment_mesh(tiny_config(chunk_size=6, num_devices=8))
except ConfigError as e:
  print("error:", e)
print(json.dumps(summaries))
""", 8, str(tmp_path))
  *_, error, last = proc.stdout.strip().splitlines()
  sharded, single = json.loads(last)
  assert error == ("error: config.chunk_size=6: must be a multiple of the 8 "
                   "mesh devices (num_devices=8), or 0 for automatic")
  assert "mesh clients=8" in proc.stderr
  assert sharded["mesh_devices"] == 8 and single["mesh_devices"] == 1
  assert sharded["chunk_size"] % 8 == 0
  for key in ("accuracy", "loss", "source_accuracy", "bytes_up",
              "sim_seconds"):
    assert sharded[key] == pytest.approx(single[key], rel=1e-4, abs=1e-5), key
  assert sharded["per_tier_accuracy"] == pytest.approx(
      single["per_tier_accuracy"], abs=1e-6)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_with_jax_distributed():
  # Two processes of 2 CPU devices each form one 4-device mesh (gloo CPU
  # collectives); each checks the replicated result against its own
  # one-device reference loop.
  script = _COMPARE + """
import sys
jax.distributed.initialize(f"localhost:{sys.argv[1]}", num_processes=2,
                           process_id=int(sys.argv[2]))
mesh = sharding.make_mesh(0)
assert jax.process_count() == 2 and mesh.size == 4
assert jax.local_device_count() == 2
sim = small_simulation(chunk_size=4, cohort=10, mesh=mesh)
assert len(sim.arrays.x.addressable_shards) == 2
compare(sim)
print("ok", jax.process_index())
"""
  port = str(_free_port())
  procs = [_run(script, 2, port, str(i), wait=False) for i in range(2)]
  for i, proc in enumerate(procs):
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-4000:]
    assert f"ok {i}" in out


def test_mesh_of_one_device_is_no_mesh():
  assert sharding.make_mesh(1) is None
  assert sharding.mesh_size(None) == 1
  with pytest.raises(ValueError, match="devices asked for"):
    sharding.make_mesh(jax.device_count() + 1)


def test_num_devices_beyond_those_available_is_a_config_error():
  cfg = tiny_config(num_devices=jax.device_count() + 1)
  with pytest.raises(ConfigError, match=r"config.num_devices=\d+: only"):
    runner.experiment_mesh(cfg)
  with pytest.raises(ConfigError, match="num_devices"):
    tiny_config(num_devices=-1)


@pytest.mark.parametrize("devices", [1, 3, 8])
def test_auto_chunk_size_is_a_multiple_of_the_mesh(devices):
  cfg = tiny_config(chunk_size=0, clients_per_round=12)
  size = runner.auto_chunk_size(cfg, 10_000, devices)
  assert size % devices == 0
  assert size - devices < runner.auto_chunk_size(cfg, 10_000) <= size
