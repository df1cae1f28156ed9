"""Shakespeare next-character prediction (715 speaking roles) under FedAvg,
FedAdam and FedYogi as the adaptive-optimisation paper and fedjax publish
them, with fedjax's LSTM or a Transformer language model.

Checked here on fixture files only: the real files cannot be downloaded on
the development machine (tests/test_natural_configs.py writes small fedjax
SQLite files and checks that every variant validates to the settings below,
and that a few tiny rounds run).

  fedjax-tl run --config=configs/shakespeare.py:data_path=DIR --workdir=runs/sh
  fedjax-tl run --config=configs/shakespeare.py:data_path=DIR,method=fedyogi
  fedjax-tl run --config=configs/shakespeare.py:data_path=DIR,method=fedjax
  fedjax-tl run --config=configs/shakespeare.py:data_path=DIR,model=transformer

DIR holds fedjax's `shakespeare_{train,test}.sqlite` or TFF's
`shakespeare_{train,test}.h5` (docs/data.md says where to get them). The
`data_path` variant is required: the published local training is one epoch
of each client's sequences, which this config turns into a fixed number of
local steps from the files (no publisher states the sequences per client).

Variants (`FILE:key=value,...`):
  data_path the train file or its directory (required; a path without
            commas): sets config.data_path and counts the epoch.
  method    fedavg (default) | fedadam | fedyogi: the adaptive-optimisation
            paper's task `shakespeare_character` with that method's best
            learning rates; fedjax: fedjax's SHAKESPEARE_CHARACTER flags.
  model     lstm (default): fedjax's and TFF's model, an 8-wide character
            embedding, two LSTM layers of 256, a dense layer to the 90
            logits | transformer: the engine's causal Transformer LM at its
            own sizes (embed 256, 8 heads, MLP 512, 4 layers; docs/models.md)
            under the same federated settings; no publisher states a
            Transformer setup for this task, so its settings are the LSTM's,
            untuned.

Every setup: all train roles are clients (num_clients left to the files:
715), 10 a round, every client online, the full model for everyone
(policy=full, one tier of width 1), client SGD without momentum, sequences
of 80 characters (data.text.SEQ_LEN; not a key), one local epoch as
ceil(mean sequences per client / batch) local steps (the engine runs the
same number of steps on every client: a smaller client wraps around its
sequences, a larger one sees part of them). The vocabulary, markers and
what accuracy counts are fedjax's (docs/models.md, the text task).

Published settings, with where they come from:
- google-research/federated, optimization/docs/hyperparameters.md (commit
  a5af8c44, "Adaptive Federated Optimization", Reddi et al. 2021), task
  `shakespeare_character`: 10 clients per round, batch size 4, 1,200
  rounds, 1 client epoch, character sequence length 80, client SGD; best
  client / server learning rates (log10) and epsilon: FedAvg 0 / 0 (both
  1); FedAdam 0 / -2, eps -3; FedYogi 0 / -2, eps -3. Its
  optimization/README.md: FedAvg is `--server_optimizer=sgd`, FedYogi's
  initial accumulator 0; Adam's and Yogi's beta1, beta2 the Keras defaults
  0.9 and 0.999 (hyperparameters.md). The model: optimization/shakespeare/
  federated_shakespeare.py (commit 49a4345, sequence_length=80), TFF's
  `create_recurrent_model`.
- google/fedjax, experiments/fed_avg/fed_avg.SHAKESPEARE_CHARACTER.flags
  (commit c57ee197): 1,500 rounds, 10 clients per round, server SGD lr 1,
  client SGD lr 0.03162278, batch size 10; local epochs not set, so
  fedjax/core/client_datasets.py's ShuffleRepeatBatchHParams default,
  num_epochs=1. The model: fedjax/training/tasks.py SHAKESPEARE_CHARACTER =
  fedjax/models/shakespeare.py `create_lstm_model()` (embed_size 8,
  lstm_hidden_size 256, lstm_num_layers 2); fedjax/datasets/shakespeare.py
  `load_data(sequence_length=80)`.
- tensorflow/federated (commit 19114c5c): tensorflow_federated/python/
  simulation/datasets/shakespeare.py, 715 users, 16,068 train and 2,356
  test snippets (each role's snippets split across train and test);
  simulation/baselines/shakespeare/char_prediction_tasks.py
  DEFAULT_SEQUENCE_LENGTH = 80; char_prediction_models.py: embedding 8, two
  LSTM layers of 256 units.
- Accuracy: none of these repositories' files states a Shakespeare
  accuracy (fedjax's fed_avg experiments have no results README; the
  paper's tables are in the paper only, not restated here). Band a
  reproduction should land in: none stated, for the same reason.

Not expressed: the paper's beta2 = 0.999 (this engine's fedadam / fedyogi
use 0.99, the default of fedjax's adam_beta2 flag;
algorithms.server_optimizer), variable local epochs (fixed steps
instead). fedjax's train loss is the per-sequence mean over all 80
positions with PAD zeroed; this engine's skips PAD targets
(data.text.LOSS_IGNORED).

There is no source task for text: `source` must stay none (pretrain=none or
a checkpoint path).
"""

import ml_collections

from fedjax_tl.errors import ConfigError
from fedjax_tl.published import (fail_variant, natural_config,
                                 parse_variants)

VARIANT_KEYS = ("method", "model", "data_path")
MODELS = ("lstm", "transformer")
# fedjax's create_lstm_model() / TFF's create_recurrent_model sizes.
LSTM_EMBED = 8
LSTM_HIDDEN = (256, 256)
# Each method's published client and server training (module docstring).
_REDDI = dict(batch_size=4, num_rounds=1200, eval_every=10)
METHODS = {
    "fedavg": dict(_REDDI, algorithm="fedavg", client_lr=10 ** 0,
                   server_lr=10 ** 0, server_eps=1e-3),
    "fedadam": dict(_REDDI, algorithm="fedadam", client_lr=10 ** 0,
                    server_lr=10 ** -2, server_eps=10 ** -3),
    "fedyogi": dict(_REDDI, algorithm="fedyogi", client_lr=10 ** 0,
                    server_lr=10 ** -2, server_eps=10 ** -3),
    "fedjax": dict(algorithm="fedavg", client_lr=0.03162278, server_lr=1.0,
                   server_eps=1e-3, batch_size=10, num_rounds=1500,
                   eval_every=5),
}


def get_config(arg=None) -> ml_collections.ConfigDict:
  v = {"method": "fedavg", "model": "lstm",
       **parse_variants(arg, VARIANT_KEYS)}
  if v["method"] not in METHODS:
    fail_variant("method", v["method"],
                 f"must be one of {', '.join(METHODS)}")
  if v["model"] not in MODELS:
    fail_variant("model", v["model"], f"must be one of {', '.join(MODELS)}")
  if "data_path" not in v:
    raise ConfigError(
        "configs/shakespeare.py needs the variant data_path=FILE_OR_DIR "
        "(--config=configs/shakespeare.py:data_path=...): its one local "
        "epoch is counted from the files")
  c = natural_config("shakespeare", METHODS[v["method"]], v["data_path"])
  c.model = v["model"]
  if v["model"] == "lstm":
    c.embed_dim = LSTM_EMBED
    c.hidden = LSTM_HIDDEN
  return c
