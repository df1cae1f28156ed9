"""A normalised residual network, end to end on the embedded digits.

HeteroFL's pre-activation ResNet-18 (static batch norm, its block layout) at
a quarter of its widths (16-32-64-128), pretrained on the clean digits and
migrated onto the default population of 1,000 devices in four tiers (x1,
1/2, 1/4, 1/8), HeteroFL's static widths with its scaler; each tier is
evaluated with batch-norm statistics recomputed for its sub-model on the
clients' training data:

  fedjax-tl run --config=configs/digits_resnet.py --workdir=runs/resnet
"""

from fedjax_tl.config import default_config


def get_config():
  cfg = default_config()
  cfg.model = "preresnet18"
  cfg.resnet_widths = (16, 32, 64, 128)
  cfg.scaler = True
  cfg.num_rounds = 20
  cfg.eval_every = 5
  return cfg
