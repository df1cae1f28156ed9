"""fedjax_tl: vectorized federated transfer learning on heterogeneous devices.

The library API (fedjax_tl.api):
`cfg = fedjax_tl.get_config(spec, **overrides)`, `result = fedjax_tl.run(cfg)`
(a Result with pandas frames), `compare`, `run_sweep`, `write_report`; or
compose the pieces (models, capacity masks, client update, simulation)
directly.
"""

from fedjax_tl.errors import ConfigError, DataError, UserError

__version__ = "0.1.0"


def _checkout_configs() -> None:
  """`fedjax_tl.configs` in a checkout run from src/ without an install:
  the top-level configs/ beside src/ (installed, it is a subpackage)."""
  import importlib.util
  import pathlib
  import sys
  here = pathlib.Path(__file__).resolve().parent
  init = here.parent.parent / "configs" / "__init__.py"
  if (here / "configs").is_dir() or not init.is_file():
    return
  spec = importlib.util.spec_from_file_location(
      f"{__name__}.configs", init, submodule_search_locations=[
          str(init.parent)])
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  globals()["configs"] = module  # as an import of the subpackage binds it


_checkout_configs()

# The API names load fedjax_tl.api (the runner) and the config names
# fedjax_tl.config (and with it jax) on first use only, so `import
# fedjax_tl` stays light: `fedjax-tl report` needs no jax, and the command
# installs its signal handlers before jax is imported. None of them is a
# submodule's name: a submodule import would rebind it.
_API = ("Result", "compare", "get_config", "load_result", "run", "run_sweep",
        "write_report")
_CONFIG = ("ExperimentConfig", "default_config", "validate")

__all__ = ["ConfigError", "DataError", "UserError", *_CONFIG, *_API]


def __getattr__(name):
  if name in _API:
    from fedjax_tl import api
    return getattr(api, name)
  if name in _CONFIG:
    from fedjax_tl import config
    return getattr(config, name)
  if name == "configs":  # installed: `fedjax_tl.configs.get(...)` unimported
    import importlib
    return importlib.import_module("fedjax_tl.configs")
  raise AttributeError(f"module 'fedjax_tl' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_API) | set(_CONFIG) | {"configs"})
