"""A registry of named recipes: name -> `recipe(options) -> value`.

Policies and aggregators are values built by recipes; their registries map
the names a config uses to the recipes, so no other code tests a name.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, NamedTuple, TypeVar

Value = TypeVar("Value")


class Registry(dict, Generic[Value]):
  """A dict of recipes, with the options type they take.

  Adding an entry (`REGISTRY["name"] = recipe`) is all it takes for the name
  to validate in a config and run.
  """

  def __init__(self, options: type[NamedTuple],
               recipes: dict[str, Callable[[Any], Value]]):
    super().__init__(recipes)
    self.options = options

  def names(self) -> tuple[str, ...]:
    """The registered names."""
    return tuple(self)

  def make(self, name: str, options: Any = None) -> Value:
    """The value `name` with `options` (default options if None);
    KeyError for an unknown name."""
    return self[name](self.options() if options is None else options)

  def build(self, name: str, **options: Any) -> Value:
    """`make(name, Options(**options))`: the value with keyword options
    (the packages export it as `get`)."""
    return self.make(name, self.options(**options))

  def names_where(self, has: Callable[[Value], bool]) -> tuple[str, ...]:
    """The names whose value (with default options) satisfies `has`."""
    return tuple(name for name in self if has(self.make(name)))
