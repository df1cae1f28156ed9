"""Checkpoints with orbax: the server state every n rounds, pretrained params.

Orbax writes each step to a temporary directory and renames it when complete,
so a run killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from fedjax_tl.errors import UserError


class RoundCheckpoints:
  """The server states of a run, `workdir/checkpoints/<round>`."""

  def __init__(self, directory: pathlib.Path, keep: int):
    self._manager = ocp.CheckpointManager(
        directory.absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_round(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, round_index: int, like: Any) -> Any:
    """Restores the state saved at `round_index`, structured like `like`."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return self._manager.restore(round_index,
                                 args=ocp.args.StandardRestore(abstract))

  def save(self, round_index: int, state: Any) -> None:
    self._manager.save(round_index, args=ocp.args.StandardSave(state))

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def save_params(path: pathlib.Path, params: Any) -> None:
  """Saves a params tree (e.g. the pretrained model) at `path`."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path.absolute(), params)


def load_params(path: pathlib.Path, like: Any) -> Any:
  """Loads params saved by :func:`save_params`, checked against `like`."""
  path = pathlib.Path(path)
  if not path.exists():
    raise UserError(f"pretrained checkpoint {str(path)!r}: no such path")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(path.absolute(), abstract)
  except Exception as e:  # orbax raises many types for unreadable input
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"pretrained checkpoint {str(path)!r}: cannot be loaded "
                    f"for this model ({first[:200]})") from None
