"""HetLoRA: adapters, rank masks, norm-weighted padded merge, self-pruning."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_simulation
from fedjax_tl import aggregators
from fedjax_tl.policies import lora
from fedjax_tl.models import build_model
from fedjax_tl.simulation import reference_round

R_MAX = 6


def _adapted(seed=0):
  model = build_model("mlp", (8, 8, 1), 10, seed=seed, hidden=(16, 8))
  return lora.adapter_model(model, R_MAX, seed)


def _random_adapters(params, seed):
  """Adapters with random non-zero values (lora_b starts at zero)."""
  rng = np.random.default_rng(seed)
  return {name: {**layer,
                 "lora_a": jnp.asarray(rng.normal(size=layer["lora_a"].shape),
                                       jnp.float32),
                 "lora_b": jnp.asarray(rng.normal(size=layer["lora_b"].shape),
                                       jnp.float32)}
          for name, layer in params.items()}


def test_adapted_model_computes_kernel_plus_a_b_by_hand():
  model = _adapted()
  params = _random_adapters(model.init_params, 1)
  x = np.random.default_rng(2).normal(size=(3, 8, 8, 1)).astype(np.float32)
  h = x.reshape(3, -1)
  p = jax.tree.map(np.asarray, params)
  for name in ("dense_0", "dense_1"):
    w = p[name]["kernel"] + p[name]["lora_a"] @ p[name]["lora_b"]
    h = np.maximum(h @ w + p[name]["bias"], 0)
  w = p["head"]["kernel"] + p["head"]["lora_a"] @ p["head"]["lora_b"]
  expected = h @ w + p["head"]["bias"]
  np.testing.assert_allclose(model.apply(params, jnp.asarray(x)), expected,
                             rtol=1e-4, atol=1e-4)
  # Fresh adapters change nothing: lora_b starts at zero.
  base = lora.backbone(model.init_params)
  np.testing.assert_array_equal(lora.merged(model.init_params)["head"]
                                ["kernel"], base["head"]["kernel"])


@pytest.mark.parametrize("fraction,rank", [(1.0, 6), (0.5, 3), (0.25, 2),
                                           (0.1, 1)])
def test_rank_masks_hold_first_components_and_freeze_backbone(fraction, rank):
  params = _adapted().init_params
  assert int(lora.client_rank(jnp.float32(fraction), R_MAX)) == rank
  present, train = lora.rank_masks(lora.client_rank(jnp.float32(fraction),
                                                    R_MAX), params)
  for name, layer in params.items():
    fan_in, out = layer["lora_a"].shape[0], layer["lora_b"].shape[1]
    a = np.zeros((fan_in, R_MAX))
    a[:, :rank] = 1
    b = np.zeros((R_MAX, out))
    b[:rank] = 1
    for masks in (present, train):
      np.testing.assert_array_equal(masks[name]["lora_a"], a)
      np.testing.assert_array_equal(masks[name]["lora_b"], b)
    np.testing.assert_array_equal(present[name]["kernel"], 1)
    np.testing.assert_array_equal(train[name]["kernel"], 0)
    np.testing.assert_array_equal(train[name]["bias"], 0)


def _numpy_hetlora(global_params, locals_and_ranks, padded=True):
  """HetLoRA's merge by hand: sum_k w_k pad(F_k) / sum_k w_k per layer."""
  new = {}
  for name, g in global_params.items():
    a_sum = np.zeros(g["lora_a"].shape)
    b_sum = np.zeros(g["lora_b"].shape)
    a_w = np.zeros(g["lora_a"].shape)
    b_w = np.zeros(g["lora_b"].shape)
    for local, rank in locals_and_ranks:
      a = np.array(local[name]["lora_a"], np.float64)
      b = np.array(local[name]["lora_b"], np.float64)
      a[:, rank:] = 0
      b[rank:] = 0
      w = np.linalg.norm(a @ b)
      held_a = np.ones_like(a)
      held_b = np.ones_like(b)
      if not padded:
        held_a[:, rank:] = 0
        held_b[rank:] = 0
      a_sum += w * a * held_a
      b_sum += w * b * held_b
      a_w += w * held_a
      b_w += w * held_b
    ga, gb = np.asarray(g["lora_a"]), np.asarray(g["lora_b"])
    new[name] = {
        "lora_a": np.where(a_w > 0, a_sum / np.where(a_w > 0, a_w, 1), ga),
        "lora_b": np.where(b_w > 0, b_sum / np.where(b_w > 0, b_w, 1), gb)}
  return new


@pytest.mark.parametrize("padded", [True, False])
def test_aggregation_terms_give_norm_weighted_padded_mean(padded):
  global_params = _random_adapters(_adapted().init_params, 0)
  clients = [(_random_adapters(global_params, 10 + k), rank)
             for k, rank in enumerate((6, 3, 1, 3))]
  num, den = aggregators.zeros_like_sums(global_params)
  for local, rank in clients:
    delta, weight = lora.aggregation_terms(global_params, local,
                                           jnp.int32(rank), padded=padded)
    stack = lambda t: jax.tree.map(lambda a: a[None], t)
    num, den = aggregators.add_weighted(num, den, stack(delta), stack(weight),
                                        jnp.ones(1))
  mean, held = aggregators.masked_mean(num, den)
  expected = _numpy_hetlora(global_params, clients, padded)
  for name, layer in expected.items():
    for key in lora.LORA_KEYS:
      got = np.where(held[name][key], global_params[name][key] +
                     mean[name][key], global_params[name][key])
      np.testing.assert_allclose(got, layer[key], rtol=1e-4, atol=1e-5)
    # The frozen backbone is held by no client: never updated.
    assert not np.any(held[name]["kernel"])


def test_self_pruning_drops_a_small_tail_only():
  params = _random_adapters(_adapted().init_params, 3)
  rank = jnp.int32(4)
  # Components 2 and 3 tiny in every layer: the tail beyond floor(0.5*4)=2.
  small = {name: {**layer,
                  "lora_a": layer["lora_a"].at[:, 2:].multiply(1e-3)
                  .at[:, 4:].set(0),
                  "lora_b": layer["lora_b"].at[4:].set(0)}
           for name, layer in params.items()}
  assert int(lora.self_pruned_rank(small, rank, 0.5, 0.1)) == 2
  # The same tail but large in one layer: kept.
  one_large = dict(small)
  one_large["head"] = {**small["head"],
                       "lora_a": params["head"]["lora_a"].at[:, 4:].set(0)}
  assert int(lora.self_pruned_rank(one_large, rank, 0.5, 0.1)) == 4
  # Rank 1 cannot fall further.
  assert int(lora.self_pruned_rank(small, jnp.int32(1), 0.5, 0.1)) == 1


def _simulation(**kwargs):
  return small_simulation(4, model_def=_adapted(), policy="hetlora", **kwargs)


@pytest.mark.parametrize("kwargs", [
    {}, dict(lora_aggregation="holders"),
    dict(lora_prune_ratio=0.5, lora_prune_threshold=0.9)])
def test_hetlora_round_equals_per_client_loop_and_freezes_backbone(kwargs):
  sim = _simulation(**kwargs)
  state = sim.init(sim.model.init_params)
  for _ in range(2):
    expected = reference_round(sim, state)
    state, stats = sim.round(state)
    for x, y in zip(jax.tree.leaves(state.params),
                    jax.tree.leaves(expected.params)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=2e-6)
    np.testing.assert_array_equal(state.width_cap, expected.width_cap)
  assert int(stats.participants) > 0
  for name, layer in state.params.items():
    np.testing.assert_array_equal(layer["kernel"],
                                  sim.model.init_params[name]["kernel"])
    np.testing.assert_array_equal(layer["bias"],
                                  sim.model.init_params[name]["bias"])
    assert np.abs(np.asarray(layer["lora_b"])).sum() > 0
  if kwargs.get("lora_prune_ratio"):
    # A lenient threshold prunes: some aggregated devices lowered their cap.
    assert np.asarray(state.width_cap).min() < 1.0
  else:
    np.testing.assert_array_equal(state.width_cap, 1.0)


def _hand_merged(sim, state, weighting):
  """One round's new global adapters by hand in numpy: each aggregated
  client's trained factors F_k (zero beyond its rank), merged as
  `sum_k w_k F_k / sum_k w_k` per layer with `w_k = ||A_k B_k||_F`
  ("norm", HetLoRA's rule) or `n_k ||A_k B_k||_F` ("norm_x_examples");
  also returns the cohort's example counts."""
  import functools
  from fedjax_tl.engine.clients import run_client
  plan = sim.cohort(sim.arrays, state.round, state.width_cap,
                    state.totals["sim_seconds"])
  one = jax.jit(functools.partial(run_client, sim))
  g = jax.tree.map(np.asarray, state.params)
  clients = []
  for i in np.flatnonzero(np.asarray(plan.weight) > 0):
    delta, _, _, _ = one(sim.arrays, state.params, state.round, plan.ids[i],
                         plan.fraction[i], plan.num_steps[i])
    rank = int(np.ceil(float(plan.fraction[i]) * R_MAX - 1e-4))
    local = {name: {k: g[name][k] + np.asarray(delta[name][k], np.float64)
                    for k in lora.LORA_KEYS} for name in g}
    for layer in local.values():  # truncated: nothing beyond its rank
      np.testing.assert_allclose(layer["lora_a"][:, rank:], 0, atol=1e-6)
      np.testing.assert_allclose(layer["lora_b"][rank:], 0, atol=1e-6)
    clients.append((local, int(sim.arrays.count[plan.ids[i]])))
  merged = {}
  for name in g:
    weights = np.array([
        np.linalg.norm(local[name]["lora_a"] @ local[name]["lora_b"]) *
        (n if weighting == "norm_x_examples" else 1.0)
        for local, n in clients])
    merged[name] = {k: sum(w * local[name][k] for w, (local, _) in
                           zip(weights, clients)) / weights.sum()
                    for k in lora.LORA_KEYS}
  return merged, [n for _, n in clients]


@pytest.mark.parametrize("weighting", ["norm", "norm_x_examples"])
def test_hetlora_merge_weights_by_norm_by_hand(weighting):
  """HetLoRA's rule (Cho et al.): client k weighs ||B_k A_k||_F over the
  cohort, not times its example count (the option norm_x_examples); the
  vectorized round and the per-client loop both give the hand merge."""
  sim = _simulation(lora_weighting=weighting)
  state = sim.init(sim.model.init_params)
  for _ in range(2):  # the second round starts from trained adapters
    by_rule = {w: _hand_merged(sim, state, w)
               for w in ("norm", "norm_x_examples")}
    expected, counts = by_rule[weighting]
    assert len(set(counts)) > 1  # unequal example counts
    # The two rules differ on this cohort.
    gap = max(np.abs(by_rule["norm"][0][name][k] -
                     by_rule["norm_x_examples"][0][name][k]).max()
              for name in expected for k in lora.LORA_KEYS)
    assert gap > 1e-3, gap
    reference = reference_round(sim, state)
    state, _ = sim.round(state)
    for got in (state.params, reference.params):
      for name, layer in expected.items():
        for k in lora.LORA_KEYS:
          np.testing.assert_allclose(got[name][k], layer[k], rtol=1e-4,
                                     atol=1e-5, err_msg=f"{name}/{k}")


def test_hetlora_traffic_is_adapters_at_the_clients_rank():
  sim = _simulation()
  params = sim.model.init_params
  widths = (1.0, 0.5, 0.25)
  _, down, up = sim.sub_model_costs(jnp.asarray(widths, jnp.float32))
  for width, d, u in zip(widths, np.asarray(down), np.asarray(up)):
    rank = int(np.ceil(width * R_MAX - 1e-4))
    expected = sum(4 * rank * (layer["lora_a"].shape[0] +
                               layer["lora_b"].shape[1])
                   for layer in params.values())
    assert d == u == expected


def test_deployed_masks_truncate_adapters_to_the_tier_rank():
  sim = _simulation()
  params = _random_adapters(sim.model.init_params, 5)
  masks = sim.deployed_masks(jnp.float32(0.5), params)
  sub = jax.tree.map(jnp.multiply, params, masks)
  for name, layer in params.items():
    kernel = np.asarray(lora.merged(sub)[name]["kernel"])
    by_hand = (np.asarray(layer["kernel"]) + np.asarray(layer["lora_a"])[:, :3]
               @ np.asarray(layer["lora_b"])[:3])
    np.testing.assert_allclose(kernel, by_hand, rtol=1e-5, atol=1e-5)
