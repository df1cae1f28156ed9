"""Flax NNX models as pure functions of a params dict, plus their width spec.

A model is defined as an NNX module and split once: the simulation works on the
pure params dict (`{layer_name: {'kernel', 'bias'}}`) and a pure `apply`. The
:class:`LayerSpec` tuple says which hidden unit group feeds and leaves each
layer, which is all that capacity masks need to address widths and depths.
`apply` optionally takes a PRNG key (train-time dropout) and per-group unit
multipliers (width masks applied to activations instead of parameters).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Params = Any  # a nested dict of arrays

# How convolutions and max-pools run: "xla" (lax.conv, reduce_window),
# "im2col" (each kernel tap a shifted slice, one matmul; pooling by reshape)
# or "auto" (im2col on CPU, xla elsewhere). XLA:CPU runs a convolution, its
# gradients and a vmapped (per-client kernel) convolution several times to
# fifty times slower inside a loop than the same matmul (measured on 2 cores).
CONV_IMPLS = ("auto", "xla", "im2col")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """How one layer's parameters map onto hidden unit groups.

  Attributes:
    name: the layer's key in the params dict; layers are listed bottom-up.
    in_group: index of the hidden group feeding it, None for the model input.
    out_group: index of the hidden group it produces, None for the logits.
    in_repeat: how often each input unit repeats along the kernel's input axis
      (a flatten of `[H, W, C]` repeats each of C channels H*W times).
    positions: a conv layer's output positions per example (before any
      pooling), for FLOP and memory counts; None for dense layers, or to let
      `cost.conv_positions` assume the built-in `cnn`'s geometry.
  """
  name: str
  in_group: int | None
  out_group: int | None
  in_repeat: int = 1
  positions: int | None = None


@dataclasses.dataclass(frozen=True)
class ModelDef:
  """A model ready for simulation.

  Attributes:
    apply: `apply(params, x[batch, *input_shape], rng=None, units=None) ->
      logits[batch, classes]`. With a PRNG key `rng` the model's dropout is
      on (training); without, the forward is deterministic (evaluation).
      `units`, one `[group_size]` vector per hidden group, multiplies each
      hidden layer's outputs before its activation (see :func:`scale_units`).
    init_params: freshly initialised params (a pure dict of arrays).
    layers: the layer specs, bottom-up.
    group_sizes: number of units in each hidden group.
    dropout: the dropout rate of each of the model's dropout sites, in
      forward order (all 0 or empty: `rng` changes nothing).
  """
  apply: Callable[..., jax.Array]
  init_params: Params
  layers: tuple[LayerSpec, ...]
  group_sizes: tuple[int, ...]
  dropout: tuple[float, ...] = ()

  @property
  def has_dropout(self) -> bool:
    """Whether a training forward (with `rng`) differs from evaluation."""
    return any(rate > 0 for rate in self.dropout)


def dropout_keep(rng: jax.Array, shape: Sequence[int],
                 rate: float) -> jax.Array:
  """The bool keep mask `[*shape]` of one dropout site (kept w.p. 1 - rate).

  The entries of unit `j` (the last axis) are drawn from
  `fold_in(rng, j)` alone, so a model sliced to its first k units (the tier
  fast path) draws for them the same mask as the full-width model. Each
  entry takes the fewest bits (8, 16 or 32) that express `rate` exactly
  (8 for 0.25 and 0.5), several entries to one random 32-bit word: the
  random bits are most of dropout's cost on CPU.
  """
  bits = next((b for b in (8, 16) if (rate * 2**b).is_integer()), 32)
  threshold = min(round(rate * 2**bits), 2**bits - 1)
  per_word = 32 // bits
  size = math.prod(shape[:-1])

  def draw(key):
    words = jax.random.bits(key, (-(-size // per_word),), jnp.uint32)
    parts = (words if bits == 32 else jax.lax.bitcast_convert_type(
        words, jnp.dtype(f"uint{bits}")).reshape(-1))
    return (parts[:size] >= threshold).reshape(shape[:-1])

  keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(shape[-1]))
  return jnp.moveaxis(jax.vmap(draw)(keys), 0, -1)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None,
            site: int) -> jax.Array:
  """Inverted dropout at site number `site` of a forward pass.

  Kept entries are scaled by 1/(1 - rate), so evaluation (no `rng`) needs no
  rescaling. The mask is `dropout_keep(fold_in(rng, site), x.shape, rate)`.
  """
  if rng is None or rate == 0:
    return x
  keep = dropout_keep(jax.random.fold_in(rng, site), x.shape, rate)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


def unit_scale(units: Sequence[jax.Array] | None, group: int
               ) -> jax.Array | None:
  """`units[group]`, or None without units."""
  return None if units is None else units[group]


def scale_units(z: jax.Array, units: Sequence[jax.Array] | None,
                group: int) -> jax.Array:
  """A hidden layer's outputs `z[..., units]` times `units[group]`.

  With a 0/1 unit mask (times HeteroFL's scaler) this is the same forward,
  and gives every parameter the same gradient, as masking the layer's kernel
  and bias: the layer's inputs from absent units are already zero.
  """
  return z if units is None else z * units[group].astype(z.dtype)


def resolve_conv_impl(impl: str) -> str:
  """`impl`, with "auto" resolved for the default backend."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {', '.join(CONV_IMPLS)}, not "
                     f"{impl!r}")
  if impl == "auto":
    return "im2col" if jax.default_backend() == "cpu" else "xla"
  return impl


def conv2d(layer: nnx.Conv, x: jax.Array, impl: str,
           scale: jax.Array | None = None) -> jax.Array:
  """`layer(x) * scale` (stride 1, "SAME" or "VALID" padding), `x[batch, H,
  W, C]`, `scale[out]` or None for none.

  "im2col" builds the `[batch, H', W', kh*kw*C]` patches from kh*kw shifted
  slices of `x` and multiplies them by the `[kh*kw*C, out]` kernel: the same
  sums as the convolution, in an order that may round differently. It
  applies `scale` to the kernel and bias, not to the far larger outputs
  (the same values for 0/1 scales): multiplying the outputs splits the
  gradient's col2im over two consumers, which XLA:CPU then runs unfused.
  """
  if impl == "xla":
    out = layer(x)
    return out if scale is None else out * scale.astype(out.dtype)
  kernel, bias = layer.kernel[...], layer.bias[...]
  if scale is not None:
    kernel, bias = kernel * scale, bias * scale
  kh, kw, cin, cout = kernel.shape
  if layer.padding == "SAME":
    x = jnp.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2),
                    (0, 0)))
  elif layer.padding != "VALID":
    raise ValueError(f"im2col supports SAME and VALID padding, not "
                     f"{layer.padding!r}")
  n, h, w, _ = x.shape
  ho, wo = h - kh + 1, w - kw + 1
  patches = jnp.concatenate([x[:, i:i + ho, j:j + wo, :] for i in range(kh)
                             for j in range(kw)], axis=-1)
  out = jnp.dot(patches.reshape(n * ho * wo, kh * kw * cin),
                kernel.reshape(kh * kw * cin, cout).astype(x.dtype))
  return out.reshape(n, ho, wo, cout) + bias.astype(out.dtype)


def max_pool_2x2(x: jax.Array, impl: str) -> jax.Array:
  """2x2 max-pool with stride 2 (a trailing odd row or column dropped).

  "im2col" reshapes each window onto its own axes and takes their max (the
  same values; a tie's gradient is shared instead of given to one input).
  """
  if impl == "xla":
    return nnx.max_pool(x, (2, 2), strides=(2, 2))
  n, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class MLP(nnx.Module):
  """Flatten, then `dense_i` + ReLU (+ dropout) per hidden width, then `head`."""

  def __init__(self, in_features: int, hidden: Sequence[int],
               num_classes: int, *, dropout: float = 0.0, rngs: nnx.Rngs):
    widths = [in_features, *hidden]
    self.num_hidden = len(hidden)
    for i in range(len(hidden)):
      setattr(self, f"dense_{i}", nnx.Linear(widths[i], widths[i + 1],
                                             rngs=rngs))
    self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)
    # One dropout site after each hidden layer.
    self.dropout_rates = (float(dropout),) * len(hidden)

  def __call__(self, x: jax.Array, rng: jax.Array | None = None,
               units: Sequence[jax.Array] | None = None) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    for i in range(self.num_hidden):
      x = jax.nn.relu(scale_units(getattr(self, f"dense_{i}")(x), units, i))
      x = dropout(x, self.dropout_rates[i], rng, i)
    return self.head(x)

  def layer_specs(self) -> tuple[LayerSpec, ...]:
    specs = [LayerSpec(f"dense_{i}", i - 1 if i else None, i)
             for i in range(self.num_hidden)]
    last = self.num_hidden - 1 if self.num_hidden else None
    return (*specs, LayerSpec("head", last, None))


class CNN(nnx.Module):
  """`conv_i` (3x3 same) + ReLU + 2x2 max-pool per channel width, dropout,
  `dense_0` + ReLU, dropout, `head`."""

  def __init__(self, input_shape: Sequence[int], channels: Sequence[int],
               dense: int, num_classes: int, *, dropout: float = 0.0,
               conv_impl: str = "auto", rngs: nnx.Rngs):
    self.conv_impl = resolve_conv_impl(conv_impl)
    height, width, in_channels = input_shape
    self.num_conv = len(channels)
    chans = [in_channels, *channels]
    self.positions = []
    for i in range(len(channels)):
      setattr(self, f"conv_{i}", nnx.Conv(chans[i], chans[i + 1], (3, 3),
                                          padding="SAME", rngs=rngs))
      self.positions.append(height * width)
      height, width = max(height // 2, 1), max(width // 2, 1)
    self.spatial = height * width
    self.dense_0 = nnx.Linear(self.spatial * chans[-1], dense, rngs=rngs)
    self.head = nnx.Linear(dense, num_classes, rngs=rngs)
    # Sites: after the convolutions, after dense_0 (as in simple_cnn).
    self.dropout_rates = (float(dropout),) * 2

  def __call__(self, x: jax.Array, rng: jax.Array | None = None,
               units: Sequence[jax.Array] | None = None) -> jax.Array:
    for i in range(self.num_conv):
      x = jax.nn.relu(conv2d(getattr(self, f"conv_{i}"), x, self.conv_impl,
                             unit_scale(units, i)))
      if x.shape[1] > 1 and x.shape[2] > 1:
        x = max_pool_2x2(x, self.conv_impl)
    x = dropout(x, self.dropout_rates[0], rng, 0)
    x = x.reshape(x.shape[0], -1)
    x = jax.nn.relu(scale_units(self.dense_0(x), units, self.num_conv))
    x = dropout(x, self.dropout_rates[1], rng, 1)
    return self.head(x)

  def layer_specs(self) -> tuple[LayerSpec, ...]:
    specs = [LayerSpec(f"conv_{i}", i - 1 if i else None, i,
                       positions=self.positions[i])
             for i in range(self.num_conv)]
    n = self.num_conv
    return (*specs, LayerSpec("dense_0", n - 1, n, in_repeat=self.spatial),
            LayerSpec("head", n, None))


class SimpleCNN(nnx.Module):
  """pfl-research's CIFAR-10 `simple_cnn`.

  conv 32 (3x3 valid) + ReLU, conv 64 (3x3 valid) + ReLU, 2x2 max-pool,
  dropout 0.25, flatten (12,544 features for 32x32x3), dense 128 + ReLU,
  dropout 0.5, dense `num_classes`; Glorot-uniform kernels, zero biases.
  """

  CONV = (32, 64)
  DENSE = 128
  DROPOUT = (0.25, 0.5)

  def __init__(self, input_shape: Sequence[int], num_classes: int, *,
               dropout: float | None = None, conv_impl: str = "auto",
               rngs: nnx.Rngs):
    self.conv_impl = resolve_conv_impl(conv_impl)
    height, width, in_channels = input_shape
    if min(height, width) < 6:
      raise ValueError(f"simple_cnn needs inputs of at least 6x6, not "
                       f"{height}x{width}")
    init = nnx.initializers.glorot_uniform()
    c0, c1 = self.CONV
    self.conv_0 = nnx.Conv(in_channels, c0, (3, 3), padding="VALID",
                           kernel_init=init, rngs=rngs)
    self.conv_1 = nnx.Conv(c0, c1, (3, 3), padding="VALID", kernel_init=init,
                           rngs=rngs)
    self.positions = ((height - 2) * (width - 2), (height - 4) * (width - 4))
    self.spatial = ((height - 4) // 2) * ((width - 4) // 2)
    self.dense_0 = nnx.Linear(self.spatial * c1, self.DENSE, kernel_init=init,
                              rngs=rngs)
    self.head = nnx.Linear(self.DENSE, num_classes, kernel_init=init,
                           rngs=rngs)
    self.dropout_rates = (self.DROPOUT if dropout is None else
                          (float(dropout),) * 2)

  def __call__(self, x: jax.Array, rng: jax.Array | None = None,
               units: Sequence[jax.Array] | None = None) -> jax.Array:
    x = jax.nn.relu(conv2d(self.conv_0, x, self.conv_impl,
                           unit_scale(units, 0)))
    x = jax.nn.relu(conv2d(self.conv_1, x, self.conv_impl,
                           unit_scale(units, 1)))
    x = max_pool_2x2(x, self.conv_impl)
    x = dropout(x, self.dropout_rates[0], rng, 0)
    x = x.reshape(x.shape[0], -1)
    x = jax.nn.relu(scale_units(self.dense_0(x), units, 2))
    x = dropout(x, self.dropout_rates[1], rng, 1)
    return self.head(x)

  def layer_specs(self) -> tuple[LayerSpec, ...]:
    return (LayerSpec("conv_0", None, 0, positions=self.positions[0]),
            LayerSpec("conv_1", 0, 1, positions=self.positions[1]),
            LayerSpec("dense_0", 1, 2, in_repeat=self.spatial),
            LayerSpec("head", 2, None))


def _as_model_def(module: nnx.Module, group_sizes: Sequence[int]) -> ModelDef:
  graphdef, state = nnx.split(module)
  init_params = nnx.to_pure_dict(state)

  def apply(params: Params, x: jax.Array, rng: jax.Array | None = None,
            units: Sequence[jax.Array] | None = None) -> jax.Array:
    merged = jax.tree.map(lambda a: a, state)
    nnx.replace_by_pure_dict(merged, params)
    return nnx.merge(graphdef, merged)(x, rng, units)

  return ModelDef(apply=apply, init_params=init_params,
                  layers=module.layer_specs(), group_sizes=tuple(group_sizes),
                  dropout=tuple(module.dropout_rates))


def build_model(name: str, input_shape: Sequence[int], num_classes: int, *,
                seed: int, hidden: Sequence[int] = (256, 256),
                cnn_channels: Sequence[int] = (32, 64),
                cnn_dense: int = 128, dropout: float | None = None,
                conv_impl: str = "auto") -> ModelDef:
  """Builds `mlp`, `cnn` or `simple_cnn` for inputs `[*input_shape]`.

  Args:
    name: the model.
    input_shape: one example's shape, e.g. `(8, 8, 1)`.
    num_classes: the logits.
    seed: the initialisation seed.
    hidden: `mlp`'s hidden widths.
    cnn_channels, cnn_dense: `cnn`'s conv channels and dense width.
    dropout: the rate at every dropout site; None is the model's default (0
      for `mlp` and `cnn`, pfl-research's 0.25 and 0.5 for `simple_cnn`).
    conv_impl: how convolutions run (CONV_IMPLS; the same function).
  """
  rngs = nnx.Rngs(params=seed)
  if name == "mlp":
    module = MLP(math.prod(input_shape), hidden, num_classes,
                 dropout=dropout or 0.0, rngs=rngs)
    return _as_model_def(module, hidden)
  if name == "cnn":
    module = CNN(input_shape, cnn_channels, cnn_dense, num_classes,
                 dropout=dropout or 0.0, conv_impl=conv_impl, rngs=rngs)
    return _as_model_def(module, (*cnn_channels, cnn_dense))
  if name == "simple_cnn":
    module = SimpleCNN(input_shape, num_classes, dropout=dropout,
                       conv_impl=conv_impl, rngs=rngs)
    return _as_model_def(module, (*SimpleCNN.CONV, SimpleCNN.DENSE))
  raise ValueError(f"unknown model {name!r}")


def num_params(params: Params) -> int:
  return sum(int(jnp.size(a)) for a in jax.tree.leaves(params))
