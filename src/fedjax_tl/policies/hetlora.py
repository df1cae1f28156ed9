"""HetLoRA (Cho et al., EMNLP 2024): heterogeneous LoRA ranks.

Every device holds the frozen pretrained backbone plus LoRA factors of rank
ceil(p*r_max) (the global factors truncated), trains the factors only, and
may self-prune its rank (option `lora_prune_ratio`); the server merges the
zero-padded factors weighted by `||B_k A_k||_F` ("padded"), or averages each
component over the clients holding it ("holders"). See lora.py.

Client k's weight is its norm `||B_k A_k||_F` (per layer), normalised over
the cohort and not multiplied by its example count: the paper's
sparsity-weighted aggregation (Cho et al., "Heterogeneous LoRA for Federated
Fine-tuning of On-Device Foundation Models", EMNLP 2024; the authors
published no code, so the paper is the source). `lora_weighting="norm"` is
that rule (the default); "norm_x_examples" multiplies the norm by the
client's example count as FedAvg weighs clients (this simulator's rule before
issue 18).
"""

import functools


from fedjax_tl import cost
from fedjax_tl.policies import base, lora

AGGREGATIONS = ("padded", "holders")
# A client's merge weight: its norm alone (the paper's), or norm x examples.
WEIGHTINGS = ("norm", "norm_x_examples")
# The config keys HetLoRA reads (Policy.keys).
KEYS = ("lora_rank", "lora_prune_ratio", "lora_prune_threshold",
        "lora_aggregation", "lora_weighting")


def rank_masks(model, width, params, round_index, key):
  """A client of width p holds and trains the first ceil(p r_max) adapter
  components (lora.rank_masks): the global factors truncated."""
  del model, round_index, key
  return lora.rank_masks(lora.client_rank(width, lora.max_rank(params)),
                         params)


def _upload(params, delta, present, width, *, options: base.Options):
  """The client's factors as HetLoRA's `(delta, weights)` terms, after
  self-pruning; it uploads its kept components only."""
  r_max = lora.max_rank(params)
  rank = lora.client_rank(width, r_max)
  local = lora.held_after_training(params, delta, present)
  if options.lora_prune_ratio:
    rank = lora.self_pruned_rank(local, rank, options.lora_prune_ratio,
                                 options.lora_prune_threshold)
  delta, weights = lora.aggregation_terms(
      params, local, rank, padded=options.lora_aggregation == "padded")
  bytes_up = cost.mask_bytes(lora.rank_masks(rank, params)[1])
  return delta, weights, rank / r_max, bytes_up


def adapted(model, seed, *, rank: int):
  """`model` with rank-`rank` adapters (lora.adapter_model)."""
  return lora.adapter_model(model, rank, seed)


def fresh_adapters(params, model):
  """The pretrained backbone under the adapted model's fresh adapters."""
  return lora.with_backbone(model.init_params, params)


def hetlora(options: base.Options) -> base.Policy:
  return base.adapter_policy(
      "hetlora", rank_masks,
      base.Upload(functools.partial(_upload, options=options),
                  prunes=options.lora_prune_ratio > 0,
                  by_examples=options.lora_weighting == "norm_x_examples"),
      adapt_model=functools.partial(adapted, rank=options.lora_rank),
      start=fresh_adapters, keys=KEYS)
