"""Models whose width groups capacity policies cut, and their registry.

A model is one file: an NNX module with `axes()` and a builder
`(input_shape, num_classes, seed, Options) -> ModelDef`, plus one line in
`REGISTRY` below.
"""

from __future__ import annotations

from typing import Any, Sequence

from fedjax_tl.models import cnn, mlp
from fedjax_tl.models.base import ModelDef, Options, from_module, num_params
from fedjax_tl.registry import Registry

REGISTRY = Registry(Options, {
    "mlp": mlp.mlp,
    "cnn": cnn.cnn,
    "simple_cnn": cnn.simple_cnn,  # pfl-research's CIFAR-10 model
})


def names() -> tuple[str, ...]:
  return REGISTRY.names()


def build_model(name: str, input_shape: Sequence[int], num_classes: int, *,
                seed: int, **options: Any) -> ModelDef:
  """Builds model `name` for inputs `[*input_shape]`.

  Args:
    name: a registered model.
    input_shape: one example's shape, e.g. `(8, 8, 1)`.
    num_classes: the logits.
    seed: the initialisation seed.
    **options: :class:`Options` fields (`hidden`, `cnn_channels`,
      `cnn_dense`, `dropout` (None: the model's default), `conv_impl`).
  """
  if name not in REGISTRY:
    raise ValueError(f"unknown model {name!r}; models are "
                     f"{', '.join(REGISTRY.names())}")
  return REGISTRY[name](tuple(input_shape), num_classes, seed,
                        Options(**options))


__all__ = ["ModelDef", "Options", "REGISTRY", "build_model", "from_module",
           "names", "num_params"]
