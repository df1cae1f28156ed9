"""Building blocks the built-in models share: dropout, unit multipliers,
convolutions and pooling that run fast on every backend."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# How convolutions and max-pools run: "xla" (lax.conv, reduce_window),
# "im2col" (each kernel tap a shifted slice, one matmul; pooling by reshape)
# or "auto" (im2col on CPU, xla elsewhere). XLA:CPU runs a convolution, its
# gradients and a vmapped (per-client kernel) convolution several times to
# fifty times slower inside a loop than the same matmul (measured on 2 cores).
CONV_IMPLS = ("auto", "xla", "im2col")


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


def unit_scale(units: Mapping[str, jax.Array] | None, group: str
               ) -> jax.Array | None:
  """`units[group]`, or None without units."""
  return None if units is None else units[group]


def scale_units(z: jax.Array, units: Mapping[str, jax.Array] | None,
                group: str, per_unit: int = 1) -> jax.Array:
  """A hidden layer's outputs `z[..., units * per_unit]` times
  `units[group]`, each unit spread over `per_unit` entries (an attention
  head's features).

  With a 0/1 unit mask (times HeteroFL's scaler) this is the same forward,
  and gives every parameter the same gradient, as masking the layer's kernel
  and bias: the layer's inputs from absent units are already zero.
  """
  if units is None:
    return z
  scale = units[group].astype(z.dtype)
  return z * (jnp.repeat(scale, per_unit) if per_unit > 1 else scale)


def fan_in_init(init: nnx.Initializer) -> nnx.Initializer:
  """A fan-in initializer (lecun, kaiming/he) that samples a conv kernel
  `[*window, in, out]` as the matrix `[prod(window) * in, out]`.

  The values are the same: jax draws a shape's random bits by element
  count, and both shapes have one fan-in. XLA:CPU compiles the 2-D draw
  several times faster than the 4-D one (a model build compiles one draw
  per kernel shape). Not for fan-out or fan-avg initializers (glorot).
  """
  def draw(key, shape, dtype=jnp.float32):
    matrix = (math.prod(shape[:-1]), shape[-1])
    return init(key, matrix, dtype).reshape(shape)
  return draw


def resolve_conv_impl(impl: str) -> str:
  """`impl`, with "auto" resolved for the default backend."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {', '.join(CONV_IMPLS)}, not "
                     f"{impl!r}")
  if impl == "auto":
    return "im2col" if jax.default_backend() == "cpu" else "xla"
  return impl


def _pair(value) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


def _padding(padding, kh: int, kw: int) -> tuple[tuple[int, int], ...]:
  """`(rows, cols)` `(low, high)` padding of a stride-1-centred window:
  "SAME" (as XLA pads at stride 1), "VALID", an int, or pairs."""
  if padding == "SAME":
    return ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2)
  if padding == "VALID":
    return (0, 0), (0, 0)
  if isinstance(padding, int):
    return (padding, padding), (padding, padding)
  try:
    rows, cols = (_pair(p) for p in padding)
    return tuple(rows), tuple(cols)
  except (TypeError, ValueError):
    raise ValueError(f"im2col supports SAME, VALID, int or pair padding, "
                     f"not {padding!r}") from None


def _check_im2col(layer: nnx.Conv, grouped: bool) -> None:
  """Refuses what the im2col paths do not compute as lax.conv does: "SAME"
  padding at a stride (XLA pads by the input size), dilation, and
  channel groups other than none (conv2d) or one per channel (depthwise)."""
  strided = _pair(layer.strides) != (1, 1)
  dilated = any(_pair(d) != (1, 1) for d in (layer.input_dilation,
                                             layer.kernel_dilation))
  if (layer.padding == "SAME" and strided) or dilated or (
      not grouped and layer.feature_group_count != 1):
    raise ValueError("im2col computes stride-1 SAME, VALID or explicit "
                     "padding, without dilation or channel groups; use "
                     "conv_impl='xla' for this layer")


def conv2d(layer: nnx.Conv, x: jax.Array, impl: str,
           scale: jax.Array | None = None) -> jax.Array:
  """`layer(x) * scale`, `x[batch, H, W, C]`, `scale[out]` or None for none.

  "im2col" builds the `[batch, H', W', kh*kw*C]` patches from kh*kw shifted
  (strided) slices of `x` and multiplies them by the `[kh*kw*C, out]`
  kernel: the same sums as the convolution, in an order that may round
  differently. It applies `scale` to the kernel and bias, not to the far
  larger outputs (the same values for 0/1 scales): multiplying the outputs
  splits the gradient's col2im over two consumers, which XLA:CPU then runs
  unfused. Padding "SAME" follows XLA at stride 1; give explicit pairs
  (PyTorch's `padding=1` is `((1, 1), (1, 1))`) for strided windows.
  """
  if impl == "xla":
    out = layer(x)
    return out if scale is None else out * scale.astype(out.dtype)
  _check_im2col(layer, grouped=False)
  kernel = layer.kernel[...]
  bias = None if layer.bias is None else layer.bias[...]
  if scale is not None:
    kernel = kernel * scale
    bias = None if bias is None else bias * scale
  kh, kw, cin, cout = kernel.shape
  sh, sw = _pair(layer.strides)
  rows, cols = _padding(layer.padding, kh, kw)
  if rows != (0, 0) or cols != (0, 0):
    x = jnp.pad(x, ((0, 0), rows, cols, (0, 0)))
  n, h, w, _ = x.shape
  ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
  patches = jnp.concatenate(
      [x[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw, :]
       for i in range(kh) for j in range(kw)], axis=-1)
  out = jnp.dot(patches.reshape(n * ho * wo, kh * kw * cin),
                kernel.reshape(kh * kw * cin, cout).astype(x.dtype))
  out = out.reshape(n, ho, wo, cout)
  return out if bias is None else out + bias.astype(out.dtype)


def depthwise_conv2d(layer: nnx.Conv, x: jax.Array, impl: str,
                     scale: jax.Array | None = None) -> jax.Array:
  """A depthwise convolution (`feature_group_count` = channels, kernel
  `[h, w, 1, C]`) times `scale[C]`. "im2col" sums the kernel taps over
  shifted (strided) slices of `x`, channel by channel, scaling the kernel.
  The channel count is the kernel's, not the layer's `feature_group_count`,
  so a sub-model sliced to fewer channels (the tier fast path) runs too."""
  _check_im2col(layer, grouped=True)
  kernel = layer.kernel[...]
  if scale is not None:
    kernel = kernel * scale
  kh, kw, _, channels = kernel.shape
  sh, sw = _pair(layer.strides)
  rows, cols = _padding(layer.padding, kh, kw)
  if impl == "xla":
    out = jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), (sh, sw), (rows, cols),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=channels)
    return (out if layer.bias is None else
            out + (layer.bias[...] * (1 if scale is None else scale)
                   ).astype(out.dtype))
  x = jnp.pad(x, ((0, 0), rows, cols, (0, 0)))
  _, h, w, _ = x.shape
  ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
  out = sum(x[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw, :] *
            kernel[i, j, 0].astype(x.dtype)
            for i in range(kh) for j in range(kw))
  if layer.bias is not None:
    out = out + (layer.bias[...] * (1 if scale is None else scale)
                 ).astype(out.dtype)
  return out


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
