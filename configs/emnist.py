"""EMNIST (byclass, 62 classes) as a stand-in for FjORD's FEMNIST setup.

FEMNIST's clients are writers; tfds `emnist` has no writer ids, so the
3,400 clients (about FEMNIST's number of writers, 204 examples each) get a
Dirichlet(1.0) label skew instead. From scratch, 10 clients a round, every
client online, FjORD by default (ordered dropout over p = 0.2 .. 1.0,
1 local epoch = 7 steps of 32, SGD lr 0.1, 500 rounds):

  fedjax-tl run --config=configs/emnist.py --workdir=runs/emnist_fjord
  fedjax-tl run --config=configs/emnist.py:method=fjord_kd --workdir=...
  fedjax-tl run --config=configs/emnist.py:method=heterofl,mix=a-e

Variants as configs/cifar10.py (fedjax_tl/published.py): model, alpha
(default 1), mix, method (default fjord).

Published: FjORD reports FEMNIST results, but no figure is restated here.

Band a reproduction should land in (an expectation, not measured: there is
no EMNIST here): `accuracy` 80-87 (EMNIST byclass tops out near 88 even
centrally), `per_tier_accuracy` within 3 points across p >= 0.4.
Cost: the full CNN is 1,844,286 parameters (7.4 MB each way per
full-width client a round), 80.5 MFLOP per example forward.

Data: download and prepare it yourself, on a machine with internet:
`tfds build emnist --file_format=array_record` (about 700,000 training
images). Here it is checked only under tfds' mock data
(tests/test_configs.py).
"""

from fedjax_tl.published import published_config


def get_config(arg=None):
  return published_config("emnist", arg, num_clients=3400,
                          defaults={"alpha": "1", "method": "fjord"})
