"""FlexLoRA: the example-weighted mean of the clients' low-rank products,
handed back by a truncated SVD, against numpy written from the paper."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (assert_matches_reference, small_simulation,
                      tiny_config_dict)
from fedjax_tl import aggregators, policies
from fedjax_tl.engine.clients import local_update
from fedjax_tl.engine.state import UNITS_SALT
from fedjax_tl.models import build_model
from fedjax_tl.policies import lora
from fedjax_tl.policies.flexlora import product_terms, refactor, svd_factors
from fedjax_tl.simulation import reference_round

R_MAX = 6


def _adapted():
  model = build_model("mlp", (8, 8, 1), 10, seed=0, hidden=(16, 8))
  return lora.adapter_model(model, R_MAX, 0)


def _simulation(**kwargs):
  return small_simulation(4, model_def=_adapted(), policy="flexlora",
                          **kwargs)


def _svd(w):
  """numpy's SVD of `w` (float64): `(U, S, Vt)`."""
  return np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)


def _truncated(w, rank):
  """The rank-`rank` truncated SVD of `w`, as a matrix."""
  u, s, vt = _svd(w)
  return u[:, :rank] * s[:rank] @ vt[:rank]


def _assert_flexlora_factors(a, b, w, atol):
  """`(a, b)` are the paper's split of `w`'s truncated SVD: component i is
  `u_i s_i v_i^T` with `a_i = u_i` (unit, the input side) and
  `b_i = s_i v_i^T` (the singular value on the output side), in order."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  u, s, vt = _svd(w)
  for i in range(a.shape[1]):
    np.testing.assert_allclose(np.outer(a[:, i], b[i]),
                               s[i] * np.outer(u[:, i], vt[i]), atol=atol,
                               err_msg=f"component {i}")
    np.testing.assert_allclose(np.linalg.norm(a[:, i]), 1.0, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(b[i]), s[i], rtol=1e-3,
                               atol=atol)


def _hetlora_product(factors, n=None):
  """HetLoRA's merge of the same factors by hand (zero-padded factors
  weighted by ||a_k b_k||_F), as the product it deploys: not FlexLoRA's."""
  w = np.array([np.linalg.norm(a @ b) for a, b in factors])
  a = sum(wk * a for wk, (a, _) in zip(w, factors)) / w.sum()
  b = sum(wk * b for wk, (_, b) in zip(w, factors)) / w.sum()
  return a @ b


# -- the merge, synthetic clients ---------------------------------------------

def _random_round(seed=0, ranks=(6, 3, 1), counts=(5, 12, 2)):
  """Global adapters and clients' trained factors (zero beyond each rank)
  drawn at random, with the example counts."""
  rng = np.random.default_rng(seed)
  draw = lambda shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  params = _adapted().init_params
  global_params = {name: {**layer, "lora_a": draw(layer["lora_a"].shape),
                          "lora_b": draw(layer["lora_b"].shape)}
                   for name, layer in params.items()}
  clients = []
  for rank in ranks:
    keep = (np.arange(R_MAX) < rank).astype(np.float32)
    clients.append({name: {**layer,
                           "lora_a": draw(layer["lora_a"].shape) * keep,
                           "lora_b": draw(layer["lora_b"].shape) *
                           keep[:, None]}
                    for name, layer in global_params.items()})
  return global_params, clients, counts


def _engine_merge(global_params, clients, counts):
  """The terms each client uploads, summed with weight n_k, and FedAvg's
  server step (the mean delta) through the policy's refactor."""
  num, den = aggregators.zeros_like_sums(global_params)
  stack = lambda t: jax.tree.map(lambda a: a[None], t)
  for local, n in zip(clients, counts):
    delta, weight = product_terms(global_params, local)
    num, den = aggregators.add_weighted(num, den, stack(delta), stack(weight),
                                        jnp.full(1, float(n)))
  mean, _ = aggregators.masked_mean(num, den)
  return refactor(global_params, mean)


def _numpy_mean_product(clients, counts, name):
  """The paper's W = sum_k n_k a_k b_k / sum_k n_k (our layout), float64."""
  products = [np.asarray(c[name]["lora_a"], np.float64) @
              np.asarray(c[name]["lora_b"], np.float64) for c in clients]
  return sum(n * p for n, p in zip(counts, products)) / sum(counts)


def test_merge_is_the_split_svd_of_the_example_weighted_mean_of_products():
  global_params, clients, counts = _random_round()
  new = _engine_merge(global_params, clients, counts)
  for name, layer in new.items():
    w = _numpy_mean_product(clients, counts, name)
    _assert_flexlora_factors(layer["lora_a"], layer["lora_b"], w, atol=2e-4)
    # The global model is the rank-r_max truncation of W (W has rank 10).
    np.testing.assert_allclose(layer["lora_a"] @ layer["lora_b"],
                               _truncated(w, R_MAX), atol=2e-4)
    # HetLoRA's merge of the same factors is another model.
    factors = [(np.asarray(c[name]["lora_a"], np.float64),
                np.asarray(c[name]["lora_b"], np.float64)) for c in clients]
    gap = np.linalg.norm(_hetlora_product(factors) - w) / np.linalg.norm(w)
    assert gap > 0.3, (name, gap)
    # The backbone is carried over bit for bit.
    for key in ("kernel", "bias"):
      np.testing.assert_array_equal(layer[key], global_params[name][key])


@pytest.mark.parametrize("rank", [1, 2, 3, 6])
def test_a_client_of_rank_r_receives_the_rank_r_truncated_svd(rank):
  """The first r global components are the rank-r truncated SVD of W, as
  the authors' server sends a rank-r client (distribute_weight_fast)."""
  global_params, clients, counts = _random_round(seed=1)
  new = _engine_merge(global_params, clients, counts)
  policy = policies.get("flexlora", lora_rank=R_MAX)
  width = jnp.float32(rank / R_MAX)
  for masks in (policy.masks(None, width, new, jnp.int32(1),
                             jax.random.key(0))[0],
                policy.deployed(None, width, new)):
    held = jax.tree.map(jnp.multiply, new, masks)
    for name, layer in held.items():
      w = _numpy_mean_product(clients, counts, name)
      np.testing.assert_allclose(layer["lora_a"] @ layer["lora_b"],
                                 _truncated(w, rank), atol=2e-4,
                                 err_msg=name)
      # What it holds is the paper's split of the rank-r truncation.
      _assert_flexlora_factors(layer["lora_a"][:, :rank],
                               layer["lora_b"][:rank], w, atol=2e-4)


def test_a_component_of_zero_singular_value_keeps_its_direction():
  """A rank-2 update at r_max 4: components 3 and 4 carry nothing (b = 0)
  and their a columns are the previous ones off the update's columns,
  normalised: definite, so two round paths agree (an SVD alone picks any
  basis of that space)."""
  rng = np.random.default_rng(5)
  u = rng.normal(size=(6, 2)) @ rng.normal(size=(2, 5))
  previous = rng.normal(size=(6, 4))
  a, b = svd_factors(jnp.asarray(u, jnp.float32), 4,
                     jnp.asarray(previous, jnp.float32))
  np.testing.assert_allclose(np.asarray(a @ b), u, atol=1e-5)
  np.testing.assert_allclose(np.asarray(b[2:]), 0, atol=1e-5)
  p, _, _ = np.linalg.svd(u, full_matrices=False)
  p = p[:, :2]
  for i in (2, 3):
    own = previous[:, i] - p @ (p.T @ previous[:, i])
    np.testing.assert_allclose(np.asarray(a[:, i]),
                               own / np.linalg.norm(own), atol=1e-4)
  # The same update up to float noise: the same factors.
  noisy = u + 1e-7 * rng.normal(size=u.shape)
  a2, _ = svd_factors(jnp.asarray(noisy, jnp.float32), 4,
                      jnp.asarray(previous, jnp.float32))
  np.testing.assert_allclose(np.abs(np.asarray(a2)), np.abs(np.asarray(a)),
                             atol=1e-3)


def test_a_layer_narrower_than_r_max_gets_zero_factors_beyond_its_rank():
  w = np.random.default_rng(3).normal(size=(5, 3)).astype(np.float32)
  a, b = svd_factors(jnp.asarray(w), 6)
  assert a.shape == (5, 6) and b.shape == (6, 3)
  np.testing.assert_array_equal(a[:, 3:], 0)
  np.testing.assert_array_equal(b[3:], 0)
  np.testing.assert_allclose(a @ b, w, atol=1e-5)


# -- the round ----------------------------------------------------------------

def _trained_factors(sim, update, state, slot, plan):
  """One aggregated client's factors after local training, by the engine's
  local update (`update`, not its upload): float64, zero beyond its rank."""
  r, device = state.round, plan.ids[slot]
  key = sim.client_key(r, device)
  present, train = sim.masks(plan.fraction[slot], state.params, r,
                             jax.random.fold_in(key, UNITS_SALT))
  delta = update(sim.arrays, state.params, present, train, key, device,
                 plan.num_steps[slot])[0]
  rank = int(np.ceil(float(plan.fraction[slot]) * R_MAX - 1e-4))
  factors = {}
  for name, layer in state.params.items():
    a, b = (np.asarray(layer[k], np.float64) +
            np.asarray(delta[name][k], np.float64) for k in lora.LORA_KEYS)
    np.testing.assert_allclose(a[:, rank:], layer["lora_a"][:, rank:])
    a[:, rank:], b[rank:] = 0, 0  # beyond its rank: not its model
    factors[name] = (a, b)
  return factors, rank


def test_round_merges_as_the_paper_with_unequal_ranks_and_examples():
  """Both round paths give the split SVD of `sum n_k a_k b_k / sum n_k`
  over the cohort's trained factors, computed here in numpy."""
  sim = _simulation()
  update = jax.jit(functools.partial(local_update, sim))
  state = sim.init(sim.model.init_params)
  for _ in range(2):  # the second round starts from SVD factors
    plan = sim.cohort(sim.arrays, state.round, state.width_cap,
                      state.totals["sim_seconds"])
    slots = np.flatnonzero(np.asarray(plan.weight) > 0)
    clients = [_trained_factors(sim, update, state, i, plan) for i in slots]
    counts = [int(sim.arrays.count[plan.ids[i]]) for i in slots]
    assert len({rank for _, rank in clients}) > 1
    assert len(set(counts)) > 1
    reference = reference_round(sim, state)
    state, _ = sim.round(state)
    for name in state.params:
      w = sum(n * a @ b for n, (f, _) in zip(counts, clients)
              for a, b in [f[name]]) / sum(counts)
      hetlora = _hetlora_product([f[name] for f, _ in clients])
      assert np.linalg.norm(hetlora - w) > 0.1 * np.linalg.norm(w)
      for got in (state.params, reference.params):
        _assert_flexlora_factors(got[name]["lora_a"], got[name]["lora_b"],
                                 w, atol=2e-5)


@pytest.mark.parametrize("kwargs", [
    {}, dict(algorithm="fedadam", aggregator=aggregators.get("median"))])
def test_round_equals_per_client_loop_and_freezes_backbone(kwargs):
  """FedAvg, and FedAdam over a coordinate-wise median of the products."""
  sim = _simulation(**kwargs)
  init = sim.model.init_params
  state = assert_matches_reference(sim, init)
  for name, layer in state.params.items():
    for key in ("kernel", "bias"):
      np.testing.assert_array_equal(layer[key], init[name][key])
    assert np.abs(np.asarray(layer["lora_b"])).sum() > 0


def test_traffic_is_the_factors_at_the_clients_rank():
  """Down: the rank-r_k truncation; up: the client's rank-r_k factors (the
  server forms the product): 4 bytes x r_k x (fan_in + out) per layer."""
  sim = _simulation()
  params = sim.model.init_params
  by_hand = lambda rank: sum(4 * rank * (layer["lora_a"].shape[0] +
                                         layer["lora_b"].shape[1])
                             for layer in params.values())
  widths = (1.0, 0.5, 0.25)
  _, down, up = sim.sub_model_costs(jnp.asarray(widths, jnp.float32))
  for width, d, u in zip(widths, np.asarray(down), np.asarray(up)):
    rank = int(np.ceil(width * R_MAX - 1e-4))
    assert d == u == by_hand(rank)
  # A client's own upload term counts its factors, not the kernel's slot.
  present, _ = sim.masks(jnp.float32(0.5), params, jnp.int32(0),
                         jax.random.key(0))
  zero = jax.tree.map(jnp.zeros_like, params)
  *_, bytes_up = sim.policy.upload.terms(params, zero, present,
                                         jnp.float32(0.5))
  assert bytes_up == by_hand(3) == 4 * 3 * (64 + 16 + 16 + 8 + 8 + 10)


def test_dp_is_refused_in_one_line():
  import ml_collections
  from fedjax_tl import config as config_lib
  from fedjax_tl.errors import ConfigError
  raw = tiny_config_dict().to_dict()
  raw.update(dp=True, policy="flexlora")
  with pytest.raises(ConfigError) as e:
    config_lib.validate(ml_collections.ConfigDict(raw))
  message = str(e.value)
  assert message.startswith("config.policy='flexlora': cannot run with "
                            "dp=True") and "\n" not in message
