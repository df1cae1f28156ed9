"""MNIST under the published HeteroFL, FedRolex and FjORD setups.

From scratch (pretrain=none) on tfds `mnist`: 100 clients of 594 examples
(IID unless `alpha` is given), 10 a round, every client online; HeteroFL's
"conv" widths (64-128-256-512, plus a 512-unit dense layer) as our CNN, or
its "mlp" (512-256-128) with model=mlp:

  fedjax-tl run --config=configs/mnist.py --workdir=runs/mnist_a-e
  fedjax-tl run --config=configs/mnist.py:mix=e --workdir=runs/mnist_e
  fedjax-tl run --config=configs/mnist.py:alpha=0.1,mix=a-b-c-d-e

Variants as configs/cifar10.py (fedjax_tl/published.py): model, alpha, mix,
method. HeteroFL: 5 local epochs = 300 steps of 10, SGD lr 0.1, momentum
0.9, weight decay 5e-4, dynamic levels, 400 rounds IID / 800 non-IID.

Published: HeteroFL's paper has MNIST results; no figure of theirs is
restated here.

Band a reproduction should land in (an expectation, not measured: there is
no MNIST here): `accuracy` 98.5-99.7 for a, a-e and a-b-c-d-e, e (widths
4-8-16-32) at least 96, the ordering as on CIFAR-10 with gaps under 3
points. Cost: the full CNN is 1,817,610 parameters (7.3 MB each way per
full-width client a round), 80.5 MFLOP per example forward.

Data: download and prepare it yourself, on a machine with internet:
`tfds build mnist --file_format=array_record`. Here it is checked only
under tfds' mock data (tests/test_configs.py).
"""

from fedjax_tl.published import published_config


def get_config(arg=None):
  return published_config("mnist", arg)
