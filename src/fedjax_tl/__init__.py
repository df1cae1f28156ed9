"""fedjax_tl: vectorized federated transfer learning on heterogeneous devices.

The library API: build a config (`fedjax_tl.config`), then
`fedjax_tl.runner.run(cfg, workdir)`; or compose the pieces (models, capacity
masks, client update, simulation) directly.
"""

from fedjax_tl.config import ExperimentConfig, default_config, validate
from fedjax_tl.errors import ConfigError, DataError, UserError

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "ExperimentConfig", "UserError",
           "default_config", "validate"]
