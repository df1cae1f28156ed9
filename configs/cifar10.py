"""CIFAR-10 under the published HeteroFL, FedRolex and FjORD setups.

From scratch (pretrain=none) on tfds `cifar10`: 100 clients of 495 examples
(IID unless `alpha` is given), 10 a round, every client online; each
method's own model: HeteroFL's pre-activation ResNet-18 with static batch
norm (`preresnet18`) for method=heterofl, the standard ResNet-18 with
GroupNorm (`resnet18`) for FedRolex, Federated Dropout and FjORD, widths
64-128-256-512:

  fedjax-tl run --config=configs/cifar10.py --workdir=runs/cifar10_a-e
  fedjax-tl run --config=configs/cifar10.py:mix=a-b-c-d-e --workdir=...
  fedjax-tl run --config=configs/cifar10.py:method=fedrolex,mix=real-world
  fedjax-tl run --config=configs/cifar10.py:method=fjord --workdir=...

Variants (`FILE:key=value,...`, see fedjax_tl/published.py):
model=preresnet18|resnet18|mobilenetv2|cnn|mlp (default: the method's, as
above; cnn: HeteroFL's "conv" widths 64-128-256-512 plus a 512-unit dense
layer, no normalisation), alpha=iid|<Dirichlet alpha>,
mix=a|a-e|a-b-c-d-e|e|uniform|real-world|pset or any HeteroFL mix,
method=heterofl (5 local epochs = 250 steps of 10, SGD lr 0.1, momentum 0.9,
wd 5e-4, dynamic levels, 400 rounds IID / 800 non-IID)|fedrolex|fed_dropout
(1 epoch, rolling / random extraction, uniform mix)|fjord|fjord_kd (1 epoch
= 16 steps of 32, 500 rounds, p-set).

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
no CIFAR-10 here). With the papers' own models, near the published numbers:
HeteroFL's `accuracy` within about 3 points of its table (a 88-92, a-e
87-91, a-b-c-d-e 85-90, e 73-80), the ordering a >= a-e >= a-b-c-d-e > e,
and a - e between 8 and 20 points (published 14.1); HeteroFL's learning-rate
milestones are not expressed, which may cost a point or two. FjORD:
`per_tier_accuracy` within 3 points of its plot, within 4 points across
p >= 0.4, p = 0.2 lowest. With model=cnn (no normalisation or residual
blocks), not the ResNets' level: `accuracy` 75-85 for a and a-e, with the
same ordering. Non-IID accuracy swings 10-14 points between rounds: run
several seeds (`fedjax-tl sweep`). Cost (as the cost model counts it: 2
FLOPs a multiply-add of the convolution and dense kernels): the default
model, preresnet18, is 9,622,090 parameters (38.5 MB each way per
full-width client a round) and 657.9 MFLOP per example forward; resnet18
11,173,962 (44.7 MB) and 1,110.8 MFLOP; the CNN 2,605,194 (10.4 MB) and
118.9 MFLOP.

Data: download and prepare it yourself, on a machine with internet:
`tfds build cifar10 --file_format=array_record` (then `--config.data_dir`
if not tfds' default). Here it is checked only under tfds' mock data
(tests/test_configs.py: every model variant loads, validates and builds,
a round runs, costs as above).
"""

from fedjax_tl.published import published_config


def get_config(arg=None):
  return published_config("cifar10", arg)
