"""Normalisation under width masks and HeteroFL's pre-activation ResNet-18,
against numpy and against the sub-model built at its real size."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import (TWO_TIERS, assert_rounds_agree, small_simulation,
                      tiny_config_dict)
from fedjax_tl import api, cost, evaluation
from fedjax_tl.data.federated import Dataset
from fedjax_tl.models import axes, build_model, from_module, num_params
from fedjax_tl.models.layers import unit_scale
from fedjax_tl.models.norms import Norm, batch_norm, group_norm
from fedjax_tl.models.mobilenet import MobileNetV2
from fedjax_tl.models.resnet import PreResNet, ResNet
from fedjax_tl.policies import capacity

RNG = np.random.default_rng(0)


def np_group_norm(x, groups, axes, eps=1e-5):
  """GroupNorm in numpy: contiguous equal channel groups, per example."""
  c = x.shape[-1]
  out = np.empty_like(x)
  for g in range(groups):
    sl = slice(g * c // groups, (g + 1) * c // groups)
    part = x[..., sl]
    red = tuple(axes) + (x.ndim - 1,)
    mean = part.mean(red, keepdims=True)
    var = part.var(red, keepdims=True)
    out[..., sl] = (part - mean) / np.sqrt(var + eps)
  return out


@pytest.mark.parametrize("groups, spatial", [(1, True), (2, True), (1, False),
                                             (3, False)])
@pytest.mark.parametrize("pattern", ["first_k", "scattered"])
def test_group_norm_runs_over_the_held_channels(groups, spatial, pattern):
  shape = (3, 4, 5, 12) if spatial else (3, 7, 12)
  axes_ = (1, 2) if spatial else ()
  x = RNG.normal(size=shape).astype(np.float32)
  held = np.zeros(12, np.float32)
  idx = np.arange(6) if pattern == "first_k" else np.array([0, 2, 3, 7, 9, 11])
  held[idx] = 1
  got = np.asarray(group_norm(jnp.asarray(x * held), jnp.asarray(held),
                              groups=groups, axes=axes_))
  expected = np.zeros_like(x)
  expected[..., idx] = np_group_norm(x[..., idx], groups, axes_)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_batch_norm_by_hand_and_given_statistics():
  x = RNG.normal(size=(6, 3, 3, 4)).astype(np.float32)
  held = np.array([1, 1, 0, 1], np.float32)
  y, (mean, var) = batch_norm(jnp.asarray(x), jnp.asarray(held))
  m = x.mean((0, 1, 2))
  v = x.var((0, 1, 2))
  np.testing.assert_allclose(y, (x - m) / np.sqrt(v + 1e-5) * held,
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(mean, m, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var, x.var((0, 1, 2), ddof=1), rtol=1e-4)
  stats = (jnp.full(4, 0.5), jnp.full(4, 4.0))
  y, _ = batch_norm(jnp.asarray(x), None, stats)
  np.testing.assert_allclose(y, (x - 0.5) / np.sqrt(4 + 1e-5), rtol=1e-5,
                             atol=1e-6)


# -- HeteroFL's pre-activation ResNet-18 --------------------------------------

def _closed_form(widths, in_channels=3, classes=10, blocks=(1, 1, 1, 2)):
  """Parameters of the pre-activation ResNet, counted by hand: bias-free
  3x3 convolutions, a 1x1 projection where a stage begins, two per-channel
  parameters (scale, bias) per norm, a linear head."""
  total = 9 * in_channels * widths[0]
  cin = widths[0]
  for s, (planes, count) in enumerate(zip(widths, blocks)):
    for b in range(count):
      total += 2 * cin + 9 * cin * planes + 2 * planes + 9 * planes * planes
      if cin != planes or (s > 0 and b == 0):
        total += cin * planes
      cin = planes
  return total + 2 * cin + cin * classes + classes


@pytest.fixture(scope="module")
def preresnet18():
  """The full-size model, built once: its 9.6M parameters' initialisation
  dominates the tests that only read it."""
  return build_model("preresnet18", (32, 32, 3), 10, seed=0)


def test_preresnet18_parameter_counts_equal_the_authors_table(preresnet18):
  model = preresnet18
  table = {1.0: 9.6e6, 0.5: 2.4e6, 0.25: 604e3, 0.125: 152e3, 0.0625: 38e3}
  for width, published in table.items():
    kept = {g: math.ceil(width * size) for g, size in model.groups.items()}
    # Shapes only: slicing 60 arrays eagerly compiles a program for each.
    sub = jax.eval_shape(lambda p: axes.first_k(p, model.layers, kept),
                         model.init_params)
    count = sum(math.prod(a.shape) for a in jax.tree.leaves(sub))
    hidden = [math.ceil(width * h) for h in (64, 128, 256, 512)]
    assert count == _closed_form(hidden)
    # The table's rounding: 9.6M, 2.4M, 604K, 152K, 38K.
    digits = 1 if published >= 1e6 else 0
    scale = 1e6 if published >= 1e6 else 1e3
    assert round(count / scale, digits) == round(published / scale, digits)


def test_preresnet18_flops_at_full_width(preresnet18):
  model = preresnet18
  positions = cost.conv_positions((32, 32, 3), model.layers,
                                  model.init_params)
  flops = float(cost.forward_flops(model.layers, model.init_params, None,
                                   positions))
  # Multiply-adds by hand: stem, stage 1 at 32x32, then stages at 16, 8, 4.
  macs = (27 * 64 * 1024 + 2 * 9 * 64 * 64 * 1024 +
          sum(9 * c * 2 * c * p + 9 * 4 * c * c * p + 2 * c * c * p
              for c, p in ((64, 256), (128, 64), (256, 16))) +
          2 * 9 * 512 * 512 * 16 + 512 * 10)
  assert flops == 2 * macs
  assert abs(macs / 1e6 - 330.2) < 2  # the authors' table counts MACs


def _small(widths, norm="batch", groups=1, seed=0, cls=PreResNet):
  """An identity residual add in stage 0, a strided projection in stage 1:
  every kind of block, half what XLA compiles for four stages (for
  MobileNetV2: stem, two stages of (expansion 1, 2) and the last conv)."""
  if cls is MobileNetV2:
    stem, c0, c1, last = widths
    return from_module(MobileNetV2(
        (8, 8, 3), 5, blocks=((1, c0, 1, 1), (2, c1, 2, 2)), stem=stem,
        last=last, norm=norm, groups=groups, rngs=nnx.Rngs(params=seed)))
  return from_module(cls((8, 8, 3), 5, widths=widths, blocks=(1,) * len(widths),
                         norm=norm, groups=groups,
                         rngs=nnx.Rngs(params=seed)))


def test_resnet18_parameter_count_by_hand():
  model = build_model("resnet18", (32, 32, 3), 10, seed=0)
  # Stem conv + norm; per block two 3x3 convs and norms, a 1x1 projection
  # and its norm where a stage begins; the head.
  total, cin = 27 * 64 + 128, 64
  for planes in (64, 128, 256, 512):
    for b in range(2):
      total += 9 * cin * planes + 9 * planes * planes + 4 * planes
      if cin != planes:
        total += cin * planes + 2 * planes
      cin = planes
  assert num_params(model.init_params) == total + 512 * 10 + 10 == 11_173_962


def test_mobilenetv2_parameter_count_by_hand():
  model = build_model("mobilenetv2", (32, 32, 3), 10, seed=0)
  # Every conv is bias-free and followed by a norm (2 per channel).
  total, cin = 27 * 32 + 64, 32
  for t, c, n, _ in ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2),
                     (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                     (6, 320, 1, 1)):
    for _ in range(n):
      hidden = cin * t
      if t != 1:
        total += cin * hidden + 2 * hidden
      total += 9 * hidden + 2 * hidden + hidden * c + 2 * c
      cin = c
  total += cin * 1280 + 2 * 1280 + 1280 * 10 + 10
  assert num_params(model.init_params) == total == 2_236_682


# Each norm kind on each model, a width whose sub-model is the whole model,
# and the narrowest widths (1-2 channels) where slicing and grouping bite:
# a middle width of a kind already run sliced adds no code path.
@pytest.mark.parametrize("cls, norm, groups, width", [
    (PreResNet, "batch", 1, 1.0), (PreResNet, "batch", 1, 0.125),
    (PreResNet, "group", 1, 0.25), (PreResNet, "group", 2, 0.125),
    (ResNet, "group", 2, 0.5), (ResNet, "batch", 1, 0.25),
    (MobileNetV2, "batch", 1, 0.5), (MobileNetV2, "group", 1, 0.25)])
def test_masked_resnet_equals_the_sub_model(cls, norm, groups, width):
  widths = (8, 16, 16, 16) if cls is MobileNetV2 else (8, 16)
  full = _small(widths, norm, groups, cls=cls)
  kept_widths = tuple(math.ceil(width * w) for w in widths)
  small = _small(kept_widths, norm, groups, seed=1, cls=cls)
  kept = {g: math.ceil(width * size) for g, size in full.groups.items()}
  params = full.init_params
  sub = axes.first_k(params, full.layers, kept)
  x = jnp.asarray(RNG.normal(size=(4, 8, 8, 3)).astype(np.float32))
  y = jnp.asarray([0, 1, 2, 3])
  units = capacity.first_k_units(jnp.float32(width), full.groups)

  def loss(p, model, units, x, y):
    logits = model.apply(p, x, units=units)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y])

  # The data are arguments, not constants: the full model's programs are
  # then the same at every width, compiled once (the compilation cache).
  forward = jax.jit(lambda p, u, x: full.apply(p, x, units=u))
  np.testing.assert_allclose(forward(params, units, x),
                             jax.jit(small.apply)(sub, x), rtol=2e-4,
                             atol=2e-5)
  grad = jax.jit(jax.grad(loss), static_argnums=1)
  grads = grad(params, full, units, x, y)
  small_grads = grad(sub, small, None, x, y)
  for a, b in zip(jax.tree.leaves(axes.first_k(grads, full.layers, kept)),
                  jax.tree.leaves(small_grads)):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5)
  # Off the held units the gradient is exactly zero.
  masks = capacity.masks_from_units(units, full.layers, params)
  for g, m in zip(jax.tree.leaves(grads), jax.tree.leaves(masks)):
    assert not np.any(np.asarray(g)[np.asarray(m) == 0])


class TinyBN(nnx.Module):
  """dense 4 -> 6, static batch norm, ReLU, dense 6 -> 3."""
  masks_activations = True
  static_batch_norm = True

  def __init__(self, seed=0):
    rngs = nnx.Rngs(params=seed)
    self.dense = nnx.Linear(4, 6, rngs=rngs)
    self.norm = Norm(6, kind="batch", axes=())
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x, rng=None, units=None, *, stats=None, collect=False):
    h = self.dense(x) * (1 if units is None else units["h"])
    h, batch = self.norm(h, unit_scale(units, "h"),
                         None if stats is None else stats["norm"])
    logits = self.head(jax.nn.relu(h))
    return (logits, {"norm": batch}) if collect else logits

  def axes(self):
    return (axes.dense("dense", None, "h"), axes.norm("norm", "h"),
            axes.dense("head", "h", None))


def test_sbn_evaluation_statistics_by_hand():
  model = from_module(TinyBN())
  p = jax.tree.map(np.asarray, model.init_params)
  train = Dataset(RNG.normal(size=(300, 4)).astype(np.float32),
                  np.zeros(300, np.int32))
  test = Dataset(RNG.normal(size=(50, 4)).astype(np.float32),
                 RNG.integers(0, 3, 50).astype(np.int32))
  evaluate = evaluation.make_evaluator(model, test, stats_data=train)
  acc, _ = evaluate(model.init_params, [1.0, 0.5])
  for width, got in zip((1.0, 0.5), acc):
    k = math.ceil(6 * width)
    # Numpy: the width's sub-model, its norm's statistics the average over
    # whole batches of 128 of the batch mean and unbiased variance.
    h = train.x[:256] @ p["dense"]["kernel"][:, :k] + p["dense"]["bias"][:k]
    batches = h.reshape(2, 128, k)
    mean = batches.mean(1).mean(0)
    var = batches.var(1, ddof=1).mean(0)
    t = test.x @ p["dense"]["kernel"][:, :k] + p["dense"]["bias"][:k]
    t = (t - mean) / np.sqrt(var + 1e-5)
    t = np.maximum(t * p["norm"]["scale"][:k] + p["norm"]["bias"][:k], 0)
    logits = t @ p["head"]["kernel"][:k] + p["head"]["bias"]
    assert got == pytest.approx(np.mean(logits.argmax(1) == test.y))


def test_static_batch_norm_without_statistics_data_is_refused():
  model = from_module(TinyBN())
  test = Dataset(np.zeros((4, 4), np.float32), np.zeros(4, np.int32))
  with pytest.raises(ValueError, match="stats_data"):
    evaluation.make_evaluator(model, test)(model.init_params, [1.0])


# Two stages (an identity block, then a strided block with its 1x1
# projection) keep every kind of block while halving what XLA compiles; two
# tiers (the full model and a 1/4 sub-model: 1 and 2 channels) keep the
# sliced norms while the tier fast path compiles the client twice, not
# three times. One case per code path: batch norm on the pre-activation
# ResNet; group norm (2 groups: 1-channel groups on the 1/4 device, the
# held-channel grouping of test_group_norm_runs_over_the_held_channels,
# where one group is the same code) on the post-activation ResNet, one
# round, since norms over a few values are ill-conditioned and amplify the
# rounding of the sliced convolutions from round to round; MobileNetV2's
# depthwise blocks on lax.conv.
@pytest.mark.parametrize("cls, norm, groups, rounds, impl", [
    (PreResNet, "batch", 1, 2, "auto"), (ResNet, "group", 2, 1, "auto"),
    # lax.conv, as on an accelerator: the sliced depthwise kernels too (the
    # im2col depthwise sub-models: test_masked_resnet_equals_the_sub_model).
    (MobileNetV2, "batch", 1, 2, "xla")])
def test_resnet_round_equals_the_tier_fast_path_and_loop(cls, norm, groups,
                                                         rounds, impl):
  model = (from_module(MobileNetV2(
      (8, 8, 1), 10, blocks=((1, 4, 1, 1), (2, 8, 2, 2)), stem=4, last=8,
      norm=norm, conv_impl=impl, rngs=nnx.Rngs(params=0)))
           if cls is MobileNetV2 else
           from_module(cls((8, 8, 1), 10, widths=(4, 8),
                           blocks=(1, 1), norm=norm, groups=groups,
                           rngs=nnx.Rngs(params=0))))
  sim = small_simulation(model_def=model, batch_size=4, policy="heterofl",
                         scaler=True, activation_masks=False,
                         tiers=TWO_TIERS)
  # Its norms need the held units, so units reach the clients anyway.
  assert sim.unit_scales(jnp.float32(0.5), jnp.int32(0),
                         jax.random.key(0)) is not None
  assert_rounds_agree(sim, rounds=rounds, atol=2e-5)


@pytest.mark.slow
def test_preresnet18_runs_end_to_end_with_its_sizes_recorded(tmp_path):
  widths = (4, 8, 8, 8)
  result = api.run(tiny_config_dict(model="preresnet18", resnet_widths=widths,
                                    num_rounds=2), tmp_path, quiet=True)
  summary = result.summary
  assert np.isfinite(summary["accuracy"])
  # Each tier's deployed sub-model: the closed form at its widths (digits:
  # 8x8x1 inputs, 10 classes).
  assert set(summary["per_tier_params"]) == {"1", "0.5", "0.25", "0.125"}
  for name, count in summary["per_tier_params"].items():
    hidden = [math.ceil(float(name) * w) for w in widths]
    assert count == _closed_form(hidden, in_channels=1)
  assert summary["num_params"] == _closed_form(widths, in_channels=1)


def test_group_norm_statistics_run_in_float32_under_bfloat16():
  # A bfloat16 count of channels stops at 256; the statistics must not.
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 512))
  exact = group_norm(x, None, groups=4, axes=(1, 2))
  low = group_norm(x.astype(jnp.bfloat16), None, groups=4, axes=(1, 2))
  assert low.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(low, np.float32), exact, atol=0.05)
