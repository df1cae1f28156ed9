"""CIFAR-10 under the published HeteroFL, FedRolex and FjORD setups.

From scratch (pretrain=none) on tfds `cifar10`: 100 clients of 495 examples
(IID unless `alpha` is given), 10 a round, every client online; HeteroFL's
"conv" widths (64-128-256-512, plus a 512-unit dense layer) as our CNN:

  fedjax-tl run --config=configs/cifar10.py --workdir=runs/cifar10_a-e
  fedjax-tl run --config=configs/cifar10.py:mix=a-b-c-d-e --workdir=...
  fedjax-tl run --config=configs/cifar10.py:method=fedrolex,mix=real-world
  fedjax-tl run --config=configs/cifar10.py:method=fjord --workdir=...

Variants (`FILE:key=value,...`, see fedjax_tl/published.py): model=cnn|mlp,
alpha=iid|<Dirichlet alpha>, mix=a|a-e|a-b-c-d-e|e|uniform|real-world|pset
or any HeteroFL mix, method=heterofl (5 local epochs = 250 steps of 10, SGD
lr 0.1, momentum 0.9, wd 5e-4, dynamic levels, 400 rounds IID / 800
non-IID)|fedrolex|fed_dropout (1 epoch, rolling / random extraction,
uniform mix)|fjord|fjord_kd (1 epoch = 16 steps of 32, 500 rounds, p-set).

Published:
- HeteroFL (Diao et al., ICLR 2021), CIFAR-10 IID results table,
  PreResNet18, global accuracy: a 91.19, a-e 90.29, a-b-c-d-e 88.83,
  e 77.09 (Flower's reproduction: 90.83, 89.98, 87.46, 76.53).
- FjORD (Flower baseline, ResNet18, read off its plot), accuracy at
  p = 0.2 .. 1.0: 83.9, 85.6, 86.2, 85.7, 84.8; with KD (method=fjord_kd)
  83.7, 86.05, 86.6, 86.5, 85.9.
- FedRolex (Alam et al., NeurIPS 2022): the setup only (its number is not
  recorded); rolling should beat random (fed_dropout) and static (heterofl).

Band a reproduction should land in (an expectation, not measured: there is
no CIFAR-10 here): our CNN has no normalisation or residual blocks, so not
the ResNets' level; `accuracy` 75-85 for a and a-e, the ordering a >= a-e >=
a-b-c-d-e > e, and a - e between 8 and 20 points (published 14.1). FjORD:
`per_tier_accuracy` within 4 points across p >= 0.4, p = 0.2 lowest.
Non-IID accuracy swings 10-14 points between rounds: run several seeds
(`fedjax-tl sweep`). Cost: the full CNN is 2,605,194 parameters (10.4 MB
each way per full-width client a round) and 118.9 MFLOP per example forward.

Data: download and prepare it yourself, on a machine with internet:
`tfds build cifar10 --file_format=array_record` (then `--config.data_dir`
if not tfds' default). Here it is checked only under tfds' mock data
(tests/test_configs.py: it loads, validates, runs a round, costs as above).
"""

from fedjax_tl.published import published_config


def get_config(arg=None):
  return published_config("cifar10", arg)
