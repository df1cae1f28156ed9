"""The local update of one client: a `lax.scan` over local steps.

Everything a client does is a pure function of its inputs, so the simulation
can `vmap` it over a cohort. Heterogeneity is carried by masks, never shapes:
`present` selects the sub-model the forward pass runs on, `train` what the
client updates, `count` how many of its padded examples are real and
`num_steps` how many of the fixed local steps it completes.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from fedjax_tl.models import exits
from fedjax_tl.models.base import Params


class ClientStats(NamedTuple):
  """Per-client training statistics (scalars)."""
  loss: jax.Array       # mean training loss over the completed steps
  steps: jax.Array      # local steps completed
  width: jax.Array | None = None  # width kept after training (adapters)


ClientUpdate = Callable[..., tuple[Params, ClientStats]]


def client_optimizer(learning_rate: float, momentum: float = 0.0,
                     weight_decay: float = 0.0) -> optax.GradientTransformation:
  """SGD with optional momentum and (coupled) weight decay."""
  return optax.chain(
      optax.add_decayed_weights(weight_decay) if weight_decay else
      optax.identity(),
      optax.sgd(learning_rate, momentum=momentum or None))


def batch_indices(key: jax.Array, count: jax.Array, max_examples: int,
                  local_steps: int, batch_size: int) -> jax.Array:
  """`[steps, batch]` indices into a client's padded examples.

  The real examples are shuffled and visited in order, wrapping around, so a
  client with fewer examples than a batch repeats them and padding is never
  read.
  """
  order = jnp.argsort(jax.random.uniform(key, (max_examples,)) +
                      (jnp.arange(max_examples) >= count))
  positions = jnp.arange(local_steps * batch_size) % jnp.maximum(count, 1)
  return order[positions].reshape(local_steps, batch_size)


def target_weights(labels: jax.Array, ignored: Sequence[int] = ()
                   ) -> jax.Array | None:
  """float32 like `labels`: 1 for the targets a loss counts, 0 for those
  whose label is in `ignored` (a text task's PAD); None without `ignored`
  (every target counts)."""
  if not ignored:
    return None
  return jnp.logical_not(jnp.isin(labels, jnp.asarray(ignored))).astype(
      jnp.float32)


def weighted_mean(values: jax.Array, weights: jax.Array | None) -> jax.Array:
  """`values.mean()`, or their mean over the weights (0 when all weights
  are 0)."""
  if weights is None:
    return values.mean()
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  label_mask: jax.Array | None = None,
                  ignored: Sequence[int] = ()) -> jax.Array:
  """Mean softmax cross-entropy over the targets (a sequence's every
  position); with `label_mask[classes]`, the softmax runs only over the
  allowed labels (HeteroFL's masked cross-entropy); targets whose label is
  in `ignored` (a text task's PAD) are left out of the mean."""
  if label_mask is not None:
    logits = jnp.where(label_mask, logits, -1e9)
  return weighted_mean(
      optax.softmax_cross_entropy_with_integer_labels(logits, labels),
      target_weights(labels, ignored))


def _proximal(params: Params, global_params: Params, train: Params
              ) -> jax.Array:
  """`||(w - w_global) * train||^2`, FedProx's term over what is trained."""
  return sum(jnp.sum(jnp.square((p - g) * m)) for p, g, m in zip(
      jax.tree.leaves(params), jax.tree.leaves(global_params),
      jax.tree.leaves(train)))


def _with_proximal(loss: jax.Array, mu, params: Params,
                   global_params: Params, train: Params) -> jax.Array:
  """`loss + mu/2 * ||(w - w_global) * train||^2`; skipped for a Python 0,
  always added for a traced mu (the runs axis, where mu may vary)."""
  if isinstance(mu, jax.Array) or mu:
    loss = loss + 0.5 * mu * _proximal(params, global_params, train)
  return loss


# How the server averages the output layer's entries of label c under masked
# cross-entropy (Simulation.masked_ce_head): over the clients whose labels
# include c (HeteroFL's `combine`, the default), or over every client holding
# the layer.
HEAD_RULES = ("label_holders", "layer_holders")


def held_labels(y: jax.Array, count: jax.Array, num_classes: int) -> jax.Array:
  """`[classes]` bool: the labels among a client's real examples."""
  real = jnp.arange(y.shape[0]) < count
  real = jnp.broadcast_to(real.reshape(-1, *[1] * (y.ndim - 1)), y.shape)
  return jnp.zeros(num_classes, bool).at[y].max(real)


def distillation_loss(teacher_logits: jax.Array, student_logits: jax.Array,
                      temperature: float = 1.0,
                      weights: jax.Array | None = None) -> jax.Array:
  """Mean `T^2 KL(softmax(teacher/T) || softmax(student/T))` (Hinton et al.;
  the T^2 keeps gradients on a cross-entropy's scale at any temperature),
  over the targets `weights` counts (:func:`target_weights`; None: all).
  The teacher is a fixed target: no gradient flows into it."""
  teacher = jax.nn.log_softmax(
      jax.lax.stop_gradient(teacher_logits) / temperature)
  student = jax.nn.log_softmax(student_logits / temperature)
  kl = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)
  return temperature**2 * weighted_mean(kl, weights)


class ExitTerms(NamedTuple):
  """How a client trains an early-exit model (models.exits) this round;
  a policy's `exit_terms` makes them (policies.base)."""
  held: jax.Array         # [exits] bool, the exits the client holds
  kd_weight: jax.Array    # the distillation terms' weight
  temperature: jax.Array  # the distillation's softmax temperature
  mutual: jax.Array       # bool: every exit teaches every other (DepthFL),
  #                         else the deepest held exit teaches (ScaleFL)
  weights: jax.Array | None = None  # [exits] each exit's loss weight
  #                         (ScaleFL's (i + 1) / sum); None: 1 each


def exit_loss(logits: jax.Array, labels: jax.Array, terms: ExitTerms, *,
              label_mask: jax.Array | None = None,
              ignored: Sequence[int] = ()) -> jax.Array:
  """The loss of an early-exit model on a batch, `logits[exits, ...]`.

  `sum_i [CE_i + w * KD_i]` over the held exits i (`terms.held`), KD_i
  the distillation into exit i (:func:`distillation_loss`, teachers fixed):
  `mutual`, the mean over the other held exits j of `KL(p_j || p_i)`, as
  DepthFL's authors train (Flower baseline `depthfl/models.py`,
  `_train_one_epoch`: `criterion(out_i) + consistency_weight *
  KL(out_i, out_j.detach()) / (n - 1)` summed over i and j != i, T = 1);
  else `KL(p_deepest || p_i)` for the shallower held exits (ScaleFL's).
  `w = terms.kd_weight`; a single held exit has no distillation term.
  With `terms.weights`, exit i's term is multiplied by `weights[i]`.
  """
  weights = target_weights(labels, ignored)
  held = terms.held.astype(jnp.float32)
  ce = jax.vmap(lambda z: cross_entropy(z, labels, label_mask, ignored))(
      logits)
  # kd[i, j]: exit j teaching exit i.
  kd = jax.vmap(lambda student: jax.vmap(
      lambda teacher: distillation_loss(teacher, student, terms.temperature,
                                        weights))(logits))(logits)
  others = held[None, :] * (1 - jnp.eye(held.shape[0]))
  mutual = (kd * others).sum(1) / jnp.maximum(held.sum() - 1, 1)
  deepest = exits.deepest_index(terms.held)
  from_deepest = kd[:, deepest] * others[:, deepest]
  kd_i = jnp.where(terms.mutual, mutual, from_deepest)
  weighted = held if terms.weights is None else held * terms.weights
  return jnp.sum(weighted * (ce + terms.kd_weight * kd_i))


def make_client_update(apply_fn: Callable[..., jax.Array],
                       tx: optax.GradientTransformation, *, local_steps: int,
                       batch_size: int, mu: float = 0.0,
                       self_distill: bool = False,
                       compute_dtype: jnp.dtype = jnp.float32,
                       unroll: bool = False,
                       dropout: bool = False,
                       loss_ignored: Sequence[int] = ()) -> ClientUpdate:
  """Builds `update(params, present, train, x, y, count, num_steps, key,
  label_mask=None, step_masks=None, run_tx=None, run_mu=None, units=None,
  frozen=False, exit_terms=None, reparam=None)`.

  Args:
    apply_fn: `apply(params, x[batch, ...], rng=None, units=None) -> logits`
      (a `ModelDef.apply`; `rng` is passed only with `dropout`, `units`
      only when the update is given units).
    tx: the client optimiser.
    local_steps: the fixed number of scan steps (clients may use fewer).
    batch_size: examples per local step.
    mu: FedProx proximal coefficient, `mu/2 * ||w - w_global||^2`.
    self_distill: with `step_masks` (FjORD), each step trains the client's
      largest sub-model (`present`) on the labels and the step's drawn
      sub-model on the largest one's soft labels (FjORD's self-distillation):
      loss = CE(largest) + KL(largest || drawn).
    compute_dtype: the dtype of the forward and backward passes (e.g.
      bfloat16); the client's params, optimiser state and delta stay float32,
      so aggregation is float32.
    unroll: unroll the scan over local steps. On XLA:CPU a convolution
      inside a rolled loop runs several times slower than unrolled (a
      simple_cnn step: 2.3 vs 16.7 steps/s), while unrolling an MLP client
      slows the vmapped round; same results either way.
    dropout: train with the model's dropout: local step `s` passes
      `rng=fold_in(fold_in(key, 2), s)` to `apply_fn` (FjORD's teacher and
      student share it), so the masks are deterministic from the client's
      key. Off, `apply_fn` never sees a key (evaluation-mode forwards).
    loss_ignored: target labels the loss leaves out (a text task's PAD,
      `data.text.LOSS_IGNORED`): the loss is the mean over the batch's
      other targets. Empty: the mean over all.

  Returns:
    A function of one client's inputs, `params` (the global model), `present`
    and `train` masks (trees like params), `x[max_examples, ...]`,
    `y[max_examples]` (`[max_examples, T]` for sequences), `count` and
    `num_steps` (scalars) and a PRNG `key`, returning `(delta, stats)`
    with `delta` zero wherever `train` is. A `label_mask[classes]`
    restricts the training softmax to those labels. `present` may carry
    values other than 1 (HeteroFL's scaler); `train` is 0/1.
    `step_masks(key) -> (present, train)`, if given, draws each local step's
    masks (within `train`, which still defines what is uploaded).
    `run_tx` and `run_mu`, if given, replace `tx` and `mu` (a run's own
    optimiser and mu, possibly traced: Simulation.with_hparams).

    `exit_terms` (:class:`ExitTerms`), for an early-exit model
    (models.exits), trains its held exits with :func:`exit_loss`.

    `reparam(local) -> params`, if given, is what every local step's
    forward pass sees of the client's current params, before `present` (or
    `units`) masks them: the forward runs on `reparam(local) * present`
    and the gradient flows through `reparam` (FIARSE's `|w| >= t`
    re-evaluated at every step, `Policy.reparam`). The optimiser, the
    proximal term, the `train` masking and the delta stay on `local`.

    `units`, one `[group size]` vector per width group (a width policy's
    0/1 unit masks, times HeteroFL's scaler), switches to masks on
    activations: the forward runs on the unmasked params with each hidden
    layer's outputs multiplied by its group's vector (`apply_fn(...,
    units=units)`), which gives the same logits and the same gradients as
    the params multiplied by `present`, without a pass over the params per
    step. `present` is then unused and `train` must be the units' parameter
    mask; what lies outside it never reaches the forward, so it is masked
    off once, on the delta. `step_masks(key)` then returns the step's
    `(units, train)`. `frozen` (a Python bool): some held params are 0 in
    `train` (`Simulation.frozen`), so with units the updates are masked by
    `train` at every step too, as they always are without units.
  """
  # Over ~60 lines: the docstring states 14 options, and `update` is the
  # client's whole local training, one traced closure (its step function
  # inside), which every round path vmaps.

  def update(params, present, train, x, y, count, num_steps, key,
             label_mask=None, step_masks=None, run_tx=None, run_mu=None,
             units=None, frozen=False, exit_terms=None, reparam=None):
    # A run's own optimiser and mu (the runs axis) replace the built ones.
    opt = tx if run_tx is None else run_tx
    prox_mu = mu if run_mu is None else run_mu
    on_units = units is not None
    held = units if on_units else present
    indices = batch_indices(key, count, x.shape[0], local_steps, batch_size)
    step_key = jax.random.fold_in(key, 1)
    dropout_key = jax.random.fold_in(key, 2)

    def forward(local, mask, xb, rng):
      """float32 logits of the sub-model `mask` selects (param masks or
      units), computed in `compute_dtype` (every exit's, `[exits, ...]`,
      with `exit_terms`)."""
      extra = {"rng": rng} if dropout else {}
      if exit_terms is not None:
        extra["exits"] = True
      if reparam is not None:  # the params as this step's forward sees them
        local = reparam(local)
      if on_units:
        sub = jax.tree.map(lambda p: p.astype(compute_dtype), local)
        extra["units"] = {g: u.astype(compute_dtype) for g, u in mask.items()}
      else:
        sub = jax.tree.map(lambda p, m: (p * m).astype(compute_dtype), local,
                           mask)
      if jnp.issubdtype(xb.dtype, jnp.floating):  # not token ids
        xb = xb.astype(compute_dtype)
      return apply_fn(sub, xb, **extra).astype(jnp.float32)

    def loss_fn(local, step_held, step_train, xb, yb, rng):
      logits = forward(local, step_held, xb, rng)
      if exit_terms is None:
        loss = cross_entropy(logits, yb, label_mask, loss_ignored)
      else:
        loss = exit_loss(logits, yb, exit_terms, label_mask=label_mask,
                         ignored=loss_ignored)
      return _with_proximal(loss, prox_mu, local, params, step_train)

    def distill_loss_fn(local, step_held, xb, yb, rng):
      teacher = forward(local, held, xb, rng)
      student = forward(local, step_held, xb, rng)
      loss = (cross_entropy(teacher, yb, label_mask, loss_ignored) +
              distillation_loss(teacher, student,
                                weights=target_weights(yb, loss_ignored)))
      return _with_proximal(loss, prox_mu, local, params, train)

    def step(carry, inputs):
      local, opt_state = carry
      s, idx = inputs
      rng = jax.random.fold_in(dropout_key, s)
      if step_masks is None:
        step_held, step_train = held, train
      else:  # a sub-model drawn for this batch (FjORD's ordered dropout)
        step_held, step_train = step_masks(jax.random.fold_in(step_key, s))
      if self_distill and step_masks is not None:
        # Both sub-models train: the update may touch all the client holds.
        loss, grads = jax.value_and_grad(distill_loss_fn)(
            local, step_held, x[idx], y[idx], rng)
        step_train = train
      else:
        loss, grads = jax.value_and_grad(loss_fn)(
            local, step_held, step_train, x[idx], y[idx], rng)
      if not on_units:  # with units, gradients are already 0 off the units
        grads = jax.tree.map(jnp.multiply, grads, step_train)
      updates, new_opt_state = opt.update(grads, opt_state, local)
      active = s < num_steps
      if on_units and step_masks is None and not frozen:
        # Decoupled terms (weight decay) may move what lies off the units:
        # it never reaches the forward and is masked off the delta.
        updates = jax.tree.map(lambda u: u * active, updates)
      else:
        # Decoupled terms (weight decay), and with units the gradients of
        # frozen params, must not touch what the client (or this step) does
        # not train, so the mask is applied after the optimiser too.
        updates = jax.tree.map(lambda u, m: u * m * active, updates,
                               step_train)
      opt_state = jax.tree.map(lambda new, old: jnp.where(active, new, old),
                               new_opt_state, opt_state)
      return (optax.apply_updates(local, updates), opt_state), loss * active

    (local, _), losses = jax.lax.scan(
        step, (params, opt.init(params)),
        (jnp.arange(local_steps), indices), unroll=unroll)
    delta = jax.tree.map(jnp.subtract, local, params)
    if on_units:
      delta = jax.tree.map(jnp.multiply, delta, train)
    steps = jnp.minimum(num_steps, local_steps)
    stats = ClientStats(loss=losses.sum() / jnp.maximum(steps, 1),
                        steps=steps)
    return delta, stats

  return update
