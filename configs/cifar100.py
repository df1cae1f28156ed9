"""CIFAR-100 (TFF's Pachinko partition: 500 train clients of 100 images)
under FedAvg, FedAdam and FedYogi as the adaptive-optimisation paper
publishes them, and a transfer variant from CIFAR-10.

Checked here on fixture files only: the real files cannot be downloaded on
the development machine (tests/test_natural_configs.py writes small TFF
HDF5 files and checks that every variant validates to the settings below;
the ResNet-18 is not run there, a round of it taking minutes on CPU).

  fedjax-tl run --config=configs/cifar100.py:data_path=DIR --workdir=runs/c100
  fedjax-tl run --config=configs/cifar100.py:method=fedadam,data_path=DIR
  fedjax-tl run --config=configs/cifar100.py:source=cifar10,data_path=DIR

DIR holds TFF's `fed_cifar100_{train,test}.h5` or fedjax's
`federated_cifar100_{train,test}.sqlite` (docs/data.md says where to get
them); `--config.data_path=DIR` works too (every client holds 100 images,
so the epoch is the same either way).

Variants (`FILE:key=value,...`):
  method    fedavg (default) | fedadam | fedyogi: the paper's task
            `cifar100_image` with that method's best learning rates.
  source    none (default, from scratch) | cifar10 (tfds; pretrain centrally
            on CIFAR-10, then migrate onto the CIFAR-100 clients) | FILE.npz
            (source_x [n, 32, 32, 3] in [0, 1]; source_y below 100).
  data_path the train file or its directory: sets config.data_path and counts
            one local epoch from the files (a path without commas).

Every setup: all 500 train clients (num_clients left to the files), 10 a
round, every client online, the full model for everyone (policy=full, one
tier of width 1), client SGD without momentum, one local epoch as
ceil(mean examples per client / batch) = ceil(100 / 20) = 5 local steps,
the engine's `resnet18` with GroupNorm of 2 groups (norm_groups=2), widths
64-128-256-512 (11,220,132 parameters at 100 classes), evaluated on all
10,000 test images (TFF's 100 test clients are others than its 500 train
clients).

Published settings, with where they come from:
- google-research/federated, optimization/docs/hyperparameters.md (commit
  a5af8c44, "Adaptive Federated Optimization", Reddi et al. 2021), task
  `cifar100_image`: 10 clients per round, batch size 20, 4,000 rounds,
  1 client epoch, image crop size 24, client SGD; best client / server
  learning rates (log10) and epsilon: FedAvg -1 / 0.5 (client 0.1, server
  3.162); FedAdam -1.5 / 0, eps -1; FedYogi -1.5 / 0, eps -1 (FedYogi the
  best method for this task there). Its optimization/README.md: the model
  is a ResNet-18 with GroupNorm layers; FedAvg is `--server_optimizer=sgd`,
  FedYogi's initial accumulator 0; Adam's and Yogi's beta1, beta2 the Keras
  defaults 0.9 and 0.999 (hyperparameters.md).
- The ResNet-18 then (google-research/federated utils/models/
  resnet_models.py, commit 49a4345, used by optimization/cifar100/
  federated_cifar100.py with crop_size=24): a 7x7 stride-2 stem with max
  pooling and tfa's GroupNormalization at its default group count, 2 until
  tensorflow/addons#2241 (November 2020) made it 32. TFF's current copy
  (tensorflow_federated/python/simulation/models/resnet_models.py, commit
  19114c5c) uses Keras' GroupNormalization, default 32 groups.
- tensorflow/federated, tensorflow_federated/python/simulation/datasets/
  cifar100.py (commit 19114c5c): 500 train and 100 test clients, each of
  100 images, drawn by the Pachinko Allocation Method (coarse labels
  Dirichlet 0.1, fine given coarse Dirichlet 10); simulation/baselines/
  cifar100/image_classification_tasks.py DEFAULT_CROP_HEIGHT/WIDTH 24
  (`distort_train_images` off by default), and
  image_classification_preprocessing.py: images centre-cropped (randomly
  cropped and flipped when distorted) and per-image standardised.
- google/fedjax, experiments/fed_avg/fed_avg.CIFAR100_LOGISTIC.flags
  (commit c57ee197) is a logistic-regression setup (server Yogi lr 0.1,
  beta2 0.999, epsilon 0.01, client SGD lr 0.01, batch 20, 4,000 rounds,
  10 clients) on fedjax's `preprocess_batch_tff`; not built here (no
  logistic model in this engine).
- Accuracy: none of these repositories' files states a CIFAR-100 accuracy
  (the paper's tables are in the paper only, not restated here). Band a
  reproduction should land in: none stated, for the same reason.

Not expressed: the 24x24 crops and per-image standardisation (the engine
reads the full 32x32 images scaled to [0, 1]); the stem (this
resnet18 has a 3x3 stride-1 stem without pooling, docs/models.md); the
paper's beta2 = 0.999 (this engine's fedadam / fedyogi use 0.99;
algorithms.server_optimizer).

The transfer variant (source=cifar10) has no published counterpart: the
server pretrains on tfds `cifar10` (50,000 train images) for
pretrain_steps=600 steps of 64 at lr 0.05 (the engine's defaults, not a
published setting), then the clients run the setup above from that model.
CIFAR-10's labels 0-9 land on CIFAR-100's fine labels 0-9 (apple,
aquarium fish, baby, bear, beaver, bed, bee, beetle, bicycle, bottle),
which are other classes: what transfers is the backbone, so the head is
set back to its fresh init after pretraining (pretrain_reinit=head/.*).
Prepare the source on a machine with internet: `tfds build
cifar10 --file_format=array_record` (`--config.data_dir` if not tfds'
default).
"""

import ml_collections

from fedjax_tl.published import (fail_variant, natural_config,
                                 parse_variants)

VARIANT_KEYS = ("method", "source", "data_path")
# TFF's cifar100.load_data docstring: each train client holds 100 images.
TFF_CLIENT_EXAMPLES = 100
# The paper's ResNet-18: tfa GroupNormalization's default then (2 groups).
NORM_GROUPS = 2
# Each method's published client and server training (module docstring).
_REDDI = dict(batch_size=20, num_rounds=4000, eval_every=10)
METHODS = {
    "fedavg": dict(_REDDI, algorithm="fedavg", client_lr=10 ** -1,
                   server_lr=10 ** 0.5, server_eps=1e-3),
    "fedadam": dict(_REDDI, algorithm="fedadam", client_lr=10 ** -1.5,
                    server_lr=10 ** 0, server_eps=10 ** -1),
    "fedyogi": dict(_REDDI, algorithm="fedyogi", client_lr=10 ** -1.5,
                    server_lr=10 ** 0, server_eps=10 ** -1),
}


def get_config(arg=None) -> ml_collections.ConfigDict:
  v = {"method": "fedavg", "source": "none",
       **parse_variants(arg, VARIANT_KEYS)}
  if v["method"] not in METHODS:
    fail_variant("method", v["method"],
                 f"must be one of {', '.join(METHODS)}")
  if not (v["source"] in ("none", "cifar10") or v["source"].endswith(".npz")):
    fail_variant("source", v["source"],
                 "must be none, cifar10 (tfds) or an .npz file")
  c = natural_config("cifar100", METHODS[v["method"]], v.get("data_path"),
                     TFF_CLIENT_EXAMPLES)
  c.source = v["source"]
  if v["source"] != "none":  # another label set: a new head
    c.pretrain_reinit = ("head/.*",)
  c.model = "resnet18"
  c.norm = "group"
  c.norm_groups = NORM_GROUPS
  return c
