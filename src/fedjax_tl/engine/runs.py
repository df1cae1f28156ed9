"""The runs axis: a run's seed and continuous hyperparameters as traced values.

One compiled round serves every run (:meth:`RunsAxis.round_with`), and R runs
vmap as one program (:meth:`RunsAxis.round_runs`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fedjax_tl.engine.state import (DeviceArrays, Hparams, RoundStats,
                                    ServerState, stack_runs)
from fedjax_tl.models.base import Params

# The simulation (simulation.Simulation) is typed `Any`, so this module does
# not import the module that imports it.
Simulation = Any


@dataclasses.dataclass(frozen=True)
class Tunable:
  """How a simulation rebuilds its optimisers for a run's :class:`Hparams`.

  Attributes:
    client_tx: the client optimiser of a (possibly traced) learning rate.
    server_tx: the server optimiser of a (possibly traced) learning rate.
    client_lr, server_lr, mu: the configured values (the default run).
  """
  client_tx: Callable[[Any], optax.GradientTransformation]
  server_tx: Callable[[Any], optax.GradientTransformation]
  client_lr: float
  server_lr: float
  mu: float


class RunsAxis:
  """The runs of one simulation, and the programs compiled for them.

  Needs `sim.tunable`; the programs are compiled on first use and kept here
  (one per simulation, as `Simulation.runs`).
  """

  def __init__(self, sim: Simulation):
    self.sim = sim

  def _tunable(self) -> Tunable:
    if self.sim.tunable is None:
      raise ValueError("hyperparameters as values (the runs axis) need "
                       "Simulation.tunable")
    return self.sim.tunable

  def hparams(self, seed: int | None = None, client_lr: float | None = None,
              server_lr: float | None = None, mu: float | None = None
              ) -> Hparams:
    """A run's :class:`Hparams`; a value left out is the configured one."""
    t = self._tunable()
    pick = lambda value, default: default if value is None else value
    return Hparams(seed=jnp.asarray(pick(seed, self.sim.seed), jnp.int32),
                   client_lr=jnp.asarray(pick(client_lr, t.client_lr),
                                         jnp.float32),
                   server_lr=jnp.asarray(pick(server_lr, t.server_lr),
                                         jnp.float32),
                   mu=jnp.asarray(pick(mu, t.mu), jnp.float32))

  def with_hparams(self, hparams: Hparams) -> Simulation:
    """The simulation running as the run `hparams` (traced or concrete).

    The run's seed replaces `seed`, its learning rates rebuild the client
    and server optimisers (:class:`Tunable`) and its mu replaces the
    client's FedProx coefficient. An optimiser's state does not depend on
    its learning rate (SGD, Adam, Yogi), so `Simulation.init` serves every
    run.
    """
    t = self._tunable()
    return dataclasses.replace(
        self.sim, seed=hparams.seed, server_tx=t.server_tx(hparams.server_lr),
        client_update=functools.partial(
            self.sim.client_update, run_tx=t.client_tx(hparams.client_lr),
            run_mu=hparams.mu))

  def round_with(self, state: ServerState, hparams: Hparams
                 ) -> tuple[ServerState, RoundStats]:
    """One round of the run `hparams`: the same as `Simulation.round` of a
    simulation built with its values, but one program serves every value."""
    return self._round_with_jit(state, hparams, self.sim.arrays)

  def round_runs(self, states: ServerState, hparams: Hparams
                 ) -> tuple[ServerState, RoundStats]:
    """One round of R runs as one compiled program (vmapped over runs).

    `states` and `hparams` carry a leading runs axis (:func:`stack_runs`,
    :meth:`init_runs`); so do the returned state and stats.
    """
    return self._runs_jit(states, hparams, self.sim.arrays)

  def init_runs(self, params: Params, num_runs: int) -> ServerState:
    """`num_runs` copies of `Simulation.init`, stacked along a leading runs
    axis."""
    return stack_runs([self.sim.init(params)] * num_runs)

  def _hparams_round(self, state: ServerState, hparams: Hparams,
                     arrays: DeviceArrays) -> tuple[ServerState, RoundStats]:
    return self.with_hparams(hparams).traced_round(state, arrays)

  @functools.cached_property
  def _round_with_jit(self) -> Callable:
    return jax.jit(self._hparams_round)

  @functools.cached_property
  def _runs_jit(self) -> Callable:
    return jax.jit(jax.vmap(self._hparams_round, in_axes=(0, 0, None)))
