"""Width masks: the masked full-size model equals the sliced sub-model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_tl.policies import capacity
from fedjax_tl.models import build_model


@pytest.mark.parametrize("fraction,size,expected", [
    (1.0, 256, 256), (0.5, 256, 128), (0.125, 256, 32), (0.3, 10, 3),
    (0.01, 10, 1), (1 / 3, 9, 3), (0.34, 9, 4)])
def test_kept_units_is_ceil(fraction, size, expected):
  assert int(capacity.kept_units(jnp.float32(fraction), size)) == expected


def test_first_k_mask_by_hand():
  model = build_model("mlp", (3,), 2, seed=0, hidden=(4, 2))
  masks = capacity.width_masks(jnp.float32(0.5), model.layers, model.init_params)
  np.testing.assert_array_equal(masks["dense_0"]["kernel"],
                                [[1, 1, 0, 0]] * 3)
  np.testing.assert_array_equal(masks["dense_0"]["bias"], [1, 1, 0, 0])
  np.testing.assert_array_equal(masks["dense_1"]["kernel"],
                                [[1, 0], [1, 0], [0, 0], [0, 0]])
  np.testing.assert_array_equal(masks["head"]["kernel"], [[1, 1], [0, 0]])
  np.testing.assert_array_equal(masks["head"]["bias"], [1, 1])


def _slice(params, keep_in, keep_out):
  """Slices one layer's kernel/bias to the kept input/output units."""
  kernel = params["kernel"][..., keep_in, :][..., keep_out]
  return {"kernel": kernel, "bias": params["bias"][keep_out]}


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.25, 0.125, 0.3])
def test_masked_mlp_equals_sliced_submodel(fraction):
  hidden = (32, 16)
  full = build_model("mlp", (8, 8, 1), 10, seed=1, hidden=hidden)
  k = [int(np.ceil(fraction * h - 1e-4)) for h in hidden]
  small = build_model("mlp", (8, 8, 1), 10, seed=2, hidden=tuple(k))
  p = full.init_params
  sliced = {
      "dense_0": _slice(p["dense_0"], slice(None), slice(0, k[0])),
      "dense_1": _slice(p["dense_1"], slice(0, k[0]), slice(0, k[1])),
      "head": _slice(p["head"], slice(0, k[1]), slice(None)),
  }
  x = jax.random.normal(jax.random.key(0), (5, 8, 8, 1))
  masks = capacity.width_masks(jnp.float32(fraction), full.layers, p)
  masked_out = jax.jit(full.apply)(jax.tree.map(jnp.multiply, p, masks), x)
  np.testing.assert_allclose(masked_out, jax.jit(small.apply)(sliced, x), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("fraction", [0.5, 0.25])
def test_masked_cnn_equals_sliced_submodel(fraction):
  channels, dense = (8, 16), 12
  full = build_model("cnn", (8, 8, 1), 10, seed=1, cnn_channels=channels,
                     cnn_dense=dense)
  k0, k1, kd = (int(np.ceil(fraction * c)) for c in (*channels, dense))
  small = build_model("cnn", (8, 8, 1), 10, seed=2, cnn_channels=(k0, k1),
                      cnn_dense=kd)
  p = full.init_params
  # dense_0 reads a [2, 2, 16] flatten: channel c of position s is s*16 + c.
  flat_keep = np.concatenate([s * channels[1] + np.arange(k1)
                              for s in range(4)])
  sliced = {
      "conv_0": _slice(p["conv_0"], slice(None), slice(0, k0)),
      "conv_1": _slice(p["conv_1"], slice(0, k0), slice(0, k1)),
      "dense_0": _slice(p["dense_0"], flat_keep, slice(0, kd)),
      "head": _slice(p["head"], slice(0, kd), slice(None)),
  }
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
  masks = capacity.width_masks(jnp.float32(fraction), full.layers, p)
  masked_out = jax.jit(full.apply)(jax.tree.map(jnp.multiply, p, masks), x)
  np.testing.assert_allclose(masked_out, jax.jit(small.apply)(sliced, x), rtol=1e-4,
                             atol=1e-5)
