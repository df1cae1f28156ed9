"""Models whose width groups capacity policies cut, and their registry.

A model is one file: an NNX module with `axes()` and a builder
`(input_shape, num_classes, seed, Options) -> ModelDef`, plus one line in
`REGISTRY` below.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Sequence

from flax import linen, nnx

from fedjax_tl.models import cnn, lstm, mlp, mobilenet, resnet, transformer
from fedjax_tl.models.base import ModelDef, Options, from_module, num_params
from fedjax_tl.models.bridge import from_linen, with_width_axes
from fedjax_tl.registry import Registry

REGISTRY = Registry(Options, {
    "mlp": mlp.mlp,
    "cnn": cnn.cnn,
    "simple_cnn": cnn.simple_cnn,  # pfl-research's CIFAR-10 model
    "preresnet18": resnet.preresnet18,  # HeteroFL's, with sBN
    "resnet18": resnet.resnet18,  # the standard one, GroupNorm (FjORD's)
    "mobilenetv2": mobilenet.mobilenetv2,  # width multiplier = capacity
    "transformer": transformer.transformer,  # pre-LN; classifier or LM
    "lstm": lstm.lstm,  # fedjax's / TFF's Shakespeare character LSTM
})


def names() -> tuple[str, ...]:
  return REGISTRY.names()


def resolve(name: str) -> Callable[..., Any]:
  """The builder of a registered model, or the object `module:attr` names
  (a user's model: an NNX module class, a `ModelDef`, or a builder).

  Raises:
    ValueError: an unknown name, or a `module:attr` that does not import.
  """
  if name in REGISTRY:
    return REGISTRY[name]
  module_name, sep, attr = name.partition(":")
  if not sep or not module_name or not attr:
    raise ValueError(f"unknown model {name!r}; models are "
                     f"{', '.join(REGISTRY.names())}, or module:attr for "
                     f"your own")
  try:
    return getattr(importlib.import_module(module_name), attr)
  except ImportError as e:
    raise ValueError(f"model {name!r}: cannot import {module_name!r} "
                     f"({e})") from None
  except AttributeError:
    raise ValueError(f"model {name!r}: {module_name!r} has no "
                     f"{attr!r}") from None


def as_model(obj: Any, input_shape: Sequence[int], num_classes: int,
             seed: int, options: Options) -> ModelDef:
  """A `ModelDef` from what a user gives: a `ModelDef`; an NNX module
  (instance, or class called as `cls(input_shape, num_classes,
  rngs=nnx.Rngs(params=seed))`); a flax Linen module (instance, or class
  called as `cls(num_classes=num_classes)` if it has that field, else
  `cls()`; see :func:`from_linen`); or a builder `(input_shape,
  num_classes, seed, options)` returning one of these."""
  if isinstance(obj, ModelDef):
    return obj
  if isinstance(obj, nnx.Module):
    return from_module(obj)
  if isinstance(obj, linen.Module):
    return from_linen(obj, input_shape, num_classes, seed)
  if isinstance(obj, type) and issubclass(obj, linen.Module):
    fields = {field.name for field in dataclasses.fields(obj)}
    try:
      module = obj(**({"num_classes": num_classes}
                      if "num_classes" in fields else {}))
    except TypeError as e:
      raise ValueError(f"{obj.__name__}: {e}; give an instance or a "
                       f"builder") from None
    return from_linen(module, input_shape, num_classes, seed)
  if isinstance(obj, type) and issubclass(obj, nnx.Module):
    return from_module(obj(tuple(input_shape), num_classes,
                           rngs=nnx.Rngs(params=seed)))
  if callable(obj):
    return as_model(obj(tuple(input_shape), num_classes, seed, options),
                    input_shape, num_classes, seed, options)
  raise ValueError(f"a model must be a ModelDef, an NNX or Linen module or "
                   f"a builder, not {type(obj).__name__}")


def register(obj: Any) -> str:
  """Registers a user's model object (see :func:`as_model`) for this
  process under a name a config can carry, and returns the name:
  `module:attr` where it imports as such, else `python:<type>`."""
  if isinstance(obj, type) or callable(obj) and hasattr(obj, "__qualname__"):
    name = f"{obj.__module__}:{obj.__qualname__}"
    try:
      if resolve(name) is obj:
        return name
    except ValueError:
      pass
  # Unique per object (two instances of a class are two models): its id,
  # while this process holds it in the registry.
  label = getattr(obj, "__qualname__", type(obj).__qualname__)
  name = f"python:{label}@{id(obj):x}"
  REGISTRY[name] = lambda input_shape, num_classes, seed, options: as_model(
      obj, input_shape, num_classes, seed, options)
  return name


def build_model(name: str, input_shape: Sequence[int], num_classes: int, *,
                seed: int, **options: Any) -> ModelDef:
  """Builds model `name` (registered, or `module:attr`) for inputs
  `[*input_shape]`.

  Args:
    name: a registered model or `module:attr` (see :func:`as_model`).
    input_shape: one example's shape, e.g. `(8, 8, 1)`.
    num_classes: the logits.
    seed: the initialisation seed.
    **options: :class:`Options` fields (`hidden`, `cnn_channels`,
      `cnn_dense`, `dropout` (None: the model's default), `conv_impl`, ...).
  """
  return as_model(resolve(name), input_shape, num_classes, seed,
                  Options(**options))


__all__ = ["ModelDef", "Options", "REGISTRY", "as_model", "build_model",
           "from_linen", "from_module", "names", "num_params", "register",
           "resolve", "with_width_axes"]
