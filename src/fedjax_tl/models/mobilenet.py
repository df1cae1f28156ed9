"""A MobileNetV2 for small images: the natural model of a phone study.

Sandler et al. (CVPR 2018): a 3x3 stem convolution, then inverted residual
blocks (a 1x1 expansion by `t`, a 3x3 depthwise convolution, a linear 1x1
projection; the input added back when the block keeps its shape), a 1x1
convolution to 1280 channels, global average pooling and a linear head;
ReLU6 after every norm but the projection's. The blocks follow the paper's
table `(t, c, n, s)` with the stride of the stem and of the second stage set
to 1 for small images, as CIFAR versions of the network do.

A capacity level is the paper's width multiplier: a width-p client keeps the
first ceil(p*C) channels of every group, which is the network at multiplier p
(without the paper's rounding of channels to multiples of 8, and with the
last 1280 channels cut too, since a phone's memory bounds them as well).
Width groups: `stage_i` (the channels a stage's blocks write, residual adds
included), `<block>_expand` (a block's expanded channels, which its
depthwise convolution keeps), `stem` and `last`.
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from fedjax_tl.models import axes
from fedjax_tl.models.base import ModelDef, Options, from_module
from fedjax_tl.models.layers import depthwise_conv2d, fan_in_init, unit_scale
from fedjax_tl.models.resnet import PAD1, ConvBase, norm_setting

# The paper's (expansion t, channels c, blocks n, stride s) per stage.
BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
          (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STEM, LAST = 32, 1280


class MobileNetV2(ConvBase):
  """MobileNetV2 (see the module docstring)."""

  def __init__(self, input_shape: Sequence[int], num_classes: int, *,
               blocks: Sequence[tuple[int, int, int, int]] = BLOCKS,
               stem: int = STEM, last: int = LAST, norm: str = "batch",
               groups: int = 1, conv_impl: str = "auto", rngs: nnx.Rngs):
    super().__init__(input_shape, stem=stem, stem_group="stem", norm=norm,
                     groups=groups, conv_impl=conv_impl, rngs=rngs)
    self._add_norm("stem_norm", stem, "stem")
    self.plan = []  # (block, expands, residual, stream in, expanded, out)
    stream, cin = "stem", stem
    for s, (t, c, n, stride) in enumerate(blocks):
      for b in range(n):
        stride_b = stride if b == 0 else 1
        name, out = f"s{s}b{b}", f"stage_{s}"
        hidden, inner = cin * t, (f"s{s}b{b}_expand" if t != 1 else stream)
        if t != 1:
          self._add_conv(f"{name}_expand", cin, hidden, 1, 1, stream, inner)
          self._add_norm(f"{name}_expand_norm", hidden, inner)
        self._downsample(stride_b)
        setattr(self, f"{name}_dw", self._make_conv(
            hidden, hidden, (3, 3), strides=stride_b, padding=PAD1,
            feature_group_count=hidden, use_bias=False,
            kernel_init=fan_in_init(nnx.initializers.kaiming_normal())))
        self.layout.append(axes.conv(f"{name}_dw", None, inner,
                                     self.positions, bias=False))
        self._add_norm(f"{name}_dw_norm", hidden, inner)
        self._add_conv(f"{name}_project", hidden, c, 1, 1, inner, out)
        self._add_norm(f"{name}_project_norm", c, out)
        self.plan.append((name, t != 1, stride_b == 1 and cin == c, stream,
                          inner, out))
        stream, cin = out, c
    self._add_conv("last", cin, last, 1, 1, stream, "last")
    self._add_norm("last_norm", last, "last")
    self._add_head(last, num_classes, "last")

  def _features(self, x, conv, norm, units, taps=None):
    del taps  # no exit points
    act = lambda name, h, group: jax.nn.relu6(norm(name, h, group))
    x = act("stem_norm", conv("stem", x, "stem"), "stem")
    for name, expands, residual, stream, inner, out in self.plan:
      h = (act(f"{name}_expand_norm", conv(f"{name}_expand", x, inner), inner)
           if expands else x)
      h = depthwise_conv2d(getattr(self, f"{name}_dw"), h, self.conv_impl,
                           unit_scale(units, inner))
      h = act(f"{name}_dw_norm", h, inner)
      h = norm(f"{name}_project_norm", conv(f"{name}_project", h, out), out)
      x = x + h if residual else h
    return act("last_norm", conv("last", x, "last"), "last")


def mobilenetv2(input_shape: Sequence[int], num_classes: int, seed: int,
                options: Options) -> ModelDef:
  """MobileNetV2 at width 1 (capacity levels cut it), sBN unless `norm`
  says otherwise."""
  norm, groups = norm_setting(options, default="batch")
  return from_module(MobileNetV2(input_shape, num_classes, norm=norm,
                                 groups=groups, conv_impl=options.conv_impl,
                                 rngs=nnx.Rngs(params=seed)))
