"""Migration policies: which part of the model each client holds and trains.

A width policy maps a client's capacity fraction p (and the round, and its
key) to one `[units]` 0/1 vector per hidden group; `capacity.masks_from_units`
turns those into parameter masks. A depth policy keeps every unit and masks
whole layers out of training. All are masks, so one vmapped round serves all.

- `heterofl` (Diao et al., ICLR 2021): the first ceil(p*C) units ("fix":
  a device keeps its tier; "dynamic": its level is redrawn every round from
  the tier mix).
- `fedrolex` (Alam et al., NeurIPS 2022): a rolling window, units
  (r + i) mod C for i < ceil(p*C), advancing one unit per round.
- `fed_dropout` (Caldas et al., 2018): a random subset of ceil(p*C) units per
  hidden layer, drawn for each client each round.
- `importance`: HeteroFL's first-k slicing of a pretrained model whose hidden
  units were first reordered by importance (see transfer.py), so each
  sub-model keeps the pretrained units that matter most.
- `distill`: HeteroFL's first-k slicing of a pretrained model that the
  server first distilled into its own nested sub-models: every tier's width
  trained jointly on the pretrained model's soft labels, as slimmable
  networks do (Yu et al., ICLR 2019; in-place distillation from "Universally
  slimmable networks", Yu & Huang, ICCV 2019), so each tier starts from a
  sub-model that already works (see transfer.py).
- `fjord` (Horvath et al., NeurIPS 2021): ordered dropout. A client of
  capacity p_max holds the first-k sub-model of width p_max and, for each
  local step (batch), trains the first-k sub-model of a width drawn uniformly
  from the tier widths p <= p_max (without self-distillation).
- `partial_finetune`: depth instead of width: every device holds the whole
  model, and a device of capacity p trains only its top ceil(p*L) of L
  layers, the rest frozen (present in the forward pass, not updated).
- `hetlora` (Cho et al., EMNLP 2024): adapters instead of widths: every
  device holds the frozen pretrained backbone plus LoRA factors of rank
  ceil(p*r_max) (the global factors truncated), trains the factors only, and
  may self-prune its rank; the server merges the zero-padded factors
  weighted by `||B_k A_k||_F` (see lora.py).
- `uniform_smallest`: everyone trains the smallest tier's first-k sub-model.
- `uniform_full_only`: only devices able to hold the full model take part.
- `full`: every device trains the full model (capacity ignored; an upper
  bound, not a deployable strategy).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from fedjax_tl.capacity import first_k_units, kept_units

WIDTH_POLICIES = ("heterofl", "fedrolex", "fed_dropout", "fjord", "importance",
                  "distill", "uniform_smallest", "uniform_full_only", "full")
DEPTH_POLICIES = ("partial_finetune",)
ADAPTER_POLICIES = ("hetlora",)
POLICIES = WIDTH_POLICIES + DEPTH_POLICIES + ADAPTER_POLICIES
# Width policies whose width-p sub-model is the first-k slice at one of a few
# fixed widths, so the tier fast path (tiered.py) can run it at its real shape.
FIRST_K_POLICIES = ("heterofl", "importance", "distill", "uniform_smallest",
                    "uniform_full_only", "full")
# Policies that are HeteroFL's recipe (scaler and masked cross-entropy on).
HETEROFL_FAMILY = ("heterofl", "importance", "distill")
HETEROFL_MODES = ("fix", "dynamic")


def rolling_units(fraction: jax.Array, round_index: jax.Array,
                  group_sizes: Sequence[int]) -> tuple[jax.Array, ...]:
  """FedRolex: unit j is held iff (j - r) mod C < ceil(p*C)."""
  return tuple(
      (jnp.mod(jnp.arange(size) - round_index, size) < kept_units(
          fraction, size)).astype(jnp.float32) for size in group_sizes)


def random_units(fraction: jax.Array, key: jax.Array,
                 group_sizes: Sequence[int]) -> tuple[jax.Array, ...]:
  """Federated Dropout: a uniformly random ceil(p*C) units of each group."""
  units = []
  for key_g, size in zip(jax.random.split(key, len(group_sizes)),
                         group_sizes):
    # The units whose random scores rank lowest are kept: a uniform subset.
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(key_g, (size,))))
    units.append((ranks < kept_units(fraction, size)).astype(jnp.float32))
  return tuple(units)


def unit_masks(policy: str, fraction: jax.Array, round_index: jax.Array,
               key: jax.Array, group_sizes: Sequence[int]
               ) -> tuple[jax.Array, ...]:
  """The `[units]` masks of one client under a width policy."""
  if policy == "fedrolex":
    return rolling_units(fraction, round_index, group_sizes)
  if policy == "fed_dropout":
    return random_units(fraction, key, group_sizes)
  return first_k_units(fraction, group_sizes)


def client_fractions(policy: str, tier_fractions: jax.Array,
                     tier_proportions: jax.Array, tiers: jax.Array,
                     keys: jax.Array, heterofl_mode: str = "fix"
                     ) -> jax.Array:
  """The width each cohort slot trains this round, `[slots]`.

  Args:
    policy: a width policy name.
    tier_fractions: `[tiers]` width of each tier.
    tier_proportions: `[tiers]` share of devices in each tier (the mix that
      HeteroFL's dynamic mode redraws levels from).
    tiers: `[slots]` tier of each slot's device.
    keys: `[slots]` per-client keys of this round.
    heterofl_mode: "fix" or "dynamic".
  """
  if policy == "full":
    return jnp.ones(tiers.shape, jnp.float32)
  if policy == "uniform_smallest":
    return jnp.full(tiers.shape, jnp.min(tier_fractions), jnp.float32)
  if policy == "heterofl" and heterofl_mode == "dynamic":
    levels = jax.vmap(lambda k: jax.random.choice(
        k, tier_fractions.shape[0], p=tier_proportions))(keys)
    return tier_fractions[levels]
  return tier_fractions[tiers]


def fjord_width(key: jax.Array, tier_fractions: jax.Array,
                max_fraction: jax.Array) -> jax.Array:
  """A width drawn uniformly from the tier widths <= `max_fraction`."""
  allowed = tier_fractions <= max_fraction + 1e-6
  return jax.random.choice(key, tier_fractions, p=allowed / allowed.sum())


def trained_layers(fraction: jax.Array, num_layers: int) -> jax.Array:
  """`[layers]` 0/1, bottom-up: the top ceil(p*L) layers train (at least 1)."""
  k = kept_units(fraction, num_layers)
  return (jnp.arange(num_layers) >= num_layers - k).astype(jnp.float32)


def eligible_devices(policy: str, tier_fractions: jax.Array,
                     device_tiers: jax.Array) -> jax.Array:
  """`[devices]` bool: who may be sampled (all, but for uniform_full_only)."""
  if policy == "uniform_full_only":
    return tier_fractions[device_tiers] >= 1.0
  return jnp.ones(device_tiers.shape, bool)
