"""The simulated cost of a client's round: FLOPs, bytes, memory, seconds.

Pure jnp functions of masks and per-device figures, usable inside jit: they
scale a device's full-model speed by its sub-model's share of the FLOPs, turn
masks into bytes on the wire, and apply a round deadline and over-commitment.
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from fedjax_tl.models.axes import Layer
from fedjax_tl.models.base import Params

# Forward + backward of a training step cost about three forward passes (the
# backward computes gradients w.r.t. both activations and weights); FedScale
# calls this the augmentation factor and uses the same 3.
TRAIN_FLOPS_FACTOR = 3.0
BYTES_PER_VALUE = 4  # float32 parameters on the wire and in memory


def mask_count(mask: Params, params: Params | None = None) -> jax.Array:
  """Number of parameter entries a mask keeps (non-zero), as int32.

  Args:
    mask: a mask tree (0/1 leaves).
    params: when given, each mask leaf is first broadcast to the shape of the
      matching params leaf, so masks that broadcast (a scalar 1 for a whole
      layer) count what they cover. Its leaves only need a `.shape`.
  """
  if params is not None:
    mask = jax.tree.map(lambda m, p: jnp.broadcast_to(m, p.shape), mask,
                        params)
  return sum((jnp.count_nonzero(m).astype(jnp.int32)
              for m in jax.tree.leaves(mask)), jnp.int32(0))


def mask_bytes(mask: Params, params: Params | None = None, *,
               bytes_per_value: int = BYTES_PER_VALUE) -> jax.Array:
  """Bytes of the parameters a mask keeps (float32 `[]`).

  Download is the client's `present` mask (what it holds); upload is its
  `train` mask (what it updates and sends back).
  """
  return mask_count(mask, params).astype(jnp.float32) * bytes_per_value


def conv_positions(input_shape: Sequence[int], layers: Sequence[Layer],
                   params: Params) -> dict[str, int]:
  """Output positions per example of each conv layer.

  A layer's own `positions` (the built-in models set them) come first;
  otherwise it follows `models.cnn.CNN`: a 3x3 `SAME` convolution keeps the
  spatial size, and a 2x2 max-pool halves it after each convolution while
  both sides are above 1. Layers whose kernel is not 4-D are dense: they
  get an entry only if they declare `positions` (a Transformer's
  projections, applied to every token).
  """
  # Images are [H, W, C]; other inputs (tokens, features) have no convs.
  height, width = (*map(int, input_shape[:2]), 1, 1)[:2]
  positions = {}
  for spec in layers:
    if "kernel" not in params[spec.name] and spec.positions is not None:
      positions[spec.name] = spec.positions  # a norm on conv features
      continue
    if "kernel" not in params[spec.name] or (
        params[spec.name]["kernel"].ndim != 4):
      if spec.positions is not None:  # a dense layer applied per token
        positions[spec.name] = spec.positions
      continue
    positions[spec.name] = (height * width if spec.positions is None else
                            spec.positions)
    if height > 1 and width > 1:
      height, width = height // 2, width // 2
  return positions


def forward_flops(layers: Sequence[Layer], params: Params,
                  present: Params | None = None,
                  positions: Mapping[str, int] | None = None) -> jax.Array:
  """Forward FLOPs per example of the (sub-)model a `present` mask keeps.

  Counts multiply-adds as 2 FLOPs: a dense layer costs 2 x kept inputs x kept
  outputs, a conv layer 2 x kh x kw x kept in-channels x kept out-channels x
  output positions. Both are 2 x (kept kernel entries) x positions, which is
  what is computed, so any mask pattern counts correctly. Biases,
  activations and pooling are ignored (a few percent for these models).

  Args:
    layers: the model's layers (named axes).
    params: the full params tree (leaves need only a `.shape`).
    present: the client's present mask; None for the full model.
    positions: output positions per example of each conv (4-D kernel) layer,
      e.g. from :func:`conv_positions`; dense layers use 1.

  Returns:
    float32 `[]` FLOPs per example.
  """
  positions = positions or {}
  total = jnp.float32(0)
  for spec in layers:
    if "kernel" not in params[spec.name]:
      continue  # a normalisation layer: its few FLOPs are not counted
    shape = params[spec.name]["kernel"].shape
    if len(shape) == 4 and spec.name not in positions:
      raise ValueError(f"conv layer {spec.name!r} needs its output positions")
    if present is None:
      kept = jnp.float32(math.prod(shape))
    else:
      kept = jnp.count_nonzero(jnp.broadcast_to(
          present[spec.name]["kernel"], shape)).astype(jnp.float32)
    total = total + 2 * kept * positions.get(spec.name, 1)
  return total


def flops_fraction(layers: Sequence[Layer], params: Params,
                   present: Params,
                   positions: Mapping[str, int] | None = None) -> jax.Array:
  """The sub-model's share of the full model's forward FLOPs (`[]`)."""
  return (forward_flops(layers, params, present, positions) /
          forward_flops(layers, params, None, positions))


def ms_per_sample_from_gflops(gflops: jax.Array,
                              flops_per_sample: jax.Array) -> jax.Array:
  """Forward ms per sample of a model on devices of the given GFLOP/s."""
  return flops_per_sample / (gflops * 1e9) * 1e3


def step_flops(forward_flops_per_example: jax.Array, *,
               batch_size: int) -> jax.Array:
  """FLOPs of one local training step: `3 x batch x forward FLOPs`.

  The same forward + backward factor (:data:`TRAIN_FLOPS_FACTOR`) that
  :func:`step_seconds` charges in time, so a tier's reported FLOPs per step
  and its simulated step time describe one cost.
  """
  return TRAIN_FLOPS_FACTOR * batch_size * forward_flops_per_example


def step_seconds(ms_per_sample: jax.Array, flops_fraction: jax.Array, *,
                 batch_size: int) -> jax.Array:
  """Seconds of one local training step.

  `3 x batch x ms_per_sample x flops_fraction / 1000`: `ms_per_sample` is the
  full model's forward time per sample (a FedScale `computation` figure), the
  fraction scales it to the sub-model, and 3 covers forward + backward.
  """
  return step_flops(ms_per_sample * flops_fraction,
                    batch_size=batch_size) / 1000


def train_seconds(ms_per_sample: jax.Array, flops_fraction: jax.Array, *,
                  batch_size: int, local_steps: int | jax.Array) -> jax.Array:
  """Seconds of `local_steps` training steps (see :func:`step_seconds`)."""
  return local_steps * step_seconds(ms_per_sample, flops_fraction,
                                    batch_size=batch_size)


def comm_seconds(download_bytes: jax.Array, upload_bytes: jax.Array,
                 down_kbps: jax.Array,
                 up_kbps: jax.Array | None = None) -> jax.Array:
  """Seconds to download and upload, at kbit/s (1 kbit = 1000 bit).

  With one bandwidth (`up_kbps` None, as in FedScale's trace) this is
  `(download + upload) x 8 / 1000 / kbps`.
  """
  up_kbps = down_kbps if up_kbps is None else up_kbps
  return (download_bytes * 8 / 1000 / down_kbps +
          upload_bytes * 8 / 1000 / up_kbps)


def training_memory_bytes(layers: Sequence[Layer], params: Params,
                          present: Params | None = None,
                          train: Params | None = None, *, batch_size: int,
                          positions: Mapping[str, int] | None = None,
                          optimizer_slots: int = 1,
                          bytes_per_value: int = BYTES_PER_VALUE
                          ) -> jax.Array:
  """A rough peak-memory estimate (bytes) of training a sub-model.

  `bytes x (present params + train params x (1 + optimizer_slots) + batch x
  activations)`: the held weights, a gradient and the optimiser's slots for
  each trained weight (frozen weights need neither), and every layer's output
  for the batch, kept for the backward pass. A layer's output is its kept
  output units (the non-zero entries of its bias mask, or the output units
  of its kernel's kept entries) x its output positions (conv outputs before
  pooling; a norm layer's declared positions). The input batch, framework workspace and
  fused-op savings are ignored.

  Args:
    layers: the model's layers (named axes).
    params: the full params tree (leaves need only a `.shape`).
    present: the present mask; None for the full model.
    train: the train mask; None means everything present is trained.
    batch_size: examples per local step.
    positions: conv output positions per example (:func:`conv_positions`).
    optimizer_slots: state values per trained weight: 0 for plain SGD, 1 for
      SGD with momentum, 2 for Adam.
    bytes_per_value: 4 for float32.

  Returns:
    float32 `[]` bytes.
  """
  positions = positions or {}
  if present is None:
    present = jax.tree.map(lambda p: jnp.ones((), jnp.float32), params)
  train = present if train is None else train
  held = mask_count(present, params).astype(jnp.float32)
  trained = mask_count(train, params).astype(jnp.float32)
  activations = jnp.float32(0)
  for spec in layers:
    layer = params[spec.name]
    if "bias" in layer:
      kept_out = jnp.count_nonzero(jnp.broadcast_to(
          present[spec.name]["bias"], layer["bias"].shape))
    elif "kernel" in layer:  # the output units any kept entry feeds
      kernel = jnp.broadcast_to(present[spec.name]["kernel"],
                                layer["kernel"].shape)
      kept_out = jnp.count_nonzero(jnp.any(
          kernel.reshape(-1, kernel.shape[-1]) != 0, axis=0))
    else:
      continue
    kept_out = kept_out.astype(jnp.float32)
    activations = activations + kept_out * positions.get(spec.name, 1)
  values = held + trained * (1 + optimizer_slots) + batch_size * activations
  return values * bytes_per_value


def full_training_memory_bytes(layers: Sequence[Layer], params: Params, *,
                               batch_size: int,
                               positions: Mapping[str, int] | None = None,
                               optimizer_slots: int = 1,
                               bytes_per_value: int = BYTES_PER_VALUE) -> int:
  """:func:`training_memory_bytes` of the full model (every param held and
  trained), from the shapes alone in Python ints: the up-front memory check
  (experiment/memory.py) sizes models too large to allocate, whose params
  are `jax.ShapeDtypeStruct`s and whose masks must not be materialised."""
  positions = positions or {}
  count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
  activations = 0
  for spec in layers:
    layer = params[spec.name]
    if "bias" in layer:
      units = layer["bias"].shape[-1]
    elif "kernel" in layer:
      units = layer["kernel"].shape[-1]
    else:
      continue
    activations += units * positions.get(spec.name, 1)
  values = count * (2 + optimizer_slots) + batch_size * activations
  return int(values * bytes_per_value)


class DeadlineOutcome(NamedTuple):
  """What each client achieves under a round deadline.

  Attributes:
    steps: `[clients]` int32 local steps completed.
    participates: `[clients]` bool, False for clients whose update is dropped
      (give them aggregation weight 0).
    finish_seconds: `[clients]` float32 time the upload ends, `+inf` for
      non-participants.
  """
  steps: jax.Array
  participates: jax.Array
  finish_seconds: jax.Array


def apply_deadline(step_secs: jax.Array, comm_secs: jax.Array,
                   deadline: float | jax.Array, *, local_steps: int,
                   mode: str) -> DeadlineOutcome:
  """Applies a round deadline (seconds, inclusive; `inf` for none).

  Modes:
    - `drop`: a client that cannot finish all `local_steps` plus its
      communication by the deadline is dropped (0 steps, not participating).
    - `partial`: a client runs `floor((deadline - comm) / step)` steps,
      clipped to `[0, local_steps]`, and participates when that is > 0.

  Args:
    step_secs: `[clients]` seconds per local step.
    comm_secs: `[clients]` download + upload seconds.
    deadline: the round deadline in seconds.
    local_steps: the configured number of local steps.
    mode: `drop` or `partial` (static).

  Returns:
    A :class:`DeadlineOutcome`.
  """
  step_secs = jnp.asarray(step_secs, jnp.float32)
  comm_secs = jnp.asarray(comm_secs, jnp.float32)
  if mode == "drop":
    on_time = comm_secs + local_steps * step_secs <= deadline
    steps = jnp.where(on_time, local_steps, 0)
  elif mode == "partial":
    spare = deadline - comm_secs
    # A free step (zero cost) would divide 0 by 0; it fits iff spare >= 0.
    fit = jnp.where(step_secs > 0,
                    jnp.floor(spare / jnp.where(step_secs > 0, step_secs, 1)),
                    jnp.where(spare >= 0, local_steps, 0))
    steps = jnp.clip(fit, 0, local_steps)
  else:
    raise ValueError(f"unknown deadline mode {mode!r} (drop or partial)")
  steps = steps.astype(jnp.int32)
  participates = steps > 0
  finish = jnp.where(participates, comm_secs + steps * step_secs, jnp.inf)
  return DeadlineOutcome(steps, participates, finish.astype(jnp.float32))


def overcommit_size(clients_per_round: int, overcommit: float) -> int:
  """Devices sampled per round under over-commitment: ceil(overcommit x K).

  The product is rounded to 9 decimals first, so 1.1 x 10 samples 11, not 12.
  """
  return math.ceil(round(overcommit * clients_per_round, 9))


def first_to_finish(finish_seconds: jax.Array, k: int | jax.Array,
                    valid: jax.Array | None = None) -> jax.Array:
  """Over-commitment: of K' sampled clients keep the first k to finish.

  Ties go to the lower slot; invalid slots and infinite finish times are
  never kept, so fewer than k may be kept.

  Args:
    finish_seconds: `[K']` finish times.
    k: how many to keep.
    valid: `[K']` bool, slots that hold a real client; None for all.

  Returns:
    `[K']` bool mask of kept clients.
  """
  finish_seconds = jnp.asarray(finish_seconds)
  eligible = jnp.isfinite(finish_seconds)
  if valid is not None:
    eligible = eligible & valid
  key = jnp.where(eligible, finish_seconds, jnp.inf)
  order = jnp.argsort(key, stable=True)
  rank = jnp.zeros(key.shape, jnp.int32).at[order].set(
      jnp.arange(key.shape[0], dtype=jnp.int32))
  return eligible & (rank < k)
