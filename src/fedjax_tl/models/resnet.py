"""Residual networks: HeteroFL's pre-activation ResNet-18.

`preresnet18` is the model HeteroFL (Diao et al., ICLR 2021) trains on
CIFAR-10, as its authors' code builds it: a 3x3 stem convolution, four
stages of pre-activation basic blocks (norm, ReLU, 3x3 conv, norm, ReLU, 3x3
conv, plus the input or a 1x1 projection of the first activation) with
`(1, 1, 1, 2)` blocks of widths 64-128-256-512 (the layout that gives the
parameter counts of the authors' table: 9.6M at full width, 2.4M, 604K,
152K and 38K at widths 1/2 to 1/16), strides 1-2-2-2, a final norm and ReLU,
global average pooling and a linear classifier. Convolutions have no bias;
norms default to static batch norm (sBN, `norms.batch_norm`).

Width groups: `stage_i`, the residual stream of stage i (written by the
stem or the stage's second convolutions and projections, read by the next
block's norm, convolutions and projection), and `<block>_mid`, the channels
between a block's two convolutions. HeteroFL's scaler divides every
convolution's outputs in training, which every norm then absorbs: so the
deployed sub-model runs without it, as the authors' scaler is the identity
at evaluation.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_tl.models import axes
from fedjax_tl.models.base import ModelDef, Options, from_module
from fedjax_tl.models.layers import conv2d, resolve_conv_impl, unit_scale
from fedjax_tl.models.norms import Norm

PAD1 = ((1, 1), (1, 1))  # PyTorch's padding=1


class PreResNet(nnx.Module):
  """A pre-activation ResNet of basic blocks for small images."""

  masks_activations = True  # __call__ applies `units`

  def __init__(self, input_shape: Sequence[int], num_classes: int, *,
               widths: Sequence[int] = (64, 128, 256, 512),
               blocks: Sequence[int] = (1, 1, 1, 2), norm: str = "batch",
               groups: int = 1, conv_impl: str = "auto", rngs: nnx.Rngs):
    if len(widths) != len(blocks):
      raise ValueError(f"{len(widths)} stage widths for {len(blocks)} "
                       f"stages")
    self.conv_impl = resolve_conv_impl(conv_impl)
    height, width, channels = input_shape
    init = nnx.initializers.kaiming_normal()
    self.static_batch_norm = norm == "batch"

    def conv(name, cin, cout, size, stride):
      setattr(self, name, nnx.Conv(
          cin, cout, (size, size), strides=stride,
          padding=PAD1 if size == 3 else "VALID", use_bias=False,
          kernel_init=init, rngs=rngs))

    def norm_layer(name, features):
      setattr(self, name, Norm(features, kind=norm, groups=groups))

    conv("stem", channels, widths[0], 3, 1)
    self.plan = []  # (name, stride, has projection, stream in, stream out)
    self.layout = [axes.conv("stem", None, "stage_0", height * width,
                             bias=False)]
    stream, cin = "stage_0", widths[0]
    for s, (planes, count) in enumerate(zip(widths, blocks)):
      for b in range(count):
        stride = 1 if s == 0 or b > 0 else 2
        height, width = -(-height // stride), -(-width // stride)
        name, out = f"s{s}b{b}", f"stage_{s}"
        project = stride != 1 or cin != planes
        norm_layer(f"{name}_n1", cin)
        conv(f"{name}_conv1", cin, planes, 3, stride)
        norm_layer(f"{name}_n2", planes)
        conv(f"{name}_conv2", planes, planes, 3, 1)
        positions = height * width
        in_positions = positions * stride * stride
        mid = f"{name}_mid"
        self.layout += [
            axes.norm(f"{name}_n1", stream, in_positions),
            axes.conv(f"{name}_conv1", stream, mid, positions, bias=False),
            axes.norm(f"{name}_n2", mid, positions),
            axes.conv(f"{name}_conv2", mid, out, positions, bias=False)]
        if project:
          conv(f"{name}_project", cin, planes, 1, stride)
          self.layout.append(axes.conv(f"{name}_project", stream, out,
                                       positions, bias=False))
        self.plan.append((name, project, stream, out))
        stream, cin = out, planes
    norm_layer("final_norm", cin)
    self.head = nnx.Linear(cin, num_classes, rngs=rngs)
    self.layout += [axes.norm("final_norm", stream, height * width),
                    axes.dense("head", stream, None)]
    self.stream = stream

  def __call__(self, x: jax.Array, rng: jax.Array | None = None,
               units: Mapping[str, jax.Array] | None = None, *,
               stats: Mapping[str, tuple[jax.Array, jax.Array]] | None = None,
               collect: bool = False):
    """Logits; with `collect`, `(logits, {norm: batch statistics})`; with
    `stats`, the batch norms use them instead of the batch's."""
    del rng  # no dropout
    found = {}

    def conv(name, h, group):
      return conv2d(getattr(self, name), h, self.conv_impl,
                    unit_scale(units, group))

    def norm(name, h, group):
      out, batch = getattr(self, name)(h, unit_scale(units, group),
                                       None if stats is None else stats[name])
      found[name] = batch
      return jax.nn.relu(out)

    x = conv("stem", x, "stage_0")
    for name, project, stream, out in self.plan:
      h = norm(f"{name}_n1", x, stream)
      shortcut = conv(f"{name}_project", h, out) if project else x
      h = norm(f"{name}_n2", conv(f"{name}_conv1", h, f"{name}_mid"),
               f"{name}_mid")
      x = conv(f"{name}_conv2", h, out) + shortcut
    x = norm("final_norm", x, self.stream).mean(axis=(1, 2))
    logits = self.head(x)
    return (logits, found) if collect else logits

  def axes(self) -> tuple[axes.Layer, ...]:
    return tuple(self.layout)


def preresnet18(input_shape: Sequence[int], num_classes: int, seed: int,
                options: Options) -> ModelDef:
  """HeteroFL's pre-activation ResNet-18 (`options.resnet_widths`), with
  sBN (`norm="batch"`), LayerNorm or GroupNorm (`norm_groups` groups)."""
  norm, groups = {"batch": ("batch", 1), "layer": ("group", 1),
                  "group": ("group", options.norm_groups)}[options.norm]
  return from_module(PreResNet(input_shape, num_classes,
                               widths=options.resnet_widths, norm=norm,
                               groups=groups, conv_impl=options.conv_impl,
                               rngs=nnx.Rngs(params=seed)))
