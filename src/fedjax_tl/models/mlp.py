"""A multilayer perceptron, each hidden layer its own width group."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
from flax import nnx

from fedjax_tl.models import axes
from fedjax_tl.models.base import ExitPoint, ModelDef, Options, from_module
from fedjax_tl.models.layers import dropout, scale_units


class MLP(nnx.Module):
  """Flatten, then `dense_i` + ReLU (+ dropout) per hidden width, then `head`.

  Width groups: `hidden_i`, the units of hidden layer i. Exit points
  (models.exits): after every hidden layer but the last, its activations
  (a depth method's depths are the hidden layers).
  """

  masks_activations = True  # __call__ applies `units`

  def __init__(self, in_features: int, hidden: Sequence[int],
               num_classes: int, *, dropout: float = 0.0, rngs: nnx.Rngs):
    widths = [in_features, *hidden]
    self.num_hidden = len(hidden)
    self.hidden = tuple(hidden)
    for i in range(len(hidden)):
      setattr(self, f"dense_{i}", nnx.Linear(widths[i], widths[i + 1],
                                             rngs=rngs))
    self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)
    # One dropout site after each hidden layer.
    self.dropout_rates = (float(dropout),) * len(hidden)

  def __call__(self, x: jax.Array, rng: jax.Array | None = None,
               units: Mapping[str, jax.Array] | None = None, *,
               features: bool = False):
    """Logits; with `features`, `(logits, [hidden activations at the exit
    points])`."""
    x = x.reshape(x.shape[0], -1)
    taps = []
    for i in range(self.num_hidden):
      x = jax.nn.relu(scale_units(getattr(self, f"dense_{i}")(x), units,
                                  f"hidden_{i}"))
      x = dropout(x, self.dropout_rates[i], rng, i)
      taps.append(x)
    logits = self.head(x)
    return (logits, taps[:-1]) if features else logits

  def exit_points(self) -> tuple[ExitPoint, ...]:
    return tuple(ExitPoint(f"dense_{i}", f"hidden_{i}", self.hidden[i])
                 for i in range(self.num_hidden - 1))

  def axes(self) -> tuple[axes.Layer, ...]:
    groups = [None] + [f"hidden_{i}" for i in range(self.num_hidden)]
    return (*(axes.dense(f"dense_{i}", groups[i], groups[i + 1])
              for i in range(self.num_hidden)),
            axes.dense("head", groups[-1], None))


def mlp(input_shape: Sequence[int], num_classes: int, seed: int,
        options: Options) -> ModelDef:
  """`MLP` with hidden widths `options.hidden` (dropout 0 by default)."""
  return from_module(MLP(math.prod(input_shape), options.hidden, num_classes,
                         dropout=options.dropout or 0.0,
                         rngs=nnx.Rngs(params=seed)))
