"""Migration policies side by side on the default embedded experiment.

Every policy of `compare_policies` runs on the same 1,000-device population,
the same styled-digits data, the same pretrained 64-128-10 MLP and the same
seed; the table lands in WORKDIR/comparison.{md,csv}:

  fedjax-tl compare --config=configs/compare_migration.py --workdir=runs/compare

About 2 minutes on 2 CPU cores. Pick policies with e.g.
`--config.compare_policies="('heterofl','fjord')"`.
"""

from fedjax_tl.config import default_config


def get_config():
  return default_config()
