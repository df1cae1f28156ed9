"""The default experiment (what `fedjax-tl run` runs with no --config).

Pretrain an MLP on clean handwritten digits (scikit-learn's bundled set), then
migrate it onto 1,000 simulated devices in four capacity tiers (hidden width
x1, 1/2, 1/4, 1/8) whose digits are written in their own style, and fine-tune
it with HeteroFL-style static-width sub-models, 100 devices per round:

  fedjax-tl run --config=configs/default.py --workdir=runs/default
"""

from fedjax_tl.config import default_config


def get_config():
  return default_config()
