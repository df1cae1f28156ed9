"""Cost model: FLOPs, bytes, memory and seconds by hand; deadlines by loop;
each tier's reported costs (summary.json) by hand on a small MLP."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fedjax_tl import cost, runner
from fedjax_tl.experiment import summary as summary_lib
from fedjax_tl.policies import capacity
from fedjax_tl.models import axes, build_model

# MLP 4 -> 8 -> 6 -> 3.
MLP_LAYERS = (axes.dense("dense_0", None, "h0"),
              axes.dense("dense_1", "h0", "h1"), axes.dense("head", "h1", None))
# The numpy reference's own description: (layer, input group, output group,
# flatten repeat), groups by index.
MLP_HAND = (("dense_0", None, 0, 1), ("dense_1", 0, 1, 1),
            ("head", 1, None, 1))
MLP_SHAPES = {"dense_0": ((4, 8), (8,)), "dense_1": ((8, 6), (6,)),
              "head": ((6, 3), (3,))}
# CNN on 8x8x1: conv 4, pool, conv 6, pool (2x2 left), dense 5, head 10.
CNN_LAYERS = (axes.conv("conv_0", None, "channels_0"),
              axes.conv("conv_1", "channels_0", "channels_1"),
              axes.dense("dense_0", axes.Axis("channels_1", repeat=4),
                         "dense"),
              axes.dense("head", "dense", None))
CNN_HAND = (("conv_0", None, 0, 1), ("conv_1", 0, 1, 1),
            ("dense_0", 1, 2, 4), ("head", 2, None, 1))
CNN_SHAPES = {"conv_0": ((3, 3, 1, 4), (4,)), "conv_1": ((3, 3, 4, 6), (6,)),
              "dense_0": ((24, 5), (5,)), "head": ((5, 10), (10,))}


def _params(shapes):
  return {name: {"kernel": np.zeros(k, np.float32),
                 "bias": np.zeros(b, np.float32)}
          for name, (k, b) in shapes.items()}


def _first_k_mask(shapes, hand, kept):
  """Masks keeping the first kept[g] units of each hidden group, in numpy."""
  masks = {}
  for name, in_group, out_group, in_repeat in hand:
    k_shape, b_shape = shapes[name]
    n_in, n_out = k_shape[-2], k_shape[-1]
    u_out = np.ones(n_out)
    if out_group is not None:
      u_out[kept[out_group]:] = 0
    u_in = np.ones(n_in)
    if in_group is not None:
      # Flattened [H, W, C] inputs: channel c sits at every index = c mod C.
      channels = n_in // in_repeat
      u_in = (np.arange(n_in) % channels < kept[in_group]).astype(float)
    masks[name] = {"kernel": np.broadcast_to(np.outer(u_in, u_out),
                                                  k_shape).astype(np.float32),
                        "bias": u_out.astype(np.float32)}
  return masks


def test_mlp_flops_by_hand():
  params = _params(MLP_SHAPES)
  assert float(cost.forward_flops(MLP_LAYERS, params)) == 2 * (32 + 48 + 18)
  half = _first_k_mask(MLP_SHAPES, MLP_HAND, (4, 3))
  # 2 x (4*4 + 4*3 + 3*3).
  assert float(cost.forward_flops(MLP_LAYERS, params, half)) == 74
  np.testing.assert_allclose(cost.flops_fraction(MLP_LAYERS, params, half),
                             74 / 196, rtol=1e-6)


def test_cnn_flops_by_hand():
  params = _params(CNN_SHAPES)
  positions = cost.conv_positions((8, 8, 1), CNN_LAYERS, params)
  assert positions == {"conv_0": 64, "conv_1": 16}
  full = 2 * (9 * 1 * 4 * 64 + 9 * 4 * 6 * 16 + 24 * 5 + 5 * 10)
  assert full == 11860
  assert float(cost.forward_flops(CNN_LAYERS, params,
                                  positions=positions)) == full
  half = _first_k_mask(CNN_SHAPES, CNN_HAND, (2, 3, 3))
  # conv 1->2 ch, conv 2->3 ch, dense (4 positions x 3 ch)->3, head 3->10.
  expected = 2 * (9 * 1 * 2 * 64 + 9 * 2 * 3 * 16 + 12 * 3 + 3 * 10)
  assert expected == 4164
  assert float(cost.forward_flops(CNN_LAYERS, params, half, positions)
               ) == expected
  with pytest.raises(ValueError, match="conv_0"):
    cost.forward_flops(CNN_LAYERS, params)


def test_built_models_agree_with_hand_masks():
  # The real CNN has the hand fixture's shapes and capacity's masks count the
  # same FLOPs as the hand masks.
  model = build_model("cnn", (8, 8, 1), 10, seed=0, cnn_channels=(4, 6),
                      cnn_dense=5)
  shapes = jax.tree.map(jnp.shape, model.init_params)
  assert shapes == {n: {"kernel": k, "bias": b}
                    for n, (k, b) in CNN_SHAPES.items()}
  # The built specs carry their conv output positions, which the hand
  # fixture leaves to conv_positions' SAME-and-pool rule: the same counts.
  assert tuple(dataclasses.replace(spec, positions=None)
               for spec in model.layers) == CNN_LAYERS
  positions = cost.conv_positions((8, 8, 1), model.layers, model.init_params)
  assert positions == cost.conv_positions((8, 8, 1), CNN_LAYERS,
                                          model.init_params) == {
                                              "conv_0": 64, "conv_1": 16}
  masks = capacity.width_masks(jnp.float32(0.5), model.layers,
                               model.init_params)
  assert float(cost.forward_flops(model.layers, model.init_params, masks,
                                  positions)) == 4164


def test_mask_bytes_by_hand():
  params = _params(MLP_SHAPES)
  half = _first_k_mask(MLP_SHAPES, MLP_HAND, (4, 3))
  # Kernels 16 + 12 + 9, biases 4 + 3 + 3.
  assert int(cost.mask_count(half)) == 47
  assert float(cost.mask_bytes(half)) == 47 * 4
  full = jax.tree.map(np.ones_like, params)
  assert float(cost.mask_bytes(full)) == 4 * (32 + 8 + 48 + 6 + 18 + 3)
  # Broadcasting masks count what they cover once given the params.
  scalar = jax.tree.map(lambda p: np.float32(1), params)
  assert int(cost.mask_count(scalar, params)) == 115
  assert int(cost.mask_count(scalar)) == 6


def test_flops_and_bytes_under_vmap_and_jit():
  params = _params(MLP_SHAPES)
  masks = [_first_k_mask(MLP_SHAPES, MLP_HAND, kept)
           for kept in ((8, 6), (4, 3), (1, 1))]
  stacked = jax.tree.map(lambda *m: jnp.stack(m), *masks)
  frac = jax.jit(jax.vmap(
      lambda m: cost.flops_fraction(MLP_LAYERS, params, m)))(stacked)
  nbytes = jax.jit(jax.vmap(cost.mask_bytes))(stacked)
  np.testing.assert_allclose(frac, np.array([196, 74, 2 * (4 + 1 + 3)]) / 196,
                             rtol=1e-6)
  np.testing.assert_array_equal(nbytes, [460, 188, 4 * (4 + 1 + 1 + 1 + 3 + 3)])


def test_training_memory_by_hand():
  params = _params(MLP_SHAPES)
  half = _first_k_mask(MLP_SHAPES, MLP_HAND, (4, 3))
  head_only = jax.tree.map(np.zeros_like, half)
  head_only["head"] = half["head"]
  # Held 47, trained 12 (head 3x3 + 3) with Adam (grad + 2 slots),
  # activations 4 + 3 + 3 per example for 10 examples.
  got = cost.training_memory_bytes(MLP_LAYERS, params, half, head_only,
                                   batch_size=10, optimizer_slots=2)
  assert float(got) == 4 * (47 + 12 * 3 + 10 * 10)
  # Full model, SGD momentum, batch 2: 115 + 115 * 2 + 2 * (8 + 6 + 3).
  got = cost.training_memory_bytes(MLP_LAYERS, params, batch_size=2)
  assert float(got) == 4 * (115 + 230 + 34)
  # CNN activations count conv outputs at their positions (before pooling).
  cparams = _params(CNN_SHAPES)
  positions = cost.conv_positions((8, 8, 1), CNN_LAYERS, cparams)
  n = sum(math.prod(k) + math.prod(b) for k, b in CNN_SHAPES.values())
  got = cost.training_memory_bytes(CNN_LAYERS, cparams, batch_size=1,
                                   positions=positions, optimizer_slots=0)
  assert float(got) == 4 * (2 * n + 4 * 64 + 6 * 16 + 5 + 10)


def test_seconds_by_hand():
  # 3 x 10 x 2 ms x 0.25 = 15 ms per step; 5 steps = 75 ms.
  np.testing.assert_allclose(cost.step_seconds(2.0, 0.25, batch_size=10),
                             0.015, rtol=1e-6)
  np.testing.assert_allclose(
      cost.train_seconds(2.0, 0.25, batch_size=10, local_steps=5), 0.075,
      rtol=1e-6)
  # 1 MB down at 8 Mbit/s = 1 s; 0.5 MB up at 2 Mbit/s = 2 s.
  np.testing.assert_allclose(cost.comm_seconds(1e6, 5e5, 8000.0, 2000.0),
                             3.0, rtol=1e-6)
  # One bandwidth for both: 1.5 MB at 4 Mbit/s = 3 s.
  np.testing.assert_allclose(cost.comm_seconds(1e6, 5e5, 4000.0), 3.0,
                             rtol=1e-6)
  np.testing.assert_allclose(cost.ms_per_sample_from_gflops(40.0, 2e6), 0.05,
                             rtol=1e-6)


@pytest.mark.parametrize("mode,step,comm,deadline,local,steps,finish", [
    ("partial", 2.0, 4.0, 10.0, 5, 3, 10.0),
    ("partial", 2.0, 4.0, 3.0, 5, 0, np.inf),
    ("partial", 0.5, 1.0, 100.0, 5, 5, 3.5),
    ("partial", 0.0, 1.0, 2.0, 5, 5, 1.0),
    ("partial", 0.0, 1.0, 0.5, 5, 0, np.inf),
    ("partial", 2.0, 4.0, np.inf, 5, 5, 14.0),
    # Finishing exactly at the deadline is on time.
    ("drop", 2.0, 4.0, 10.0, 3, 3, 10.0),
    ("drop", 2.0, 4.0, 10.0, 5, 0, np.inf),
    ("drop", 2.0, 4.0, np.inf, 5, 5, 14.0),
])
def test_deadline_by_hand(mode, step, comm, deadline, local, steps, finish):
  out = cost.apply_deadline(jnp.float32([step]), jnp.float32([comm]),
                            deadline, local_steps=local, mode=mode)
  assert int(out.steps[0]) == steps
  assert bool(out.participates[0]) == (steps > 0)
  assert float(out.finish_seconds[0]) == finish


@pytest.mark.parametrize("mode", ["drop", "partial"])
def test_deadline_matches_a_python_loop(mode):
  rng = np.random.default_rng(1)
  n, local = 500, 6
  step = rng.uniform(0.0, 3.0, n).astype(np.float32)
  comm = rng.uniform(0.0, 10.0, n).astype(np.float32)
  deadline = 12.0
  fn = jax.jit(functools.partial(cost.apply_deadline, local_steps=local,
                                 mode=mode))
  steps, participates, finish = map(np.asarray, fn(step, comm, deadline))
  for i in range(n):
    s, c = float(step[i]), float(comm[i])
    if mode == "drop":
      k = local if c + local * s <= deadline else 0
    else:
      k = max(0, min(local, math.floor((deadline - c) / s)))
    assert steps[i] == k, i
    assert participates[i] == (k > 0), i
    want = c + k * s if k else math.inf
    assert finish[i] == pytest.approx(want, rel=1e-5), i
  assert 0 < participates.sum() < n


def test_bad_deadline_mode():
  with pytest.raises(ValueError, match="sometimes"):
    cost.apply_deadline(jnp.ones(2), jnp.ones(2), 1.0, local_steps=1,
                        mode="sometimes")


def test_first_to_finish_matches_a_python_loop():
  rng = np.random.default_rng(2)
  fn = jax.jit(cost.first_to_finish)
  n = 24  # one shape, one compilation
  for _ in range(20):
    # Small integers force ties; some clients never finish.
    finish = rng.integers(0, 8, n).astype(np.float32)
    finish[rng.random(n) < 0.2] = np.inf
    valid = rng.random(n) < 0.8
    k = int(rng.integers(0, n + 2))
    eligible = sorted((float(finish[i]), i) for i in range(n)
                      if valid[i] and np.isfinite(finish[i]))
    expected = np.zeros(n, bool)
    for _, i in eligible[:k]:
      expected[i] = True
    np.testing.assert_array_equal(fn(finish, k, valid), expected, str(k))
  np.testing.assert_array_equal(
      cost.first_to_finish(jnp.float32([3, 1, 2, 1]), 2), [False, True,
                                                            False, True])


# The tiny config's MLP 64 -> 16 -> 8 -> 10: each tier's kept hidden units
# under a width policy, and the layers a depth policy's tier trains (of 3).
TIERS = ("1", "0.5", "0.25", "0.125")
KEPT = {"1": (16, 8), "0.5": (8, 4), "0.25": (4, 2), "0.125": (2, 1)}
TOP_LAYERS = {"1": 3, "0.5": 2, "0.25": 1, "0.125": 1}


def _mlp_by_hand(h1, h2):
  """(params, kernel entries) of the MLP 64 -> h1 -> h2 -> 10."""
  kernels = (64 * h1, h1 * h2, h2 * 10)
  return sum(kernels) + h1 + h2 + 10, sum(kernels)


def _trained_by_hand(policy, tier):
  """(held params, kernel entries, trained params, layer outputs) of what a
  client of `tier` trains; None when the policy never trains the tier."""
  if policy == "uniform_full_only" and tier != "1":
    return None
  if policy == "partial_finetune":  # the whole model, its top layers trained
    held, kernels = _mlp_by_hand(16, 8)
    layer_params = (64 * 16 + 16, 16 * 8 + 8, 8 * 10 + 10)  # bottom to top
    return held, kernels, sum(layer_params[-TOP_LAYERS[tier]:]), 16 + 8 + 10
  # Width policies: the first-k sub-model, all of it trained; at 1/8 for
  # every tier under uniform_smallest.
  h1, h2 = KEPT["0.125" if policy == "uniform_smallest" else tier]
  held, kernels = _mlp_by_hand(h1, h2)
  return held, kernels, held, h1 + h2 + 10


@pytest.mark.parametrize("policy", ["heterofl", "partial_finetune",
                                    "uniform_smallest", "uniform_full_only"])
def test_per_tier_costs_by_hand(policy):
  cfg = tiny_config(policy=policy, batch_size=5, local_steps=3)
  exp = runner.build_experiment(cfg)
  sim = exp.simulation
  costs = sim.time_model.tier_costs(
      sim.arrays, *sim.sampler.device_widths(sim.arrays, sim.seed))
  arrays = jax.tree.map(np.asarray, sim.arrays)
  record = summary_lib.model_record(exp)
  seconds = []
  for i, tier in enumerate(TIERS):
    # The deployed model is the tier's own width slice (the whole model
    # under partial fine-tuning), whoever trains it.
    deployed, deployed_kernels = (
        _mlp_by_hand(16, 8) if policy == "partial_finetune" else
        _mlp_by_hand(*KEPT[tier]))
    assert record["per_tier_params"][tier] == deployed
    assert record["per_tier_model_bytes"][tier] == 4 * deployed
    # A dense layer: 2 x in x out FLOPs per example forward.
    assert record["per_tier_flops"][tier] == 2 * deployed_kernels
    trained = _trained_by_hand(policy, tier)
    if trained is None:  # the tier never trains: no training cost
      assert all(np.isnan(costs[k][i]) for k in costs)
      seconds.append(np.nan)
      continue
    held, kernels, train, outs = trained
    # Memory: 4 bytes x (held + trained x (grad, no momentum) + batch x
    # layer outputs).
    assert costs["train_memory_bytes"][i] == 4 * (held + train + 5 * outs)
    # A training step: 3 x the forward FLOPs, x5 examples.
    assert costs["train_flops_per_step"][i] == 3 * 5 * 2 * kernels
    # Width policies send the sub-model both ways; partial fine-tuning the
    # whole model down and its trained layers up.
    assert costs["client_bytes_down"][i] == 4 * held
    assert costs["client_bytes_up"][i] == 4 * train
    # A round on a device: download, 3 steps of its sub-model at its
    # GFLOP/s, upload; the tier's mean (no deadline, no memory cap).
    mine = arrays.tier == i
    step = 3 * 5 * 2 * kernels / (arrays.compute_gflops[mine] * 1e9)
    comm = (4 * held * 8 / 1000 / arrays.down_kbps[mine] +
            4 * train * 8 / 1000 / arrays.up_kbps[mine])
    seconds.append(np.mean(3 * step + comm))
  np.testing.assert_allclose(costs["round_seconds"], seconds, rtol=1e-5)

  # Traffic per round: the final record's totals over the rounds run.
  final = {f"per_tier_bytes_{way}": {t: 1000.0 * (i + 1) * (2 if way == "up"
                                                              else 1)
                                      for i, t in enumerate(TIERS)}
           for way in ("down", "up")}
  got = summary_lib.tier_cost_record(exp, final, rounds=4)
  assert got["per_tier_bytes_down_per_round"] == {
      t: 250.0 * (i + 1) for i, t in enumerate(TIERS)}
  assert got["per_tier_bytes_up_per_round"] == {
      t: 500.0 * (i + 1) for i, t in enumerate(TIERS)}
  assert got["slowest_tier"] == TIERS[int(np.nanargmax(seconds))]
  assert got["per_tier_round_seconds"] == {
      t: None if np.isnan(s) else pytest.approx(s, rel=1e-5)
      for t, s in zip(TIERS, seconds)}
