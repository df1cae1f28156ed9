"""Residual networks: HeteroFL's pre-activation ResNet-18 and the standard
ResNet-18.

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

`resnet18` is the standard ResNet-18 for small images that FjORD's and
FedRolex's setups train (post-activation blocks `(2, 2, 2, 2)`, 11.2M
parameters at 32x32x3 and 10 classes), with GroupNorm by default.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
from flax import nnx

from fedjax_tl.models import axes
from fedjax_tl.models.base import ExitPoint, ModelDef, Options, from_module
from fedjax_tl.models.layers import (conv2d, fan_in_init, resolve_conv_impl,
                                     unit_scale)
from fedjax_tl.models.norms import Norm

PAD1 = ((1, 1), (1, 1))  # PyTorch's padding=1


class ConvBase(nnx.Module):
  """What the ResNets and MobileNetV2 share: a stem, bias-free convolutions
  and norms that declare their named axes as they are made, pooling and a
  linear head, all run under the client's `units`. A subclass builds its
  blocks in `__init__` and runs them in `_features`, appending to `taps`
  (when given) the features at its `exit_points()`."""

  masks_activations = True  # __call__ applies `units`

  def __init__(self, input_shape: Sequence[int], *, stem: int,
               stem_group: str, norm: str, groups: int, conv_impl: str,
               rngs: nnx.Rngs):
    self.conv_impl = resolve_conv_impl(conv_impl)
    self.height, self.width, channels = input_shape
    self.norm_kind, self.groups = norm, groups
    self._make_conv = lambda *args, **kw: nnx.Conv(*args, **kw, rngs=rngs)
    self._make_linear = lambda *args: nnx.Linear(*args, rngs=rngs)
    self.static_batch_norm = norm == "batch"
    self.layout = []
    self.taps: list[ExitPoint] = []  # early exits' features (models.exits)
    self._add_conv("stem", channels, stem, 3, 1, None, stem_group)

  def _add_conv(self, name, cin, cout, size, stride, inputs, outputs):
    """A `size`x`size` convolution at the current resolution (PyTorch's
    padding 1 for 3x3); `stride` 2 halves the resolution first."""
    setattr(self, name, self._make_conv(
        cin, cout, (size, size), strides=stride,
        padding=PAD1 if size == 3 else "VALID", use_bias=False,
        kernel_init=fan_in_init(nnx.initializers.kaiming_normal())))
    self.layout.append(axes.conv(name, inputs, outputs, self.positions,
                                 bias=False))

  def _add_norm(self, name, features, group, positions=None):
    setattr(self, name, Norm(features, kind=self.norm_kind,
                             groups=self.groups))
    self.layout.append(axes.norm(name, group, positions or self.positions))

  def _add_head(self, features: int, num_classes: int, group: str) -> None:
    self.head = self._make_linear(features, num_classes)
    self.layout.append(axes.dense("head", group, None))

  @property
  def positions(self) -> int:
    return self.height * self.width

  def _downsample(self, stride: int) -> None:
    self.height = -(-self.height // stride)
    self.width = -(-self.width // stride)

  def __call__(self, x: jax.Array, rng: jax.Array | None = None,
               units: Mapping[str, jax.Array] | None = None, *,
               stats: Mapping[str, tuple[jax.Array, jax.Array]] | None = None,
               collect: bool = False, features: bool = False):
    """Logits; with `collect`, `(logits, {norm: batch statistics})`; with
    `features`, `(logits, [features at each exit point])`; with `stats`,
    the batch norms use them instead of the batch's."""
    del rng  # no dropout
    found = {}

    def conv(name, h, group):
      return conv2d(getattr(self, name), h, self.conv_impl,
                    unit_scale(units, group))

    def norm(name, h, group):
      out, batch = getattr(self, name)(h, unit_scale(units, group),
                                       None if stats is None else stats[name])
      found[name] = batch
      return out

    taps = [] if features else None
    logits = self.head(self._features(x, conv, norm, units, taps).mean(
        axis=(1, 2)))
    if features:
      return logits, taps
    return (logits, found) if collect else logits

  def axes(self) -> tuple[axes.Layer, ...]:
    return tuple(self.layout)

  def exit_points(self) -> tuple[ExitPoint, ...]:
    return tuple(self.taps)

  def _tap_stage(self, s: int, b: int, blocks: Sequence[int], group: str,
                 channels: int) -> bool:
    """Records an exit point after the block just built if it ends a stage
    other than the last (DepthFL's classifiers after stages 1-3); returns
    whether it does."""
    if b != blocks[s] - 1 or s == len(blocks) - 1:
      return False
    self.taps.append(ExitPoint(self.layout[-1].name, group, channels))
    return True


def _stages(widths: Sequence[int], blocks: Sequence[int]):
  """`(stage, block, stride, planes)` of a ResNet's blocks: stride 2 where
  a stage after the first begins."""
  if len(widths) != len(blocks):
    raise ValueError(f"{len(widths)} stage widths for {len(blocks)} stages")
  for s, (planes, count) in enumerate(zip(widths, blocks)):
    for b in range(count):
      yield s, b, 1 if s == 0 or b > 0 else 2, planes


class PreResNet(ConvBase):
  """A pre-activation ResNet of basic blocks for small images (HeteroFL's)."""

  def __init__(self, input_shape: Sequence[int], num_classes: int, *,
               widths: Sequence[int] = (64, 128, 256, 512),
               blocks: Sequence[int] = (1, 1, 1, 2), norm: str = "batch",
               groups: int = 1, conv_impl: str = "auto", rngs: nnx.Rngs):
    super().__init__(input_shape, stem=widths[0], stem_group="stage_0",
                     norm=norm, groups=groups, conv_impl=conv_impl,
                     rngs=rngs)
    self.plan = []  # (block, has projection, stream in, stream out, tap)
    stream, cin = "stage_0", widths[0]
    for s, b, stride, planes in _stages(widths, blocks):
      name, out, mid = f"s{s}b{b}", f"stage_{s}", f"s{s}b{b}_mid"
      project = stride != 1 or cin != planes
      self._add_norm(f"{name}_n1", cin, stream)  # before the stride
      self._downsample(stride)
      self._add_conv(f"{name}_conv1", cin, planes, 3, stride, stream, mid)
      self._add_norm(f"{name}_n2", planes, mid)
      self._add_conv(f"{name}_conv2", planes, planes, 3, 1, mid, out)
      if project:
        self._add_conv(f"{name}_project", cin, planes, 1, stride, stream,
                       out)
      self.plan.append((name, project, stream, out,
                        self._tap_stage(s, b, blocks, out, planes)))
      stream, cin = out, planes
    self._add_norm("final_norm", cin, stream)
    self._add_head(cin, num_classes, stream)
    self.stream = stream

  def _features(self, x, conv, norm, units, taps=None):
    del units
    relu_norm = lambda name, h, group: jax.nn.relu(norm(name, h, group))
    x = conv("stem", x, "stage_0")
    for name, project, stream, out, tap in self.plan:
      h = relu_norm(f"{name}_n1", x, stream)
      shortcut = conv(f"{name}_project", h, out) if project else x
      h = relu_norm(f"{name}_n2", conv(f"{name}_conv1", h, f"{name}_mid"),
                    f"{name}_mid")
      x = conv(f"{name}_conv2", h, out) + shortcut
      if tap and taps is not None:  # the stream, activated
        taps.append(jax.nn.relu(x))
    return relu_norm("final_norm", x, self.stream)


class ResNet(ConvBase):
  """The standard ResNet-18 for small images (the FjORD and FedRolex
  setups): a 3x3 stem convolution, norm and ReLU, then post-activation
  basic blocks (conv, norm, ReLU, conv, norm, plus the input or a 1x1
  projection and its norm, then ReLU) in the layout `(2, 2, 2, 2)` with
  widths 64-128-256-512 and strides 1-2-2-2, global average pooling and a
  linear head; GroupNorm by default."""

  def __init__(self, input_shape: Sequence[int], num_classes: int, *,
               widths: Sequence[int] = (64, 128, 256, 512),
               blocks: Sequence[int] = (2, 2, 2, 2), norm: str = "group",
               groups: int = 4, conv_impl: str = "auto", rngs: nnx.Rngs):
    super().__init__(input_shape, stem=widths[0], stem_group="stage_0",
                     norm=norm, groups=groups, conv_impl=conv_impl,
                     rngs=rngs)
    self._add_norm("stem_norm", widths[0], "stage_0")
    self.plan = []
    stream, cin = "stage_0", widths[0]
    for s, b, stride, planes in _stages(widths, blocks):
      name, out, mid = f"s{s}b{b}", f"stage_{s}", f"s{s}b{b}_mid"
      project = stride != 1 or cin != planes
      self._downsample(stride)
      self._add_conv(f"{name}_conv1", cin, planes, 3, stride, stream, mid)
      self._add_norm(f"{name}_n1", planes, mid)
      self._add_conv(f"{name}_conv2", planes, planes, 3, 1, mid, out)
      self._add_norm(f"{name}_n2", planes, out)
      if project:
        self._add_conv(f"{name}_project", cin, planes, 1, stride, stream,
                       out)
        self._add_norm(f"{name}_project_norm", planes, out)
      self.plan.append((name, project, stream, out,
                        self._tap_stage(s, b, blocks, out, planes)))
      stream, cin = out, planes
    self._add_head(cin, num_classes, stream)

  def _features(self, x, conv, norm, units, taps=None):
    del units
    x = jax.nn.relu(norm("stem_norm", conv("stem", x, "stage_0"), "stage_0"))
    for name, project, stream, out, tap in self.plan:
      mid = f"{name}_mid"
      h = jax.nn.relu(norm(f"{name}_n1", conv(f"{name}_conv1", x, mid), mid))
      h = norm(f"{name}_n2", conv(f"{name}_conv2", h, out), out)
      shortcut = (norm(f"{name}_project_norm",
                       conv(f"{name}_project", x, out), out)
                  if project else x)
      x = jax.nn.relu(h + shortcut)
      if tap and taps is not None:
        taps.append(x)
    return x


def norm_setting(options: Options, default: str) -> tuple[str, int]:
  """`(Norm kind, groups)` of the config's `norm` (None: `default`)."""
  return {"batch": ("batch", 1), "layer": ("group", 1),
          "group": ("group", options.norm_groups)}[options.norm or default]


def preresnet18(input_shape: Sequence[int], num_classes: int, seed: int,
                options: Options) -> ModelDef:
  """HeteroFL's pre-activation ResNet-18 (`options.resnet_widths`), with
  sBN (`norm="batch"`), LayerNorm or GroupNorm (`norm_groups` groups)."""
  norm, groups = norm_setting(options, default="batch")
  return from_module(PreResNet(input_shape, num_classes,
                               widths=options.resnet_widths, norm=norm,
                               groups=groups, conv_impl=options.conv_impl,
                               rngs=nnx.Rngs(params=seed)))


def resnet18(input_shape: Sequence[int], num_classes: int, seed: int,
             options: Options) -> ModelDef:
  """The standard ResNet-18 (`options.resnet_widths`), GroupNorm with
  `norm_groups` groups unless `norm` says otherwise."""
  norm, groups = norm_setting(options, default="group")
  return from_module(ResNet(input_shape, num_classes,
                            widths=options.resnet_widths, norm=norm,
                            groups=groups, conv_impl=options.conv_impl,
                            rngs=nnx.Rngs(params=seed)))
