"""The tier fast path against the masked round and the per-client loop."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_rounds_agree, small_simulation, tiny_config
from fedjax_tl import runner, tiered
from fedjax_tl.errors import ConfigError
from fedjax_tl.models import build_model
from fedjax_tl.models import axes


def _simulation(model="mlp", algorithm="fedavg", cohort=10, chunk_size=3,
                **policy):
  return small_simulation(chunk_size, algorithm, cohort, model=model,
                          batch_size=4, **policy)


# `full` runs in test_full_width_lowered_by_memory_caps.
@pytest.mark.parametrize("model,algorithm,policy", [
    ("mlp", "fedavg", dict(policy="heterofl", scaler=True, masked_ce=True)),
    ("mlp", "fedadam", dict(policy="heterofl", heterofl_mode="dynamic")),
    ("mlp", "fedavg", dict(policy="importance", masked_ce=True)),
    ("mlp", "fedavg", dict(policy="uniform_smallest")),
    ("mlp", "fedavg", dict(policy="uniform_full_only")),
    ("mlp", "fedavg", dict(policy="heterofl", overcommit=1.5)),
    ("cnn", "fedavg", dict(policy="heterofl", scaler=True, masked_ce=True)),
    ("cnn", "fedavg", dict(policy="heterofl", heterofl_mode="dynamic")),
    # Chunks of one client run unbatched (engine.state.map_clients).
    ("cnn", "fedavg", dict(policy="heterofl", scaler=True, chunk_size=1)),
])
def test_tiered_round_equals_masked_round_and_loop(model, algorithm, policy):
  # The CNN's second round amplifies float32 rounding (up to 1e-5 measured,
  # with masks on params or on activations).
  assert_rounds_agree(_simulation(model, algorithm, **policy),
                       atol=2e-5 if model == "cnn" else 2e-6)


def test_whole_chunks_then_a_tail_chunk():
  # Chunks of 8, then tail chunks of 2. A tier's chunk counts are data, not
  # code: HeteroFL's three tiers run one program per chunk size, through
  # whole chunks, tail chunks and a tier with no whole chunk at all.
  sim = _simulation(policy="heterofl", cohort=20, chunk_size=8)
  assert tiered.chunk_sizes(8) == (8, 2)
  plan = sim.cohort(sim.arrays, jnp.int32(0))
  aggregated = np.asarray(plan.weight) > 0
  tiers = np.asarray(sim.arrays.tier)[np.asarray(plan.ids)[aggregated]]
  counts = np.bincount(tiers, minlength=3)
  assert counts.max() >= 8 and counts.min() < 8 and np.any(counts % 8)
  assert_rounds_agree(sim)


@pytest.mark.parametrize("mode", ["partial", "drop"])
def test_tiered_round_keeps_deadline_steps_and_drops(mode):
  masked = _simulation(policy="heterofl", round_deadline=0.0)
  plan = masked.cohort(masked.arrays, jnp.int32(0))
  finish = np.asarray(plan.finish)[np.asarray(plan.valid)]
  # Between the fastest and slowest device: some are late.
  deadline = float(np.median(finish))
  masked = dataclasses.replace(masked, round_deadline=deadline,
                               deadline_mode=mode)
  steps = np.asarray(masked.cohort(masked.arrays, jnp.int32(0)).num_steps)
  assert np.any(steps < 3)
  assert_rounds_agree(masked, rounds=1)


def test_a_tier_without_clients():
  # Tier 1 (width 1/2) offline: its loop runs no chunk at all.
  sim = _simulation(policy="heterofl")
  tier = np.asarray(sim.arrays.tier)
  availability = np.where(tier == 1, 0.0, 1.0).astype(np.float32)
  sim = dataclasses.replace(sim, arrays=sim.arrays._replace(
      availability=jnp.asarray(availability)))
  plan = sim.cohort(sim.arrays, jnp.int32(0))
  tiers = np.asarray(sim.arrays.tier)[np.asarray(plan.ids)]
  assert not np.any((tiers == 1) & np.asarray(plan.valid))
  assert_rounds_agree(sim, rounds=1)


def test_full_width_lowered_by_memory_caps():
  # Each tier's devices fit only their tier's width: `full` is capped.
  sim = _simulation(policy="full")
  levels = (0.25, 0.5, 1.0)
  need = np.asarray(sim.time_model.training_memory(jnp.asarray(levels)))
  fits = np.asarray([need[2], (need[1] + need[2]) / 2,
                     (need[0] + need[1]) / 2])  # per tier 1, 1/2, 1/4
  sim = dataclasses.replace(sim, arrays=sim.arrays._replace(
      memory_bytes=jnp.asarray(fits[np.asarray(sim.arrays.tier)],
                               jnp.float32)))
  plan = sim.cohort(sim.arrays, jnp.int32(0))
  fraction = np.asarray(plan.fraction)[np.asarray(plan.weight) > 0]
  assert set(fraction.tolist()) == set(levels)
  assert_rounds_agree(sim, rounds=1)


def test_no_recompilation_after_the_first_round():
  sim = dataclasses.replace(_simulation(policy="heterofl"),
                            tier_fast_path=True)
  traces = []
  original = tiered.tiered_round

  def counting(*args):
    traces.append(1)
    return original(*args)

  tiered.tiered_round = counting
  try:
    state = sim.init(sim.model.init_params)
    for _ in range(4):  # rounds with different per-tier client counts
      state, _ = sim.round(state)
  finally:
    tiered.tiered_round = original
  assert len(traces) == 1
  assert sim._round_jit._cache_size() == 1


def test_slice_and_pad_address_the_flatten_rows_by_hand():
  # A flatten of [positions=3, channels=4] into 5 dense units; keep 2 and 3.
  spec = axes.dense("dense", axes.Axis("channels", repeat=3), "units")
  kernel = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
  params = {"dense": {"kernel": jnp.asarray(kernel),
                      "bias": jnp.arange(5.0)}}
  sub = axes.first_k(params, [spec], {"channels": 2, "units": 3})
  rows = [pos * 4 + c for pos in range(3) for c in range(2)]
  np.testing.assert_array_equal(np.asarray(sub["dense"]["kernel"]),
                                kernel[rows][:, :3])
  np.testing.assert_array_equal(np.asarray(sub["dense"]["bias"]), [0, 1, 2])
  back = axes.pad_first_k(sub, params, [spec])
  expected = np.zeros_like(kernel)
  expected[rows, :3] = kernel[rows][:, :3]
  np.testing.assert_array_equal(np.asarray(back["dense"]["kernel"]), expected)
  np.testing.assert_array_equal(np.asarray(back["dense"]["bias"]),
                                [0, 1, 2, 0, 0])


def test_ineligible_policy_is_refused():
  with pytest.raises(ValueError, match="fedrolex"):
    dataclasses.replace(_simulation(policy="fedrolex"),
                        tier_fast_path=True)._round_jit


def test_config_key_defaults_per_policy_and_rejects_ineligible():
  cfg = tiny_config(policy="heterofl")
  assert cfg.tier_fast_path is None
  on_cpu = jax.default_backend() == "cpu"
  assert runner.auto_tier_fast_path(cfg, 9_610) is not on_cpu
  assert runner.auto_tier_fast_path(cfg, 300_000) is True
  assert runner.auto_tier_fast_path(tiny_config(policy="fjord"),
                                    300_000) is False
  assert tiny_config(policy="heterofl",
                     tier_fast_path=False).tier_fast_path is False
  with pytest.raises(ConfigError, match=r"tier_fast_path=True.*fed_dropout"):
    tiny_config(policy="fed_dropout", tier_fast_path=True)


def test_dropout_draws_the_same_masks_on_the_tier_fast_path():
  # Dropout keys per unit: the sliced width-1/4 model drops the same units
  # as the full-size masked round (and the per-client loop). One width
  # compiles one client; conv sites slice alike (test_models).
  model = build_model("mlp", (8, 8, 1), 10, seed=0, hidden=(16, 8),
                      dropout=0.5)
  masked = small_simulation(3, "fedavg", 10, model_def=model, batch_size=4,
                            policy="uniform_smallest", scaler=True)
  assert_rounds_agree(masked, rounds=1)
