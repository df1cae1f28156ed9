"""The character LSTM that fedjax and TFF train on Shakespeare.

fedjax's `models.shakespeare.create_lstm_model` (McMahan et al., AISTATS
2017): an embedding of 8 per token, two LSTM layers of 256 units, a dense
head to the vocabulary; next-token logits `[batch, T, vocab]` for token ids
`[batch, T]` (input shape `(T,)`). As in fedjax's Haiku model, each LSTM
layer's output passes through a tanh (Haiku's `DeepRNN([LSTM, tanh, ...])`),
the forget gate gets a constant +1 (Haiku's and Sonnet's forget bias), the
state starts at zero, and a gate's kernel is initialised as one matrix over
the layer's input and recurrent features (Haiku's truncated normal,
1/sqrt(fan-in); the embedding's stddev 1, the head's 1/sqrt(H)).

Width groups: `lstm_i`, the units of LSTM layer i. Layer i is two dense
layers: `lstm_i/input` (kernel `[in, 4H]`, bias `[4H]`) and
`lstm_i/recurrent` (kernel `[H, 4H]`, no bias). Their `4H` gate axis is laid
out unit by unit, each unit's four gates (input, cell, forget, output)
side by side (`Axis("lstm_i", per_unit=4)`), so a width policy keeps or
drops a unit with all its gates, and the first-k slice of the params is an
LSTM of k units. A dropped unit's gates see zero pre-activations, so its
cell stays 0 and its output is 0, exactly as in the LSTM built without it.
The embedding and the head's outputs are not cut.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_tl.models import axes
from fedjax_tl.models.base import ModelDef, Options, from_module
from fedjax_tl.models.layers import scale_units

GATES = 4  # per unit: input, cell, forget, output
EMBED = 8  # fedjax's and TFF's Shakespeare sizes
HIDDEN = (256, 256)


def haiku_truncated_normal(stddev: float) -> nnx.Initializer:
  """Haiku's `TruncatedNormal(stddev)`, fedjax's default for its embedding
  (stddev 1) and dense layers (1/sqrt(fan-in)): a standard normal cut at
  +-2, times `stddev`, not rescaled (its standard deviation is 0.88
  stddev; jax's `truncated_normal` rescales)."""
  def init(key, shape, dtype=jnp.float32):
    return stddev * jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)
  return init


class LSTMLayer(nnx.Module):
  """One LSTM layer's weights: gates `x @ input + h @ recurrent`."""

  def __init__(self, in_features: int, hidden: int, *, rngs: nnx.Rngs):
    # One truncated normal over the [in + H, 4H] matrix, as Haiku draws it.
    init = haiku_truncated_normal(1.0 / math.sqrt(in_features + hidden))
    self.input = nnx.Linear(in_features, GATES * hidden, kernel_init=init,
                            rngs=rngs)
    self.recurrent = nnx.Linear(hidden, GATES * hidden, use_bias=False,
                                kernel_init=init, rngs=rngs)


class LSTM(nnx.Module):
  """Embedding, LSTM layers (each followed by tanh), dense head."""

  masks_activations = True  # __call__ applies `units`

  def __init__(self, input_shape: Sequence[int], num_classes: int, *,
               embed: int = EMBED, hidden: Sequence[int] = HIDDEN,
               rngs: nnx.Rngs):
    if len(input_shape) != 1:
      raise ValueError(f"the lstm takes token ids [T], not inputs of shape "
                       f"{tuple(input_shape)}")
    if not hidden:
      raise ValueError("the lstm needs at least one layer (hidden)")
    self.tokens = int(input_shape[0])
    self.embed = nnx.Embed(num_classes, embed, rngs=rngs,
                           embedding_init=haiku_truncated_normal(1.0))
    widths = [embed, *hidden]
    self.layers = nnx.List([LSTMLayer(widths[i], widths[i + 1], rngs=rngs)
                            for i in range(len(hidden))])
    self.head = nnx.Linear(
        widths[-1], num_classes, rngs=rngs,
        kernel_init=haiku_truncated_normal(1.0 / math.sqrt(widths[-1])))
    self.dropout_rates = ()

  def __call__(self, x: jax.Array, rng: jax.Array | None = None,
               units: Mapping[str, jax.Array] | None = None) -> jax.Array:
    """Next-token logits `[batch, T, vocab]` of token ids `x[batch, T]`."""
    del rng  # no dropout
    h = self.embed(x.astype(jnp.int32))
    for i, layer in enumerate(self.layers):
      h = jnp.tanh(_run_layer(layer, h, units, f"lstm_{i}"))
    return self.head(h)

  def axes(self) -> tuple[axes.Layer, ...]:
    t = self.tokens
    found = [axes.layer("embed", embedding=(None, None))]
    previous = None
    for i in range(len(self.layers)):
      group = f"lstm_{i}"
      gates = axes.Axis(group, per_unit=GATES)
      found += [axes.dense(f"layers/{i}/input", previous, gates,
                           positions=t),
                axes.dense(f"layers/{i}/recurrent", group, gates,
                           bias=False, positions=t)]
      previous = group
    return (*found, axes.dense("head", previous, None, positions=t))


def _run_layer(layer: LSTMLayer, h: jax.Array,
               units: Mapping[str, jax.Array] | None,
               group: str) -> jax.Array:
  """The layer's outputs `[batch, T, H]` over inputs `h[batch, T, in]`; the
  gates' pre-activations times `units[group]` (each unit's four gates
  alike). H is read off the (possibly sliced) recurrent kernel."""
  recurrent = layer.recurrent.kernel[...].astype(h.dtype)
  hidden = recurrent.shape[0]
  inputs = scale_units(layer.input(h), units, group, GATES)

  def step(carry, z_in):
    out, cell = carry
    z = z_in + scale_units(out @ recurrent, units, group, GATES)
    i, g, f, o = jnp.moveaxis(z.reshape(*z.shape[:-1], hidden, GATES), -1, 0)
    cell = jax.nn.sigmoid(f + 1) * cell + jax.nn.sigmoid(i) * jnp.tanh(g)
    out = jax.nn.sigmoid(o) * jnp.tanh(cell)
    return (out, cell), out

  zeros = jnp.zeros((h.shape[0], hidden), inputs.dtype)
  _, outs = jax.lax.scan(step, (zeros, zeros), jnp.swapaxes(inputs, 0, 1))
  return jnp.swapaxes(outs, 0, 1)


def lstm(input_shape: Sequence[int], num_classes: int, seed: int,
         options: Options) -> ModelDef:
  """`LSTM` of embedding `options.embed_dim` (None: fedjax's 8) and layer
  sizes `options.hidden` (a config left unset gives fedjax's 256, 256)."""
  return from_module(LSTM(
      input_shape, num_classes,
      embed=EMBED if options.embed_dim is None else options.embed_dim,
      hidden=tuple(options.hidden),
      rngs=nnx.Rngs(params=seed)))
