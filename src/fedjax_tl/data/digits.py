"""The default offline transfer task: clean digits -> per-device "styled" digits.

Built from the 8x8 handwritten digits shipped in the package (no download,
no scikit-learn; see `_base_digits`): the server's source domain is the
clean digits, and every simulated device sees the target-pool digits through
its own rotation, scale, stroke, contrast and noise.
"""

from __future__ import annotations

import importlib.resources

import numpy as np

from fedjax_tl.data.federated import Dataset, FederatedData, TransferData
from fedjax_tl.data.partition import draw_by_label, local_test_indices
from fedjax_tl.data.partition import pad_clients
from fedjax_tl.errors import ConfigError

NUM_CLASSES = 10
SIDE = 8
# Stratified shares of the 1,797 base images: source train, source test,
# target train pool, target test pool.
POOL_FRACTIONS = (0.45, 0.10, 0.30, 0.15)
# How many styled copies of each target-test base image (each copy a fresh,
# unseen device style).
TEST_COPIES = 3
# Independent random streams, derived from the user's seed.
_SPLIT_STREAM, _DEVICE_STREAM, _TEST_STREAM = 0, 1, 2
# The devices' own test examples draw from a stream of their own, so turning
# them on or off changes no other number.
_LOCAL_TEST_STREAM = 3
# Ranges of the device styles at shift=1 (see `_draw_styles`).
STYLE = dict(
    angle=25.0,  # degrees, uniform in [-angle, angle]
    scale=(0.85, 1.1),  # log-uniform zoom
    shear=0.15,
    translate=0.5,  # pixels
    p_thick=0.25,  # share of devices with thicker strokes
    p_thin=0.15,  # share of devices with thinner strokes
    stroke_mix=(0.3, 0.7),  # blend weight of the max / min filter
    gain=(0.6, 1.2),  # log-uniform contrast
    offset=(0.0, 0.2),  # background level
    p_invert=0.05,  # share of devices with inverted polarity
    noise=(0.02, 0.1),  # Gaussian noise std
)
# Images warped at once (bounds the temporary memory of the bilinear sampler).
_CHUNK = 16384


def load_digits_transfer(
    num_clients: int = 1000,
    *,
    alpha: float = 0.5,
    min_examples: int = 8,
    max_examples: int = 48,
    seed: int = 0,
    shift: float = 1.0,
    local_test_examples: int = 0,
) -> TransferData:
  """Builds the embedded digits transfer task.

  Args:
    num_clients: number of simulated devices (>= 1).
    alpha: Dirichlet concentration of each device's label mix (small: few
      classes per device; large: nearly iid).
    min_examples: the fewest examples a device holds (>= 1).
    max_examples: the most examples a device holds (>= min_examples); also the
      padded width of the client arrays.
    seed: everything is a deterministic function of this seed (>= 0).
    shift: strength of the domain shift (0 gives clean digits with only the
      per-device label mix and size varying; 1 is the default shift).
    local_test_examples: held-out examples per device (`client_test`), in the
      device's style and with its training data's label mix, drawn from the
      target test pool's base images (never trained on); 0 gives none.

  Returns:
    TransferData named "digits", inputs `[..., 8, 8, 1]` float32 in [0, 1].

  Raises:
    ConfigError: if an argument is out of range.
  """
  _check_args(num_clients, alpha, min_examples, max_examples, seed, shift,
              local_test_examples)
  images, labels = _base_digits()
  pools = _stratified_pools(labels, _rng(seed, _SPLIT_STREAM))
  src_train, src_test, tgt_train, tgt_test = pools

  clients, styles = _build_clients(
      images[tgt_train], labels[tgt_train], num_clients, alpha=alpha,
      min_examples=min_examples, max_examples=max_examples, shift=shift,
      rng=_rng(seed, _DEVICE_STREAM))
  client_test = None
  if local_test_examples:
    client_test = _build_local_test(
        images[tgt_test], labels[tgt_test], clients, styles,
        local_test_examples, shift, _rng(seed, _LOCAL_TEST_STREAM))

  return TransferData(
      name="digits",
      source_train=Dataset(x=images[src_train], y=labels[src_train]),
      source_test=Dataset(x=images[src_test], y=labels[src_test]),
      clients=clients,
      target_test=_build_target_test(images, labels, tgt_test, shift,
                                     _rng(seed, _TEST_STREAM)),
      num_classes=NUM_CLASSES,
      client_test=client_test)


def _check_args(num_clients: int, alpha: float, min_examples: int,
                max_examples: int, seed: int, shift: float,
                local_test_examples: int) -> None:
  """Raises ConfigError for the first out-of-range argument."""
  if num_clients < 1:
    raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
  if min_examples < 1:
    raise ConfigError(f"min_examples must be >= 1, got {min_examples}")
  if max_examples < min_examples:
    raise ConfigError(
        f"max_examples must be >= min_examples ({min_examples}), "
        f"got {max_examples}")
  if not alpha > 0:
    raise ConfigError(f"alpha must be > 0, got {alpha}")
  if not shift >= 0:
    raise ConfigError(f"shift must be >= 0, got {shift}")
  if seed < 0:
    raise ConfigError(f"seed must be >= 0, got {seed}")
  if local_test_examples < 0:
    raise ConfigError(
        f"local_test_examples must be >= 0, got {local_test_examples}")


def _base_digits() -> tuple[np.ndarray, np.ndarray]:
  """The 1,797 base digits: `[n, 8, 8, 1]` float32 in [0, 1], labels.

  `digits_8x8.npz` holds UCI's "Optical Recognition of Handwritten Digits"
  test set (Alpaydin and Kaynak, 1998; CC BY 4.0) exactly as scikit-learn's
  `load_digits` returns it (pixel counts 0..16 as uint8, in its order), 45
  KB, so the default experiment needs neither scikit-learn nor scipy's
  loaders; tests/test_digits.py checks it against scikit-learn's copy.
  """
  resource = importlib.resources.files("fedjax_tl.data") / "digits_8x8.npz"
  with resource.open("rb") as f, np.load(f) as raw:
    images = (raw["images"].astype(np.float32) / 16.0)[..., None]
    labels = raw["labels"].astype(np.int32)
  return images, labels


def _build_target_test(images: np.ndarray, labels: np.ndarray,
                       tgt_test: np.ndarray, shift: float,
                       rng: np.random.Generator) -> Dataset:
  """TEST_COPIES styled copies of each target-test image, a fresh style each."""
  test_base = np.tile(tgt_test, TEST_COPIES)
  test_styles = _draw_styles(test_base.shape[0], shift, rng)
  return Dataset(
      x=_apply_styles(images[test_base], test_styles,
                      np.arange(test_base.shape[0]), shift, rng),
      y=labels[test_base])


def _rng(seed: int, stream: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([int(seed), stream]))


def _stratified_pools(
    labels: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
  """Splits the indices per class into the disjoint POOL_FRACTIONS pools."""
  cuts = np.cumsum(POOL_FRACTIONS)[:-1]
  pools: list[list[np.ndarray]] = [[] for _ in POOL_FRACTIONS]
  for c in range(NUM_CLASSES):
    members = rng.permutation(np.flatnonzero(labels == c))
    bounds = np.round(cuts * members.shape[0]).astype(int)
    for pool, part in zip(pools, np.split(members, bounds)):
      pool.append(part)
  return [np.sort(np.concatenate(p)) for p in pools]


def _build_clients(
    pool_x: np.ndarray,
    pool_y: np.ndarray,
    num_clients: int,
    *,
    alpha: float,
    min_examples: int,
    max_examples: int,
    shift: float,
    rng: np.random.Generator,
) -> tuple[FederatedData, dict]:
  """Draws each device's size, label mix and style, and renders its examples.

  Returns the padded examples and the device styles (see `_draw_styles`).
  """
  # Sizes: log-normal around the geometric mean of the bounds, clipped.
  centre = np.log(np.sqrt(min_examples * max_examples))
  counts = np.clip(
      np.round(np.exp(rng.normal(centre, 0.5, size=num_clients))),
      min_examples, max_examples).astype(np.int64)
  device = np.repeat(np.arange(num_clients), counts)
  total = device.shape[0]

  # Labels: each device's class proportions ~ Dirichlet(alpha).
  mix = rng.dirichlet(np.full(NUM_CLASSES, float(alpha)), size=num_clients)
  bad = ~np.all(np.isfinite(mix), axis=1) | (mix.sum(axis=1) <= 0)
  if np.any(bad):  # tiny alpha can underflow: fall back to one class.
    mix[bad] = np.eye(NUM_CLASSES)[rng.integers(NUM_CLASSES, size=bad.sum())]
  cum = np.cumsum(mix, axis=1)
  cum /= cum[:, -1:]
  u = rng.random(total)
  y = np.minimum((u[:, None] >= cum[device]).sum(axis=1), NUM_CLASSES - 1)

  # Base images: uniformly (with replacement) among the pool's images of y.
  base = draw_by_label(pool_y, y, rng)
  styles = _draw_styles(num_clients, shift, rng)
  x = _apply_styles(pool_x[base], styles, device, shift, rng)
  bounds = np.cumsum(counts)[:-1]
  return pad_clients(x, y.astype(np.int32),
                     np.split(np.arange(total), bounds), max_examples), styles


def _build_local_test(
    pool_x: np.ndarray,
    pool_y: np.ndarray,
    clients: FederatedData,
    styles: dict,
    per_device: int,
    shift: float,
    rng: np.random.Generator,
) -> FederatedData:
  """`per_device` held-out examples of each device, in the device's style.

  Labels follow the device's training labels (see `local_test_indices`); the
  base images come from `pool_*`, which holds every class.
  """
  base = np.stack(local_test_indices(clients, pool_y, per_device, rng))
  device = np.repeat(np.arange(clients.num_clients), per_device)
  x = _apply_styles(pool_x[base.ravel()], styles, device, shift, rng)
  return FederatedData(
      x=x.reshape(*base.shape, *x.shape[1:]),
      y=pool_y[base].astype(np.int32),
      count=np.full(clients.num_clients, per_device, np.int32))


def _draw_styles(n: int, shift: float, rng: np.random.Generator) -> dict:
  """Draws `n` device styles; every entry is an `[n]` array."""
  r = STYLE
  u = lambda lo, hi: rng.uniform(lo, hi, size=n)  # noqa: E731
  stroke = rng.random(n)
  log_scale = np.log(r["scale"])
  log_gain = np.log(r["gain"])
  return dict(
      angle=np.deg2rad(u(-r["angle"], r["angle"]) * shift),
      scale=np.exp(u(*log_scale) * shift),
      shear=u(-r["shear"], r["shear"]) * shift,
      dx=u(-r["translate"], r["translate"]) * shift,
      dy=u(-r["translate"], r["translate"]) * shift,
      # +1: thicker strokes (max filter), -1: thinner (min filter), 0: as is.
      stroke=np.where(stroke < r["p_thick"], 1,
                      np.where(stroke < r["p_thick"] + r["p_thin"], -1, 0)),
      stroke_mix=u(*r["stroke_mix"]) * min(shift, 1.0),
      gain=np.exp(u(*log_gain) * shift),
      offset=u(*r["offset"]) * shift,
      invert=rng.random(n) < r["p_invert"] * min(shift, 1.0),
      noise=u(*r["noise"]) * shift,
  )


def _apply_styles(
    x: np.ndarray,
    styles: dict,
    owner: np.ndarray,
    shift: float,
    rng: np.random.Generator,
) -> np.ndarray:
  """Renders images `x[n, 8, 8, 1]` with style `owner[i]` plus a small jitter."""
  n = x.shape[0]
  s = {k: v[owner] for k, v in styles.items()}
  angle = s["angle"] + np.deg2rad(rng.uniform(-6.0, 6.0, n)) * shift
  dx = s["dx"] + rng.uniform(-0.3, 0.3, n) * shift
  dy = s["dy"] + rng.uniform(-0.3, 0.3, n) * shift
  # The inverse map: output pixel -> input coordinates.
  cos, sin = np.cos(angle), np.sin(angle)
  inv = np.empty((n, 2, 2), dtype=np.float32)
  inv[:, 0, 0] = cos / s["scale"]
  inv[:, 0, 1] = (sin + s["shear"] * cos) / s["scale"]
  inv[:, 1, 0] = -sin / s["scale"]
  inv[:, 1, 1] = (cos - s["shear"] * sin) / s["scale"]
  shift_xy = np.stack([dx, dy], axis=1).astype(np.float32)
  # Per-image pixel maps, as `[n, 1, 1]` float32 for broadcasting.
  col = lambda v: np.asarray(v, dtype=np.float32)[:, None, None]  # noqa: E731
  mix = s["stroke_mix"].astype(np.float32)
  thick_w = col(np.where(s["stroke"] == 1, mix, 0.0))
  thin_w = col(np.where(s["stroke"] == -1, mix, 0.0))
  sign = col(np.where(s["invert"], -1.0, 1.0))
  gain = col(s["gain"]) * sign
  offset = col(s["offset"]) * sign + col(s["invert"])
  noise = col(s["noise"])

  out = np.empty((n, SIDE, SIDE, 1), dtype=np.float32)
  for lo in range(0, n, _CHUNK):
    sl = slice(lo, min(lo + _CHUNK, n))
    img = _affine_bilinear(x[sl, ..., 0], inv[sl], shift_xy[sl])
    # Stroke width: blend with a 3x3 max (thicker) or min (thinner) filter.
    if np.any(thick_w[sl]):
      img += thick_w[sl] * (_filter3x3(img, np.maximum) - img)
    if np.any(thin_w[sl]):
      img += thin_w[sl] * (_filter3x3(img, np.minimum) - img)
    # Contrast, polarity (1 - v) and sensor noise.
    img = img * gain[sl] + offset[sl]
    img += rng.standard_normal(img.shape, dtype=np.float32) * noise[sl]
    np.clip(img, 0.0, 1.0, out=out[sl, ..., 0])
  return out


def _affine_bilinear(
    img: np.ndarray, inv: np.ndarray, shift_xy: np.ndarray) -> np.ndarray:
  """Samples `img[n, 8, 8]` at `inv @ (p - c) + c - shift` for each pixel p.

  Bilinear interpolation, zeros outside the image. Vectorised over images.
  """
  n = img.shape[0]
  width = SIDE + 2
  centre = (SIDE - 1) / 2.0
  rows, cols = np.meshgrid(np.arange(SIDE), np.arange(SIDE), indexing="ij")
  grid = np.stack([cols.ravel(), rows.ravel()], axis=0).astype(np.float32)
  grid -= centre  # [2, 64], (x, y) about the centre
  src = np.einsum("nij,jp->nip", inv, grid) + (centre - shift_xy[:, :, None])
  # Pad with a ring of zeros; clipping far-away coordinates onto the ring
  # then reads zeros.
  padded = np.zeros((n, width, width), dtype=np.float32)
  padded[:, 1:-1, 1:-1] = img
  flat = padded.reshape(-1)
  sx, sy = src[:, 0], src[:, 1]
  xf = np.floor(sx)
  yf = np.floor(sy)
  fx = sx - xf
  fy = sy - yf
  xi = xf.astype(np.int32)
  yi = yf.astype(np.int32)
  # Padded-array column / row of the 4 neighbours, clipped onto the ring.
  xa = np.clip(xi + 1, 0, width - 1)
  xb = np.clip(xi + 2, 0, width - 1)
  base = (np.arange(n, dtype=np.int32) * (width * width))[:, None]
  ya = np.clip(yi + 1, 0, width - 1) * width + base
  yb = np.clip(yi + 2, 0, width - 1) * width + base
  gx = 1 - fx
  top = flat[ya + xa] * gx + flat[ya + xb] * fx
  bottom = flat[yb + xa] * gx + flat[yb + xb] * fx
  return (top * (1 - fy) + bottom * fy).reshape(n, SIDE, SIDE)


def _filter3x3(img: np.ndarray, combine: np.ufunc) -> np.ndarray:
  """A 3x3 max or min filter (`np.maximum` / `np.minimum`) over `img[n, 8, 8]`.

  Edges replicate.
  """
  padded = np.pad(img, ((0, 0), (1, 1), (1, 1)), mode="edge")
  rows = combine(combine(padded[:, :-2], padded[:, 1:-1]), padded[:, 2:])
  return combine(combine(rows[:, :, :-2], rows[:, :, 1:-1]), rows[:, :, 2:])
