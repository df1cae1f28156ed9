"""The `Policy` value: everything the round asks of a migration policy.

A policy is a frozen record of pure functions, in the shape of optax's
`GradientTransformation`: the engine calls its fields and never its name. The
builders here (`width_policy`, `depth_policy`, `adapter_policy`) assemble a
policy from the shared primitives (capacity.py, lora.py); each named method is
a short recipe over them in a file of its own, and the registry
(`fedjax_tl.policies`) maps names to recipes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from fedjax_tl import cost
from fedjax_tl.models.base import ModelDef, Params
from fedjax_tl.policies import capacity

# A width rule: `(width, round_index, key, groups)` -> `{group: [units]}` 0/1
# vectors, one per named width group (`groups` maps names to sizes). A
# cohort rule (`Policy.slotted`) also takes the client's `slot` (a `Slot`, or
# None for a client outside a round's cohort) as a fifth argument.
UnitRule = Callable[..., dict[str, jax.Array]]


class Slot(NamedTuple):
  """A client's place in its round's cohort, for cohort rules.

  `key` is the round's shared units key (the same for every slot of the
  round: `Simulation.slot_key`), `index` the client's cohort slot (the
  order the cohort was drawn in) and `widths` `[slots]` the width of every
  slot of the round, 0 for a slot that draws no units (no online device).
  """
  key: jax.Array
  index: jax.Array
  widths: jax.Array


class Options(NamedTuple):
  """The config values a recipe may read (the `policy` section's keys)."""
  scaler: bool = False
  heterofl_mode: str = "fix"
  lora_rank: int = 16
  lora_prune_ratio: float = 0.0
  lora_prune_threshold: float = 0.1
  lora_aggregation: str = "padded"
  lora_weighting: str = "norm"
  distill_steps: int = 300
  distill_temperature: float = 4.0
  distill_lr: float = 0.05
  distill_batch_size: int = 64
  distill_labels: bool = True
  exit_kd_weight: float = 1.0
  exit_kd_rampup: int = 300
  fiarse_scope: str = "global"
  gsd_gamma: float = 0.9
  gsd_every: int = 10
  gsd_until: int = 200
  scalefl_widths: tuple[float, ...] = (0.7, 0.7, 0.75, 1.0)
  scalefl_kd_gamma: float = 0.05
  scalefl_kd_temperature: float = 3.0
  # The first distilling round: the authors' rule at 50 rounds here; a
  # config derives it from its num_rounds (None under other policies).
  scalefl_kd_start: int | None = 13


class ServerPrep(NamedTuple):
  """What a policy's server preparation before round 0 may read."""
  model: ModelDef          # the model being migrated
  params: Params           # its pretrained params
  source: Any              # the source task's training data (data.Dataset)
  tier_widths: tuple[float, ...]
  seed: int


class Upload(NamedTuple):
  """How an adapter client's trained params become its upload.

  `terms(params, delta, present, width)` returns `(delta, weights,
  kept_width, bytes_up)`: the delta and real-valued weight trees the round
  sums as `sum w * delta` and `sum w`, the width the client keeps (after
  rank self-pruning) and the bytes it uploads. `prunes`: the kept width can
  fall below the given one, and the server then lowers that device's cap.
  `by_examples`: the round multiplies the weights by the client's example
  count (FedAvg's n_k); False: the weights alone decide (HetLoRA's rule).
  """
  terms: Callable[..., tuple[Params, Params, jax.Array, jax.Array]]
  prunes: bool = False
  by_examples: bool = True


def everyone(tier_widths, device_tiers):
  """Every device may be sampled."""
  del tier_widths
  return jnp.ones(device_tiers.shape, bool)


def sub_model_traffic(present: Params, train: Params):
  """A client is sent what it holds and returns what it trained."""
  return cost.mask_bytes(present), cost.mask_bytes(train)


def _same_model(model: ModelDef, seed: int) -> ModelDef:
  del seed
  return model


def _same_params(params: Params, model: ModelDef) -> Params:
  del model
  return params


@dataclasses.dataclass(frozen=True)
class Policy:
  """A migration policy as a value.

  Attributes:
    name: the registry name (for outputs only: no code tests it).
    widths: `(tier_widths[T], tier_shares[T], tiers[S], keys[S]) -> [S]`,
      the width each cohort slot trains this round.
    masks: `(model, width, params, round_index, key) -> (present, train)`,
      one client's capacity masks (see `Simulation.masks`).
    deployed: `(model, width, params) -> mask`, the model a tier of this
      width runs after training.
    units: `(model, width, round_index, key) -> [units] multipliers` per
      hidden group (activation masks, HeteroFL's scaler included); None: the
      policy has no width units (depth and adapter policies).
    step_masks: FjORD's per-step widths: `(model, tier_widths, width,
      params, activation) -> (step_key -> (held, train))`; None: one
      sub-model for every local step.
    eligible: `(tier_widths[T], device_tiers[D]) -> [D] bool`, who may be
      sampled.
    smallest_width: `(width levels) -> float`, the least width the policy
      gives a device: one whose memory fits less is never sampled.
    fixed_widths: `(tier_widths, memory_levels | None) -> widths`, the few
      static widths whose first-k slices every client trains, so the tier
      fast path can run them at their real shapes; None: not first-k.
    traffic: `(present, train) -> (bytes_down, bytes_up)` of one client.
    upload: an adapter policy's upload rule (`Upload`); None: the delta is
      zero off the 0/1 `train` mask, which is the aggregation weight.
    refactor: `(params, updates) -> params`, how the server optimiser's
      step becomes the new params, for a policy whose round sums live in
      another space than its params: FlexLoRA sums the clients' low-rank
      products in the frozen kernel's slot and refactors the stepped
      product into adapters by a truncated SVD (flexlora.py). Every round
      path applies it (engine.round.server_step); None: `params + updates`.
    adapt_model: `(model, seed) -> model`, the model the devices train
      (adapters added for adapter policies).
    start: `(params, model) -> params`, the pretrained params as the
      federation starts from them (reordered, or under fresh adapters).
    prepare: `ServerPrep -> (params, cost)`, the server's own training
      before round 0 (distillation; `cost` has `flops`, `seconds`, `loss`);
      None: none.
    defaults: `(config key, value)` pairs: the policy's defaults for keys
      left unset (HeteroFL's masked cross-entropy). A value may be a
      function of the config's values (`Mapping[str, Any] -> value`): a
      default derived from other keys (ScaleFL's distillation start, from
      `num_rounds`), which config.validate resolves, so the run's config
      and identity hold the value and not the rule.
    family: the recipe family the policy belongs to ("heterofl" for
      HeteroFL's first-k slicing with its scaler, masked loss and fix or
      dynamic levels, `heterofl_mode`).
    exit_terms: `(model, train, round_index) -> client.ExitTerms`, how a
      client trains the early exits of the model `adapt_model` gave
      (models.exits: DepthFL, ScaleFL); None: the model has one output.
    slotted: the width rule is a cohort rule: `masks` and `units` take the
      client's `Slot` as a last argument `slot` (FedEcover's units, drawn
      without replacement across the round's clients). Every round path
      passes the same slots (engine.clients.run_client: the masked round
      and the per-client reference); a mask made outside a cohort (DP's
      expected holders, the time model's shapes) gets none, and the rule
      then treats the client as a cohort of one keyed by its own key.
    server_scale: `round_index -> factor` multiplying the server
      optimiser's update in that round (FedEcover's global step-size
      decay); None: 1.
    reparam: `(model, width, params) -> (local -> forward params)`, made
      once per client per round from the global `params` the round starts
      from: what the forward pass of each local step sees of the client's
      current params `local`, before the `present` (or units) mask; the
      gradient flows through it (client.make_client_update). FIARSE's
      keeps `w` where `|w| >= t`, t fixed for the round, so a held weight
      that falls below t mid-round leaves the forward pass. Every masked
      round path applies it (engine.clients.run_client: the masked round
      and the per-client reference); the tier fast path refuses it. None:
      the forward sees `local`.
    keys: the config keys (the `policy` section's) that this recipe reads
      and policies outside its kind do not (`lora_*`, `distill_*`, ...):
      set under a policy that does not list it, a key is refused
      (config.validate); compare and sweep reset it for those policies
      (experiment/relations.py's policy_variant).
    changed_only: the round averages each entry over the clients whose
      upload changed it (a non-zero delta) among those whose `train` mask
      holds it, as FIARSE's server does: a held entry left exactly
      unchanged (a gradient that stayed zero) does not dilute the others'
      average. Applied in engine.clients.run_client (so every masked round
      path); the tier fast path refuses it. False: over every holder.
  """
  name: str
  widths: Callable[..., jax.Array]
  masks: Callable[..., tuple[Params, Params]]
  deployed: Callable[..., Params]
  units: Callable[..., dict[str, jax.Array]] | None = None
  step_masks: Callable[..., Callable] | None = None
  eligible: Callable[..., jax.Array] = everyone
  smallest_width: Callable[[Sequence[float]], float] = min
  fixed_widths: Callable[..., tuple[float, ...]] | None = None
  traffic: Callable[[Params, Params], tuple[jax.Array, jax.Array]] = (
      sub_model_traffic)
  upload: Upload | None = None
  refactor: Callable[[Params, Params], Params] | None = None
  adapt_model: Callable[[ModelDef, int], ModelDef] = _same_model
  start: Callable[[Params, ModelDef], Params] = _same_params
  prepare: Callable[[ServerPrep], tuple[Params, Any]] | None = None
  defaults: tuple[tuple[str, Any], ...] = ()
  family: str = ""
  exit_terms: Callable[..., Any] | None = None
  slotted: bool = False
  server_scale: Callable[[jax.Array], jax.Array] | None = None
  reparam: Callable[..., Callable[[Params], Params]] | None = None
  changed_only: bool = False
  keys: tuple[str, ...] = ()

  @property
  def weighted_upload(self) -> bool:
    """Whether uploads carry real-valued weights (adapter policies) rather
    than a 0/1 mask the delta is already zero off."""
    return self.upload is not None

  @property
  def weighs_examples(self) -> bool:
    """Whether a client's aggregation weight includes its example count
    (always for mask policies; an adapter policy's `Upload.by_examples`)."""
    return self.upload is None or self.upload.by_examples

  @property
  def prunes_widths(self) -> bool:
    """Whether clients may lower their own width while training."""
    return self.upload is not None and self.upload.prunes

  def default(self, key: str, fallback: Any = None,
              config: Mapping[str, Any] | None = None) -> Any:
    """The policy's default for config key `key` (`fallback` if none); a
    derived default is computed from `config`, the config's values."""
    value = dict(self.defaults).get(key, fallback)
    return value(config) if callable(value) else value


# -- who trains which width ------------------------------------------------

def tier_width(tier_widths, tier_shares, tiers, keys):
  """Each device trains its tier's width."""
  del tier_shares, keys
  return tier_widths[tiers]


def redrawn_width(tier_widths, tier_shares, tiers, keys):
  """Each client's width is redrawn every round from the tier mix."""
  del tiers
  levels = jax.vmap(lambda k: jax.random.choice(
      k, tier_widths.shape[0], p=tier_shares))(keys)
  return tier_widths[levels]


def levels(mode: str):
  """HeteroFL's level rule for `heterofl_mode`: "fix" keeps each device at
  its tier's width, "dynamic" redraws every client's level each round."""
  return redrawn_width if mode == "dynamic" else tier_width


def tier_levels(tier_widths, memory_levels):
  """The static widths of tier-width first-k policies: the tier widths."""
  del memory_levels
  return tuple(sorted(set(tier_widths), reverse=True))


# -- width policies ----------------------------------------------------------

def first_k(width, round_index, key, groups):
  """HeteroFL's static width: the first ceil(p*C) units."""
  del round_index, key
  return capacity.first_k_units(width, groups)


def _rule_units(rule: UnitRule, width, round_index, key, groups, slot):
  """The rule's units; the client's `slot` only to a cohort rule (when the
  round path gives one)."""
  if slot is None:
    return rule(width, round_index, key, groups)
  return rule(width, round_index, key, groups, slot)


def _width_masks(model: ModelDef, width, params, round_index, key, slot=None,
                 *, rule: UnitRule, scaler: bool):
  units = _rule_units(rule, width, round_index, key, model.groups, slot)
  train = capacity.masks_from_units(units, model.layers, params)
  present = (capacity.scale_hidden(train, model.layers, width)
             if scaler else train)
  return present, train


def _width_units(model: ModelDef, width, round_index, key, slot=None, *,
                 rule: UnitRule, scaler: bool):
  units = _rule_units(rule, width, round_index, key, model.groups, slot)
  return {g: u / width for g, u in units.items()} if scaler else units


def _first_k_deployed(model: ModelDef, width, params, *, scaler: bool):
  # Normalisation absorbs the scaler: HeteroFL's is the identity at
  # evaluation.
  return capacity.deployed_width_masks(width, model.layers, params,
                                       scaler and not model.normalised)


def width_policy(name: str, rule: UnitRule = first_k, *, scaler: bool = False,
                 widths=tier_width, **fields: Any) -> Policy:
  """A policy that gives each client a sub-model of the units `rule` picks.

  Its `present` mask divides hidden outputs by the width with HeteroFL's
  `scaler`; a tier deploys the first-k slice of its width. `fields` set
  the rest (eligible, fixed_widths, step_masks, defaults, ...).
  """
  return Policy(
      name=name, widths=widths,
      masks=functools.partial(_width_masks, rule=rule, scaler=scaler),
      deployed=functools.partial(_first_k_deployed, scaler=scaler),
      units=functools.partial(_width_units, rule=rule, scaler=scaler),
      **fields)


# -- depth policies ----------------------------------------------------------

def _top_layer_masks(model: ModelDef, width, params, round_index, key):
  del round_index, key
  trained = capacity.trained_layers(width, len(model.layers))
  present = jax.tree.map(jnp.ones_like, params)
  train = {spec.name: jax.tree.map(lambda p: jnp.full_like(p, trained[i]),
                                   params[spec.name])
           for i, spec in enumerate(model.layers)}
  return present, train


def _whole_model(model: ModelDef, width, params):
  del model, width
  return jax.tree.map(jnp.ones_like, params)


def depth_policy(name: str, **fields: Any) -> Policy:
  """A policy in which every device holds the whole model and a device of
  capacity p trains its top ceil(p*L) layers."""
  return Policy(name=name, widths=tier_width, masks=_top_layer_masks,
                deployed=_whole_model, **fields)


# -- adapter policies ----------------------------------------------------------

def adapter_policy(name: str, masks: Callable, upload: Upload,
                   **fields: Any) -> Policy:
  """A policy in which devices train adapters on the frozen backbone.

  `masks(model, width, params, round_index, key)` gives the adapters a
  client holds; a tier deploys the same at round 0. Only the adapters
  travel: the backbone was migrated once, before the federation.
  """
  def deployed(model, width, params):
    return masks(model, width, params, jnp.int32(0), jax.random.key(0))[0]

  def traffic(present, train):
    del present
    return cost.mask_bytes(train), cost.mask_bytes(train)

  return Policy(name=name, widths=tier_width, masks=masks, deployed=deployed,
                upload=upload, traffic=traffic, **fields)
