"""Splitting a labelled data set over simulated clients.

Partitioners return one index array per client (iid, label skew, quantity skew),
and :func:`pad_clients` turns them into padded :class:`FederatedData`.
"""

from __future__ import annotations

import numpy as np

from fedjax_tl.data.federated import FederatedData
from fedjax_tl.errors import ConfigError

METHODS = ("iid", "dirichlet", "quantity")


def partition(
    labels: np.ndarray,
    num_clients: int,
    method: str,
    rng: np.random.Generator,
    *,
    alpha: float = 0.5,
    min_examples: int = 1,
    max_examples: int | None = None,
    sizes: np.ndarray | None = None,
) -> list[np.ndarray]:
  """Spreads the examples with the given labels over `num_clients` clients.

  No example goes to two clients. When the clients' capacity
  (`num_clients * max_examples`) is smaller than the data set, the examples
  that do not fit are left out.

  Args:
    labels: `[examples]` integer labels.
    num_clients: number of clients (>= 1).
    method: `"iid"` (shuffle and split evenly), `"dirichlet"` (label skew: each
      client's label proportions are drawn from Dirichlet(alpha) over the
      classes; equal client sizes) or `"quantity"` (quantity skew: iid labels,
      client shares of the data drawn from Dirichlet(alpha) over the clients).
    rng: the only source of randomness.
    alpha: Dirichlet concentration; small means strong skew, large means
      nearly iid (for `"dirichlet"`) or nearly equal sizes (for `"quantity"`).
    min_examples: every client gets at least this many examples.
    max_examples: if set, no client gets more than this many examples.
    sizes: optional `[num_clients]` explicit client sizes; overrides the size
      choice of every method (the label assignment still follows `method`).

  Returns:
    A list of `num_clients` int64 index arrays into `labels`.

  Raises:
    ConfigError: for an unknown method, a bad argument, or too few examples.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ConfigError(f"labels must be 1-D, got shape {labels.shape}")
  if method not in METHODS:
    raise ConfigError(
        f"unknown partition method {method!r}; valid choices: "
        f"{', '.join(METHODS)}")
  n = int(labels.shape[0])
  client_sizes = _client_sizes(
      n, num_clients, method, rng, alpha=alpha, min_examples=min_examples,
      max_examples=max_examples, sizes=sizes)
  if method == "dirichlet":
    return _label_skew(labels, client_sizes, alpha, rng)
  # "iid" and "quantity" only differ by their sizes: labels are assigned iid.
  order = rng.permutation(n)
  bounds = np.cumsum(client_sizes)[:-1]
  return [np.sort(part) for part in
          np.split(order[:int(client_sizes.sum())], bounds)]


def _client_sizes(
    n: int,
    num_clients: int,
    method: str,
    rng: np.random.Generator,
    *,
    alpha: float,
    min_examples: int,
    max_examples: int | None,
    sizes: np.ndarray | None,
) -> np.ndarray:
  """Validates the arguments and picks the `[num_clients]` client sizes."""
  if num_clients < 1:
    raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
  if not alpha > 0:
    raise ConfigError(f"alpha must be > 0, got {alpha}")
  if min_examples < 0:
    raise ConfigError(f"min_examples must be >= 0, got {min_examples}")
  if max_examples is not None and max_examples < max(min_examples, 1):
    raise ConfigError(
        f"max_examples must be >= max(min_examples, 1) = "
        f"{max(min_examples, 1)}, got {max_examples}")
  if n < num_clients * min_examples:
    raise ConfigError(
        f"not enough examples: {n} examples cannot give {num_clients} clients "
        f"at least min_examples={min_examples} each")
  if sizes is not None:
    sizes = np.asarray(sizes)
    if sizes.shape != (num_clients,):
      raise ConfigError(
          f"sizes must have shape ({num_clients},), got {sizes.shape}")
    hi = np.inf if max_examples is None else max_examples
    if np.any(sizes < min_examples) or np.any(sizes > hi):
      raise ConfigError(
          f"sizes must lie in [min_examples={min_examples}, "
          f"max_examples={max_examples}], got range "
          f"[{sizes.min()}, {sizes.max()}]")
    if sizes.sum() > n:
      raise ConfigError(
          f"sizes sum to {int(sizes.sum())} but only {n} examples exist")
    return sizes.astype(np.int64)
  if method == "quantity":
    weights = _dirichlet(rng, np.full(num_clients, float(alpha)))
  else:
    weights = None  # equal shares
  return _allocate(n, weights, num_clients, min_examples, max_examples, rng)


def _allocate(
    total: int,
    weights: np.ndarray | None,
    num_clients: int,
    min_examples: int,
    max_examples: int | None,
    rng: np.random.Generator,
) -> np.ndarray:
  """Shares `total` examples out in proportion to `weights`, within bounds.

  Every client first gets `min_examples`; the rest is shared in proportion to
  `weights` (evenly when None), overflow above `max_examples` being handed on
  to clients with room left, until nothing is left or every client is full.
  """
  sizes = np.full(num_clients, min_examples, dtype=np.int64)
  cap = (np.full(num_clients, np.iinfo(np.int64).max // 4, dtype=np.int64)
         if max_examples is None else
         np.full(num_clients, max_examples - min_examples, dtype=np.int64))
  left = total - num_clients * min_examples
  if weights is None:
    # Even split: the remainder goes to randomly chosen clients.
    extra = np.full(num_clients, left // num_clients, dtype=np.int64)
    extra[rng.permutation(num_clients)[:left % num_clients]] += 1
    return sizes + np.minimum(extra, cap)
  weights = np.asarray(weights, dtype=np.float64)
  while left > 0:
    room = cap - (sizes - min_examples)
    w = np.where(room > 0, weights, 0.0)
    if not np.any(room > 0):
      break
    if w.sum() <= 0:
      w = (room > 0).astype(np.float64)
    extra = rng.multinomial(left, w / w.sum())
    extra = np.minimum(extra, room)
    sizes += extra
    left -= int(extra.sum())
  return sizes


def _dirichlet(rng: np.random.Generator, alpha: np.ndarray) -> np.ndarray:
  """A Dirichlet draw that never returns NaN (tiny alpha can underflow)."""
  p = rng.dirichlet(alpha)
  if not np.all(np.isfinite(p)) or p.sum() <= 0:
    p = np.zeros_like(alpha)
    p[rng.integers(alpha.shape[0])] = 1.0
  return p


def _label_skew(
    labels: np.ndarray,
    client_sizes: np.ndarray,
    alpha: float,
    rng: np.random.Generator,
) -> list[np.ndarray]:
  """Fills clients of the given sizes with Dirichlet(alpha) label mixes.

  Clients are filled in random order, each drawing class counts from its own
  proportions among the classes that still have unused examples.
  """
  classes, label_ids = np.unique(labels, return_inverse=True)
  num_classes = classes.shape[0]
  pools = [rng.permutation(np.flatnonzero(label_ids == c))
           for c in range(num_classes)]
  used = np.zeros(num_classes, dtype=np.int64)
  avail = np.array([p.shape[0] for p in pools], dtype=np.int64)
  out: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(client_sizes)
  for i in rng.permutation(len(client_sizes)):
    size = int(client_sizes[i])
    q = _dirichlet(rng, np.full(num_classes, float(alpha)))
    counts = np.zeros(num_classes, dtype=np.int64)
    need = size
    while need > 0:
      room = avail - counts
      w = np.where(room > 0, q, 0.0)
      if w.sum() <= 0:
        w = (room > 0).astype(np.float64)
      extra = np.minimum(rng.multinomial(need, w / w.sum()), room)
      counts += extra
      need -= int(extra.sum())
    parts = [pools[c][used[c]:used[c] + counts[c]]
             for c in np.flatnonzero(counts)]
    used += counts
    avail -= counts
    out[i] = np.sort(np.concatenate(parts)) if parts else out[i]
  return out


def draw_by_label(pool_y: np.ndarray, y: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
  """Indices into a pool: for each label of `y`, a uniformly drawn (with
  replacement) pool example with that label; every label must occur in the
  pool."""
  pool_y = np.asarray(pool_y)
  y = np.asarray(y)
  order = np.argsort(pool_y, kind="stable")
  per_class = np.bincount(pool_y, minlength=int(y.max(initial=0)) + 1)
  start = np.cumsum(per_class) - per_class
  pick = start[y] + np.floor(rng.random(y.shape) * per_class[y]).astype(
      np.int64)
  return order[pick]


def local_test_indices(
    clients: FederatedData,
    pool_y: np.ndarray,
    per_client: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
  """Draws each client's held-out test examples from a labelled pool.

  Each of a client's `per_client` examples takes the label of one of its
  real training examples drawn uniformly (so the labels follow the client's
  own label mix, as in HeteroFL's per-user test splits), then a uniformly
  drawn pool example of that label. Training labels absent from the pool are
  skipped; a client with none left gets no examples.

  Returns:
    One index array into `pool_y` per client.
  """
  pool_y = np.asarray(pool_y)
  num_clients = clients.num_clients
  num_classes = max(int(pool_y.max(initial=-1)), int(clients.y.max())) + 1
  in_pool = np.bincount(pool_y, minlength=num_classes) > 0
  eligible = clients.mask & in_pool[clients.y]
  n_eligible = eligible.sum(axis=1)
  rows = np.arange(num_clients)[:, None]
  # Each row's eligible slots first, then a uniform position among them.
  order = np.argsort(~eligible, axis=1, kind="stable")
  position = np.floor(rng.random((num_clients, per_client)) *
                      n_eligible[:, None]).astype(np.int64)
  y = clients.y[rows, order[rows, position]]
  has = n_eligible > 0
  picks = np.zeros((num_clients, per_client), np.int64)
  if np.any(has):
    picks[has] = draw_by_label(pool_y, y[has], rng)
  return [picks[i] if has[i] else picks[i, :0] for i in range(num_clients)]


def pad_clients(
    x: np.ndarray,
    y: np.ndarray,
    client_indices: list[np.ndarray],
    max_examples: int | None = None,
) -> FederatedData:
  """Gathers each client's examples into padded arrays.

  Args:
    x: `[examples, *feature_shape]` inputs.
    y: `[examples]` labels.
    client_indices: one index array into `x`/`y` per client.
    max_examples: the padded length; longer clients are truncated to their
      first `max_examples` indices. Defaults to the longest client (at least 1).

  Returns:
    FederatedData with float32 `x`, int32 `y` and int32 `count`; padding is 0.
  """
  x = np.asarray(x)
  y = np.asarray(y)
  lengths = np.array([len(ix) for ix in client_indices], dtype=np.int64)
  if max_examples is None:
    width = max(1, int(lengths.max(initial=0)))
  else:
    if max_examples < 1:
      raise ConfigError(f"max_examples must be >= 1, got {max_examples}")
    width = int(max_examples)
  counts = np.minimum(lengths, width)
  num_clients = len(client_indices)
  out_x = np.zeros((num_clients, width) + x.shape[1:], dtype=np.float32)
  out_y = np.zeros((num_clients, width), dtype=np.int32)
  if counts.sum() > 0:
    flat = np.concatenate(
        [np.asarray(ix, dtype=np.int64)[:c]
         for ix, c in zip(client_indices, counts)])
    rows = np.repeat(np.arange(num_clients), counts)
    starts = np.cumsum(counts) - counts
    cols = np.arange(flat.shape[0]) - np.repeat(starts, counts)
    out_x[rows, cols] = x[flat]
    out_y[rows, cols] = y[flat]
  return FederatedData(x=out_x, y=out_y, count=counts.astype(np.int32))
