"""Shakespeare next-character prediction, as fedjax defines the task.

The vocabulary is fedjax's (`fedjax.datasets.shakespeare`, itself the TFF
text-generation tutorial's 86 characters): ids 0, 1, 2 are the reserved
PAD, BOS and EOS; the 86 characters of :data:`VOCAB` are ids 3..88 in that
order; every other byte is OOV, id 89; :data:`VOCAB_SIZE` = 90 logits.
Text is encoded byte by byte, as fedjax encodes its byte snippets: a str is
first encoded as UTF-8, so a non-ASCII character is one OOV per byte
('é' is two OOVs).

A client's snippets are joined into one id sequence, each snippet framed by
BOS and EOS, and cut into `seq_len`-long input/target pairs, the targets
the inputs shifted by one; the last pair is PAD-filled. With `seq_len=3`,
`["ABCD", "E"]` gives

    x: [BOS A B] [C D EOS]   [BOS E PAD]
    y: [A B C]   [D EOS BOS] [E EOS PAD]

What is counted (see :data:`LOSS_IGNORED`, :data:`ACCURACY_IGNORED`): the
training loss and the evaluation loss skip PAD targets only; accuracy also
skips OOV, BOS and EOS targets ("padding, out-of-vocabulary and sequence
markers excluded", as TFF's Shakespeare task counts and fedjax's
`accuracy_in_vocab` intends), and takes the argmax over all 90 logits, so
predicting a marker or OOV is a mistake.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fedjax_tl.data.federated import Dataset, FederatedData, TransferData
from fedjax_tl.data.natural.load import cut_facts, test_split
from fedjax_tl.errors import DataError

# fedjax's character table (ids NUM_RESERVED + i), byte for byte.
VOCAB = (b"dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\n"
         b"aeimquyAEIMQUY]!%)-159\r")
PAD, BOS, EOS = 0, 1, 2
NUM_RESERVED = 3
OOV = NUM_RESERVED + len(VOCAB)  # 89
VOCAB_SIZE = OOV + 1  # 90: the LM's logits
SEQ_LEN = 80  # fedjax's and TFF's sequence length

# Target ids the losses skip, and those accuracy skips.
LOSS_IGNORED: tuple[int, ...] = (PAD,)
ACCURACY_IGNORED: tuple[int, ...] = (PAD, BOS, EOS, OOV)


def _table() -> np.ndarray:
  """`[256]` int32: each byte's id (OOV for bytes outside VOCAB)."""
  table = np.full(256, OOV, np.int32)
  table[np.frombuffer(VOCAB, np.uint8)] = NUM_RESERVED + np.arange(
      len(VOCAB), dtype=np.int32)
  return table


TABLE = _table()


def _as_bytes(snippet: str | bytes) -> bytes:
  return snippet.encode("utf-8") if isinstance(snippet, str) else bytes(
      snippet)


def encode_text(snippet: str | bytes) -> np.ndarray:
  """`[bytes]` int32 ids of one snippet's (UTF-8) bytes, no markers."""
  return TABLE[np.frombuffer(_as_bytes(snippet), np.uint8)]


def decode(ids: Sequence[int]) -> str:
  """The text of character ids (markers shown as <pad>, <bos>, <eos>,
  <oov>), for logs and tests; the inverse of :func:`encode_text` on VOCAB
  text."""
  names = {PAD: "<pad>", BOS: "<bos>", EOS: "<eos>", OOV: "<oov>"}
  return "".join(names.get(int(i)) or chr(VOCAB[int(i) - NUM_RESERVED])
                 for i in ids)


def num_sequences(snippets: Sequence[str | bytes], seq_len: int = SEQ_LEN
                  ) -> int:
  """How many `seq_len` sequences :func:`encode_snippets` makes of
  `snippets` (0 for none)."""
  joined = sum(len(_as_bytes(s)) + 2 for s in snippets)
  return -(-(joined - 1) // seq_len) if joined else 0


def encode_snippets(snippets: Sequence[str | bytes], seq_len: int = SEQ_LEN
                    ) -> tuple[np.ndarray, np.ndarray]:
  """One client's snippets as `(x, y)`, int32 `[n, seq_len]` each.

  The snippets are joined, each as `BOS, chars, EOS`; `x` is the joined
  sequence without its last id and `y` without its first, both cut into
  rows of `seq_len` and PAD-filled at the end (the module docstring's
  example). No snippets: `n` = 0.
  """
  if seq_len < 1:
    raise ValueError(f"seq_len must be at least 1, not {seq_len}")
  parts = [np.concatenate([[BOS], encode_text(s), [EOS]]).astype(np.int32)
           for s in snippets]
  joined = np.concatenate(parts) if parts else np.zeros(0, np.int32)
  n = num_sequences(snippets, seq_len)
  x = np.full(n * seq_len, PAD, np.int32)
  y = np.full(n * seq_len, PAD, np.int32)
  if n:
    x[:joined.size - 1] = joined[:-1]
    y[:joined.size - 1] = joined[1:]
  return x.reshape(n, seq_len), y.reshape(n, seq_len)


def federated_text(clients: Sequence[Sequence[str | bytes]],
                   seq_len: int = SEQ_LEN, max_sequences: int | None = None,
                   client_ids: Sequence[str] | None = None
                   ) -> tuple[FederatedData, int]:
  """Per-client snippet lists as padded FederatedData, and the sequences
  the cap cut.

  Client i's sequences are :func:`encode_snippets` of `clients[i]`, padded
  with PAD rows to the largest client's (`x`, `y` int32 `[clients,
  max_examples, seq_len]`, `count` its sequences). `max_sequences` keeps
  each client's first that many sequences (fedjax's `max_examples`-style
  cap; None: all); the second value is how many were cut in all.
  """
  encoded = [encode_snippets(s, seq_len) for s in clients]
  full = np.array([len(x) for x, _ in encoded], np.int32)
  count = full if max_sequences is None else np.minimum(full, max_sequences)
  width = max(int(count.max(initial=0)), 1)
  x = np.full((len(encoded), width, seq_len), PAD, np.int32)
  y = np.full((len(encoded), width, seq_len), PAD, np.int32)
  for i, (xi, yi) in enumerate(encoded):
    x[i, :count[i]] = xi[:count[i]]
    y[i, :count[i]] = yi[:count[i]]
  ids = None if client_ids is None else tuple(client_ids)
  return FederatedData(x, y, count, ids), int((full - count).sum())



def load_text_transfer(kind: str, data_path: str, *, data_format: str = "auto",
                       num_clients: int | None = None,
                       max_client_examples: int | None = None,
                       seq_len: int = SEQ_LEN, seed: int = 0) -> TransferData:
  """Shakespeare's files (any format `data.natural` reads) as the
  next-character task: TransferData of token sequences.

  `clients` are the first `num_clients` train roles' sequences
  (:func:`federated_text`, each capped at its first `max_client_examples`
  sequences), `client_test` the same roles' test sequences capped alike,
  `target_test` every test sequence of those roles, uncapped. There is no
  source task: `source_train` and `source_test` are `target_test` (a run
  trains from scratch, or from a checkpoint). The losses skip PAD, accuracy
  also OOV and the sequence markers.

  Raises:
    DataError: naming the file, for files that do not read, or a choice of
      roles without any test sequence.
  """
  from fedjax_tl.data.natural import find_files, read_text_splits
  if kind != "shakespeare":
    raise DataError(f"{kind}: its text task is not built; the text task "
                    "is shakespeare's")
  files = find_files(kind, data_path, data_format)
  ids, texts = read_text_splits(kind, data_path, data_format=data_format,
                                num_clients=num_clients, seed=seed)
  train, test = texts["train"], texts["test"]
  clients, _ = federated_text(train["text"], seq_len, max_client_examples,
                              ids)
  client_test, _ = federated_text(test["text"], seq_len, max_client_examples,
                                  ids)
  every = [encode_snippets(s, seq_len) for s in test["text"]]
  target = Dataset(x=np.concatenate([x for x, _ in every]),
                   y=np.concatenate([y for _, y in every]))
  if not len(target):
    raise DataError(f"{files.origin}: the test split holds no text of the "
                    f"chosen {len(ids)} roles")
  sizes = [num_sequences(s, seq_len) for s in train["text"]]
  facts = {"files": files.origin, "format": files.format,
           "test_split": test_split(files), "clients": len(ids),
           "examples": sum(sizes), "test_examples": len(target),
           "seq_len": seq_len,
           **cut_facts(sizes, max_client_examples)}
  return TransferData(name=kind, source_train=target, source_test=target,
                      clients=clients, target_test=target,
                      num_classes=VOCAB_SIZE, client_test=client_test,
                      facts=facts, loss_ignored=LOSS_IGNORED,
                      accuracy_ignored=ACCURACY_IGNORED)
