"""FlexLoRA (Bai et al., NeurIPS 2024): LoRA ranks merged as full-size
updates and handed back by a truncated SVD.

The rule. Client k holds LoRA factors of rank r_k = ceil(p_k r_max) on the
frozen backbone and trains them; the server forms each client's full-size
update `B_k A_k`, averages them weighted by data size,
`W = sum_k n_k B_k A_k / sum_k n_k`, and gives client k the rank-r_k
truncated SVD of W, `B = U_r S_r`, `A = V_r^T` (the singular values on the
output side, A orthonormal). HetLoRA (hetlora.py) averages the zero-padded
factors instead, which is not the average of their products.

Source: J. Bai, D. Chen, B. Qian, L. Yao, Y. Li, "Federated Fine-tuning of
Large Language Models under Heterogeneous Tasks and Client Resources",
NeurIPS 2024 (arXiv 2402.11505). The authors' code: github.com/alibaba/
FederatedScope, branch FlexLoRA, commit
1cb1ab76bf4c9394d617c4c5a800cb0df145796d:

- fed_utils/model_aggregation.py, `FlexLoRA` (lines 72-98): the weights are
  the clients' example counts normalised to sum 1 (line 76); each client
  adds `(lora_B @ lora_A) * merge_rate * weight` (line 91), merge_rate =
  16 / r_k (LoRA's alpha / r). The products are of the clients' trained
  factors as they stand (each client's whole LoRA update, W0 apart), not
  deltas, and W0 is never part of the average.
- fed_utils/adaptive_peft.py, `distribute_weight_fast` (lines 96-125):
  `u, s, v = torch.svd(W)` (line 110) and, for each rank r in use,
  `lora_B = u[:, :r] diag(s[:r]) / (alpha / r)`, `lora_A = v[:, :r]^T`
  (lines 116-124); main.py line 319 loads a client's rank's pair
  (`load_weight_local`) before it trains, and the client uploads its LoRA
  factors (fed_utils/client.py, `terminate_local_training`).
- Their settings (main.py): Natural Instructions, 1,613 clients, 5% a
  round, 50 rounds, 1 local epoch, batch 4, SGD at 1e-6 for FedAvg, LoRA
  alpha 16 and dropout 0.05 on all attention and MLP projections, ranks 8,
  30 and 200 per module type drawn per client (`config_types`, line 422;
  the released training loop never calls `local_client_modify_layer`, line
  194, which gives a client its rank, so the paper is the source for that).

In this engine. The global state is the rank-r_max truncated SVD of W as
factors ordered by singular value: `lora_a = V_r` (fan_in x r, orthonormal:
the authors' A^T) and `lora_b = S_r U_r^T` (their B^T), this simulator's
layer running `kernel + a @ b = (B A)^T`. The rank-r truncated SVD of W is
the first r components of its rank-r_max one, so a client of rank r_k
holding the first r_k global components (lora.rank_masks, as in HetLoRA)
receives exactly FlexLoRA's download; the authors' server keeps W whole but
uses it only through these truncations, so nothing a client sees differs.
The sum of products is not a function of the sums of factors, so a client's
upload term carries its product delta `B_k A_k - B_g A_g` in the frozen
kernel's slot (weight 1 there, times its example count; 0 on the factors).
The server's mean there is `W - B_g A_g`; `refactor` (the `Policy` hook,
applied by every round path) adds `B_g A_g` back to the optimiser's step,
restores the kernel bit for bit and re-factors by `jnp.linalg.svd`. Traffic
is what a FlexLoRA client moves: its rank-r_k factors down and up (the
server forms the product itself; the kernel-slot term is how the simulator
sums, not what travels).

Departures and extensions: the simulator's adapters have no alpha / r
scale, so `B` carries `S_r` unscaled (the authors' merge_rate cancels out
of W; only the split's scale, hence the local optimiser's steps, differs);
every client of round 0 starts from the same fresh global adapters (A
Gaussian, B zero); a layer with `min(fan_in, out) < r_max` keeps zero
factors beyond its rank. With a server learning rate other than 1, FedAdam
or FedYogi the optimiser steps on the full-size update before the SVD, and
a robust aggregator (median, trimmed mean, Krum) takes its statistic over
the clients' products: both well defined, neither the authors'. DP is
refused (config): its expected denominator counts holders of the train
mask, and no client's mask holds the kernel slot the products are summed in.
"""

import functools

import jax
import jax.numpy as jnp

from fedjax_tl import cost
from fedjax_tl.models.base import Params
from fedjax_tl.policies import base, hetlora, lora


def product_terms(global_params: Params, local: Params
                  ) -> tuple[Params, Params]:
  """One client's FlexLoRA contribution as `(delta, weight)` trees.

  In each adapted layer the kernel's slot carries `a_k @ b_k - a_g @ b_g`
  (the client's trained factors `local`, zero beyond its rank, against the
  global ones) with weight 1; every other entry has delta and weight 0. A
  weighted mean of the deltas plus `a_g @ b_g` is the mean of the products.
  """
  delta, weight = {}, {}
  for name, layer in local.items():
    zeros = jax.tree.map(jnp.zeros_like, layer)
    delta[name], weight[name] = zeros, zeros
    if "lora_a" in layer:
      delta[name] = {**zeros, "kernel": lora.low_rank_update(layer) -
                     lora.low_rank_update(global_params[name])}
      weight[name] = {**zeros, "kernel": jnp.ones_like(layer["kernel"])}
  return delta, weight


# A singular value below this share of the largest is zero: its component
# carries nothing of the update.
NULL_SHARE = 1e-6


def svd_factors(update: jax.Array, rank: int,
                previous: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array]:
  """`(a[fan_in, rank], b[rank, out])`: the rank-`rank` truncated SVD of
  `update = P S Q^T` split as `a = P_r`, `b = S_r Q_r^T` (the authors'
  `lora_A = V^T`, `lora_B = U S`, transposed); components beyond
  `min(update.shape)` are zero.

  A component of zero singular value (the cohort's update has lower rank)
  has `b = 0` and an `a` column the SVD leaves arbitrary, which the next
  round's training would start from (two round paths' SVDs of equal
  updates pick different ones). It is made definite: the column of
  `previous` (the global `a` before the round) in that place, projected off
  the update's own columns and normalised, so such a component stays a
  fresh adapter with the direction it had.
  """
  p, s, qt = jnp.linalg.svd(update, full_matrices=False)
  k = min(rank, s.shape[0])
  p = p[:, :k]
  if previous is not None:
    null = s[:k] <= NULL_SHARE * s[0]
    kept = p * ~null
    own = previous[:, :k] - kept @ (kept.T @ previous[:, :k])
    own = own / jnp.maximum(jnp.linalg.norm(own, axis=0), 1e-12)
    p = jnp.where(null, own, p)
  a = jnp.zeros((update.shape[0], rank), update.dtype).at[:, :k].set(p)
  b = jnp.zeros((rank, update.shape[1]), update.dtype).at[:k].set(
      s[:k, None] * qt[:k])
  return a, b


def refactor(params: Params, updates: Params) -> Params:
  """The server's step on the full-size updates, back as adapters.

  `updates` holds, in each adapted kernel's slot, the step on `B_g A_g`
  (with FedAvg the cohort's `W - B_g A_g`); the new factors are the
  rank-r_max truncated SVD of `a @ b + step`. Everything else (the
  backbone) keeps its value exactly.
  """
  out = {}
  for name, layer in params.items():
    out[name] = layer
    if "lora_a" in layer:
      step = updates[name]["kernel"].reshape(-1, layer["lora_b"].shape[-1])
      a, b = svd_factors(layer["lora_a"] @ layer["lora_b"] + step,
                         layer["lora_a"].shape[-1], layer["lora_a"])
      out[name] = {**layer, "lora_a": a, "lora_b": b}
  return out


def _upload(params, delta, present, width):
  """The client's product delta in the kernel's slot; it uploads its
  rank-r_k factors."""
  rank = lora.client_rank(width, lora.max_rank(params))
  delta, weights = product_terms(
      params, lora.held_after_training(params, delta, present))
  bytes_up = cost.mask_bytes(lora.rank_masks(rank, params)[1])
  return delta, weights, rank / lora.max_rank(params), bytes_up


def flexlora(options: base.Options) -> base.Policy:
  return base.adapter_policy(
      "flexlora", hetlora.rank_masks, base.Upload(_upload),
      refactor=refactor,
      adapt_model=functools.partial(hetlora.adapted, rank=options.lora_rank),
      start=hetlora.fresh_adapters, keys=("lora_rank",))
