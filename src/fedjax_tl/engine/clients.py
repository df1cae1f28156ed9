"""One client of a round: its keys, masks, data, attack and local update.

Every round path trains its clients here: the masked round and the
per-client reference through :func:`run_client`, the tier fast path
(tiered.py) through :func:`local_update` on its sliced params.
"""

from __future__ import annotations

from typing import Any

import jax

from fedjax_tl.client import held_labels
from fedjax_tl.engine.state import TRAIN_SALT, UNITS_SALT, DeviceArrays
from fedjax_tl.models.base import Params

# The simulation (simulation.Simulation) is typed `Any`, so this module does
# not import the module that imports it.
Simulation = Any


def malicious(sim: Simulation, arrays: DeviceArrays, device_id: jax.Array
              ) -> jax.Array | None:
  """Whether a device mounts `sim.attack` (None without an attack)."""
  if sim.attack.kind == "none" or arrays.malicious is None:
    return None
  return arrays.malicious[device_id]


def num_classes(sim: Simulation) -> int:
  """The width of `sim.model`'s logits (from shapes only)."""
  example = jax.ShapeDtypeStruct((1, *sim.arrays.x.shape[2:]),
                                 sim.arrays.x.dtype)
  return jax.eval_shape(sim.model.apply, sim.model.init_params,
                        example).shape[-1]


def output_layer(sim: Simulation) -> tuple[str, tuple[str, ...]]:
  """The output layer's name and its params whose last axis runs over the
  logits (a kernel's columns, the bias), whatever the layer is called.

  The output layer is the top layer of `sim.model.layers` with a param whose
  last axis has no width group (models.axes: the logits are never cut) and
  is as long as the logits; a param it does not declare counts as uncut.

  Raises:
    ValueError: no layer has such a param.
  """
  classes = num_classes(sim)
  params = sim.model.init_params
  for spec in reversed(sim.model.layers):
    declared = spec.axes
    found = tuple(
        name for name, value in params.get(spec.name, {}).items()
        if value.ndim and value.shape[-1] == classes and
        (declared.get(name) or (None,))[-1] is None)
    if found:
      return spec.name, found
  raise ValueError(
      f"masked_ce_head='label_holders' needs an output layer with a "
      f"{classes}-wide uncut last axis, and the model declares none; set "
      f"masked_ce_head='layer_holders'")


def label_rule(sim: Simulation) -> bool:
  """Whether the server averages the output layer's entries of label c
  over the clients holding label c only (HeteroFL's `combine`): with
  masked cross-entropy, `masked_ce_head='label_holders'` and a mask
  policy (an adapter policy's upload is its factors, not the head)."""
  return (sim.masked_ce and sim.masked_ce_head == "label_holders" and
          sim.policy.upload is None)


def label_rows(sim: Simulation, tree: Params, label_mask: jax.Array
               ) -> Params:
  """`tree` (shaped like the params or a first-k slice of them) with the
  output layer's entries of the labels outside `label_mask` zeroed."""
  name, names = output_layer(sim)
  layer = dict(tree[name])
  for param in names:
    layer[param] = layer[param] * label_mask.astype(layer[param].dtype)
  return {**tree, name: layer}


def local_update(sim: Simulation, arrays: DeviceArrays, params: Params,
                 present: Params, train: Params, key: jax.Array,
                 device_id: jax.Array, num_steps: jax.Array,
                 step_masks: Any = None, units: Any = None,
                 exit_terms: Any = None, reparam: Any = None):
  """One device's local update on its own rows: `(delta, stats, malicious,
  upload)`.

  `key` is the device's client key (`Simulation.client_key`). A malicious
  device trains on labels corrupted by `sim.attack`; its upload is left to
  the caller to corrupt (`sim.attack.delta(delta, malicious)`), after any
  change the policy makes to it. With `masked_ce` the softmax runs over the
  labels the device holds only, and under :func:`label_rule` the delta's
  output-layer entries of the other labels are dropped: `upload` is then
  `train` without them (the mask the round aggregates with), else None
  (the round aggregates with `train`). `exit_terms` (client.ExitTerms):
  how an early-exit model's exits train; `reparam`: what each step's
  forward sees of the params (`Simulation.reparam`).
  """
  x, y, count = (arrays.x[device_id], arrays.y[device_id],
                 arrays.count[device_id])
  bad = malicious(sim, arrays, device_id)
  classes = num_classes(sim)
  y = sim.attack.labels(y, bad, classes)
  label_mask = held_labels(y, count, classes) if sim.masked_ce else None
  delta, stats = sim.client_update(
      params, present, train, x, y, count, num_steps,
      jax.random.fold_in(key, TRAIN_SALT), label_mask, step_masks,
      units=units, frozen=bool(sim.frozen), exit_terms=exit_terms,
      reparam=reparam)
  if not label_rule(sim):
    return delta, stats, bad, None
  return (label_rows(sim, delta, label_mask), stats, bad,
          label_rows(sim, train, label_mask))


def slot_widths(plan: Any) -> jax.Array:
  """`[slots]` the width of each slot of a cohort plan, 0 for a slot with
  no online device: the widths a cohort rule's clients draw units for
  (a sampled device is sent its sub-model even if it is dropped later)."""
  return plan.fraction * plan.valid


def run_client(sim: Simulation, arrays: DeviceArrays, params: Params,
               round_index: jax.Array, device_id: jax.Array,
               fraction: jax.Array, num_steps: jax.Array,
               slot: jax.Array | None = None,
               widths: jax.Array | None = None):
  """One client's `(delta, mask, stats, traffic)`.

  The round adds `weight * mask * delta` and `weight * mask` to its sums.
  For mask policies `mask` is the 0/1 train mask (under :func:`label_rule`
  without the output layer's entries of the labels the device lacks) and
  `delta` is zero off it; for adapter policies they are HetLoRA's
  padded-factor difference and norm weight (lora.aggregation_terms), and
  `stats.width` is the width the client keeps after rank self-pruning. A
  malicious device's labels and upload are corrupted here (`sim.attack`),
  so every round path sees the same attack. `traffic` is an adapter
  client's `(bytes_down, bytes_up)` (its upload depends on its pruning);
  None for mask policies, whose clients move their width's sub-model
  (`Simulation.sub_model_costs`). `slot` is the client's cohort slot and
  `widths` `[slots]` the round's widths, 0 for slots that draw no units
  (:func:`slot_widths`), which a cohort rule reads (`Policy.slotted`).
  Each local step's forward sees `Policy.reparam` of the params; with
  `Policy.changed_only` the mask keeps only the entries the (attacked)
  upload changes.
  """
  key = sim.client_key(round_index, device_id)
  place = sim.slot(round_index, slot, widths)
  present, train = sim.masks(fraction, params, round_index,
                             jax.random.fold_in(key, UNITS_SALT), place)
  units = sim.unit_scales(fraction, round_index,
                          jax.random.fold_in(key, UNITS_SALT), place)
  step_masks = sim.step_masks(fraction, params, units is not None)
  exit_terms = None
  if sim.policy.exit_terms is not None:
    exit_terms = sim.policy.exit_terms(sim.model, train, round_index)
  delta, stats, bad, upload = local_update(
      sim, arrays, params, present, train, key, device_id, num_steps,
      step_masks, units, exit_terms, sim.reparam(fraction, params))
  train = train if upload is None else upload
  traffic = None
  if sim.policy.upload is not None:
    down, _ = sim.policy.traffic(present, train)
    delta, train, width, up = sim.policy.upload.terms(params, delta, present,
                                                      fraction)
    traffic = (down, up)
    stats = stats._replace(width=width)
  delta = sim.attack.delta(delta, bad)
  if sim.policy.changed_only:  # only the entries the upload changes count
    train = jax.tree.map(lambda m, d: m * (d != 0).astype(m.dtype), train,
                         delta)
  return delta, train, stats, traffic
