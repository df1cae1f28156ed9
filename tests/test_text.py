"""The Shakespeare text task: fedjax's character vocabulary and sequences,
and the loss and accuracy over them, each against plain Python."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_tl.client import cross_entropy
from fedjax_tl.data import text
from fedjax_tl.data.federated import Dataset, FederatedData
from fedjax_tl.evaluation import make_evaluator, make_local_evaluator
from fedjax_tl.models import build_model
from natural_files import write_roles

# Unicode on purpose: 'Ç', 'é', 'ß' and '—' are 2- or 3-byte UTF-8, each
# byte one OOV, as fedjax encodes its byte snippets.
SNIPPETS = ["To be, or not to be", "Ça va? ß", "", "O Romeo!\nRomeo.—",
            "[Exit] 1599 ~"]
# fedjax's table, written out: its 86 characters, ids 3.. in this order.
FEDJAX_CHARS = ("dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*"
                ".26:\naeimquyAEIMQUY]!%)-159\r")


def _python_ids(snippet: str) -> list[int]:
  ids = {c: 3 + i for i, c in enumerate(FEDJAX_CHARS)}
  return [ids.get(chr(b), 89) for b in snippet.encode("utf-8")]


def _python_sequences(snippets, seq_len):
  """fedjax's preprocessing, with lists."""
  joined = []
  for s in snippets:
    joined += [1] + _python_ids(s) + [2]
  xs, ys = joined[:-1], joined[1:]
  n = math.ceil(len(xs) / seq_len)
  pad = lambda seq: seq + [0] * (n * seq_len - len(seq))
  rows = lambda seq: [pad(seq)[i * seq_len:(i + 1) * seq_len]
                      for i in range(n)]
  return rows(xs), rows(ys)


def test_the_vocabulary_is_fedjax_s():
  assert text.VOCAB.decode() == FEDJAX_CHARS
  assert len(set(FEDJAX_CHARS)) == 86
  assert (text.PAD, text.BOS, text.EOS, text.OOV, text.VOCAB_SIZE) == (
      0, 1, 2, 89, 90)
  assert set(text.ACCURACY_IGNORED) == {0, 1, 2, 89}
  assert tuple(text.LOSS_IGNORED) == (0,)


@pytest.mark.parametrize("seq_len", [1, 3, 7, 80])
def test_snippets_encode_as_fedjax_preprocesses_them(seq_len):
  x, y = text.encode_snippets(SNIPPETS, seq_len)
  px, py = _python_sequences(SNIPPETS, seq_len)
  assert x.dtype == y.dtype == np.int32
  assert x.tolist() == px and y.tolist() == py
  assert text.num_sequences(SNIPPETS, seq_len) == len(px)


def test_fedjax_s_docstring_example():
  x, y = text.encode_snippets([b"ABCD", b"E"], 3)
  a, b, c, d, e = (text.encode_text(ch)[0] for ch in "ABCDE")
  assert x.tolist() == [[1, a, b], [c, d, 2], [1, e, 0]]
  assert y.tolist() == [[a, b, c], [d, 2, 1], [e, 2, 0]]
  assert text.decode(x.ravel()) == "<bos>ABCD<eos><bos>E<pad>"
  assert text.encode_snippets([], 3)[0].shape == (0, 3)


def test_federated_text_pads_caps_and_keeps_ids():
  clients = [SNIPPETS, ["ab"], [], SNIPPETS[:1]]
  data, cut = text.federated_text(clients, seq_len=5, max_sequences=4,
                                  client_ids=["a", "b", "c", "d"])
  full = [len(_python_sequences(c, 5)[0]) if c else 0 for c in clients]
  assert data.count.tolist() == [min(n, 4) for n in full]
  assert cut == sum(n - min(n, 4) for n in full)
  assert data.x.shape == (4, 4, 5) and data.client_ids == ("a", "b", "c",
                                                           "d")
  px, py = _python_sequences(SNIPPETS, 5)
  assert data.x[0].tolist() == px[:4] and data.y[0].tolist() == py[:4]
  assert not data.x[1, 1:].any() and not data.y[2].any()  # padding rows


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_the_loss_skips_padding():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 6, 90)).astype(np.float32)
  _, y = text.encode_snippets(SNIPPETS[:2], 6)
  y = y[:3]
  nll = -np.take_along_axis(_log_softmax(logits), y[..., None], -1)[..., 0]
  expected = sum(nll[i, t] for i in range(3) for t in range(6) if y[i, t]) / (
      sum(1 for v in y.ravel() if v))
  got = cross_entropy(jnp.asarray(logits), jnp.asarray(y),
                      ignored=text.LOSS_IGNORED)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  # Without ignored labels, the plain mean (classification's).
  np.testing.assert_allclose(float(cross_entropy(logits, y)), nll.mean(),
                             rtol=1e-5)


def _lm_and_test_set(seq_len=6):
  model = build_model("lstm", (seq_len,), text.VOCAB_SIZE, seed=0,
                      embed_dim=4, hidden=(8,))
  x, y = text.encode_snippets(SNIPPETS, seq_len)
  return model, Dataset(x, y)


def _python_accuracy(logits, y, held=None):
  """Correct / counted over every target outside PAD, BOS, EOS, OOV; with
  `held[i]`, the argmax only over those labels."""
  correct = counted = 0
  for i in range(y.shape[0]):
    for t in range(y.shape[1]):
      target = int(y[i, t])
      if target in (0, 1, 2, 89):
        continue
      scores = list(logits[i, t])
      labels = range(90) if held is None else sorted(held[i])
      guess = max(labels, key=lambda c: scores[c])
      correct += guess == target
      counted += 1
  return correct, counted


def test_accuracy_and_loss_count_what_fedjax_counts():
  model, test = _lm_and_test_set()
  logits = np.asarray(model.apply(model.init_params, test.x), np.float64)
  correct, counted = _python_accuracy(logits, test.y)
  nll = -np.take_along_axis(_log_softmax(logits), test.y[..., None], -1)
  real = test.y != 0
  evaluate = make_evaluator(model, test, batch_size=2,
                            loss_ignored=text.LOSS_IGNORED,
                            accuracy_ignored=text.ACCURACY_IGNORED)
  acc, loss = evaluate(model.init_params, [1.0])
  assert counted < real.sum() < test.y.size  # markers and OOVs left out
  np.testing.assert_allclose(acc[0], correct / counted, rtol=1e-6)
  np.testing.assert_allclose(loss[0], nll[..., 0][real].mean(), rtol=1e-5)


def test_local_accuracy_of_sequences_counts_held_characters():
  model, test = _lm_and_test_set()
  n = test.x.shape[0]
  # Two devices, their train sequences halves of the test set's.
  rows = [np.arange(n)[: n // 2], np.arange(n)[n // 2:]]
  pad = lambda a, k: np.concatenate([a, np.zeros((k - len(a),) + a.shape[1:],
                                                 a.dtype)])
  k = max(map(len, rows))
  fed = FederatedData(np.stack([pad(test.x[r], k) for r in rows]),
                      np.stack([pad(test.y[r], k) for r in rows]),
                      np.array([len(r) for r in rows], np.int32))
  tier = np.array([0, 1])
  local = make_local_evaluator(model, fed, fed, text.VOCAB_SIZE, tier, 2,
                               batch_size=3,
                               accuracy_ignored=text.ACCURACY_IGNORED)
  overall, per_tier = local(model.init_params, [1.0, 1.0])
  logits = np.asarray(model.apply(model.init_params, test.x), np.float64)
  counts = []
  for r in rows:
    held = set(test.y[r].ravel().tolist())
    counts.append(_python_accuracy(logits[r], test.y[r],
                                   [held] * len(r)))
  np.testing.assert_allclose(per_tier, [c / m for c, m in counts],
                             rtol=1e-6)
  np.testing.assert_allclose(overall, sum(c for c, _ in counts) /
                             sum(m for _, m in counts), rtol=1e-6)


ROLES = {"HAMLET": SNIPPETS[:2] + ["Words, words, words."],
         "OPHELIA": ["Good my lord,", "How does your honour?", "Ay."],
         "GHOST": SNIPPETS[3:] + ["Remember me."]}


def test_the_files_load_as_fedjax_s_sequences(tmp_path):
  write_roles(tmp_path, ROLES)
  data = text.load_text_transfer("shakespeare", str(tmp_path), seq_len=8,
                                 max_client_examples=3)
  assert data.clients.client_ids == tuple(ROLES)  # the file's order
  assert data.num_classes == 90 and data.loss_ignored == (0,)
  want_cut = 0
  for row, snippets in enumerate(ROLES.values()):
    xs, ys = _python_sequences(snippets[:-1], 8)
    n = min(len(xs), 3)
    want_cut += len(xs) - n
    assert data.clients.count[row] == n
    np.testing.assert_array_equal(data.clients.x[row, :n], xs[:n])
    np.testing.assert_array_equal(data.clients.y[row, :n], ys[:n])
    tx, ty = _python_sequences(snippets[-1:], 8)
    assert data.client_test.count[row] == min(len(tx), 3)
  test_rows = [r for s in ROLES.values() for r in
               zip(*_python_sequences(s[-1:], 8))]
  np.testing.assert_array_equal(data.target_test.x, [x for x, _ in test_rows])
  np.testing.assert_array_equal(data.target_test.y, [y for _, y in test_rows])
  assert data.facts["examples_cut"] == want_cut
  assert data.target_test.x.dtype == np.int32


@pytest.mark.slow
@pytest.mark.parametrize("model", [
    ["--config.model=lstm", "--config.hidden=(8, 8)",
     "--config.embed_dim=4"],
    ["--config.model=transformer", "--config.embed_dim=8",
     "--config.num_heads=2", "--config.mlp_dim=8", "--config.num_layers=1"],
], ids=["lstm", "transformer"])
def test_a_run_on_shakespeare_files_trains_each_language_model(tmp_path,
                                                               model):
  from fedjax_tl import cli
  rng = np.random.default_rng(0)
  words = ["to", "be", "or", "not", "my", "lord", "the", "king", "é"]
  roles = {f"ROLE{i}": [" ".join(rng.choice(words, rng.integers(2, 9)))
                        for _ in range(2 + i % 3)] for i in range(6)}
  write_roles(tmp_path, roles)
  workdir = tmp_path / "w"
  code = cli.main(["run", f"--workdir={workdir}", "--no-progress",
                   "--config.data=shakespeare", f"--config.data_path={tmp_path}",
                   *model, "--config.clients_per_round=3",
                   "--config.num_rounds=2", "--config.eval_every=1",
                   "--config.batch_size=2", "--config.local_steps=1",
                   "--config.local_test_examples=0",
                   "--config.tier_fractions=(1.0, 0.5)",
                   "--config.tier_proportions=(0.5, 0.5)"])
  assert code == 0
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["num_clients"] == 6 and summary["pretrain"] == "none"
  sequences = sum(math.ceil((sum(len(s.encode()) + 2 for s in r[:-1]) - 1)
                          / 80) for r in roles.values())
  assert summary["data_facts"]["client_examples"] == sequences
  assert summary["source_accuracy"] is None  # no source task
  assert 0 <= summary["accuracy"] <= 1


@pytest.mark.parametrize("overrides,needle", [
    (dict(model="mlp"), "cannot read text"),
    (dict(source="mnist"), "has no source task"),
    (dict(data="stackoverflow"), "its task is not built yet"),
    (dict(attack="label_flip"), "flips class labels"),
])
def test_config_refuses_what_shakespeare_cannot_run(tmp_path, overrides,
                                                    needle):
  from fedjax_tl import config as config_lib
  from fedjax_tl.errors import ConfigError
  write_roles(tmp_path, ROLES)
  cfg = config_lib.default_config()
  cfg.data, cfg.data_path, cfg.model = "shakespeare", str(tmp_path), "lstm"
  for key, value in overrides.items():
    cfg[key] = value
  with pytest.raises(ConfigError, match=needle):
    config_lib.validate(cfg)


def test_config_refuses_the_lstm_on_images():
  from fedjax_tl import config as config_lib
  from fedjax_tl.errors import ConfigError
  cfg = config_lib.default_config()
  cfg.model = "lstm"
  with pytest.raises(ConfigError, match="reads token ids"):
    config_lib.validate(cfg)


def test_flat_features_are_not_read_as_token_ids(tmp_path, capsys):
  # A transformer reads 1-D inputs as token ids: float features of shape
  # [6] are refused in one line, exit 2, nothing written.
  from fedjax_tl import cli
  rng = np.random.default_rng(0)
  flat = lambda n: rng.random((n, 6)).astype(np.float32)
  np.savez(tmp_path / "flat.npz", num_classes=3, source_x=flat(50),
           source_y=rng.integers(0, 3, 50),
           clients_x=rng.random((10, 8, 6)).astype(np.float32),
           clients_y=rng.integers(0, 3, (10, 8)), clients_count=np.full(10, 8),
           test_x=flat(20), test_y=rng.integers(0, 3, 20))
  code = cli.main(["run", f"--workdir={tmp_path / 'w'}", "--no-progress",
                   f"--config.data={tmp_path / 'flat.npz'}",
                   "--config.model=transformer", "--config.num_clients=10",
                   "--config.clients_per_round=2"])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1, err
  assert "reads inputs of shape (6,) as token ids" in err
  assert not (tmp_path / "w").exists()


def test_integer_features_are_token_ids_only_with_a_label_per_position():
  from fedjax_tl.data.checks import check_federated
  from fedjax_tl.errors import DataError
  x = np.ones((2, 3, 5), np.int32)
  count = np.array([3, 1], np.int32)
  check_federated("f", "clients", FederatedData(x, x.copy(), count), 90)
  with pytest.raises(DataError, match="must be floating point"):
    check_federated("f", "clients", FederatedData(
        x, np.zeros((2, 3), np.int32), count), 90)
  bad = x.copy()
  bad[1, 0, 2] = 90  # a real example's target outside the vocabulary
  with pytest.raises(DataError, match=r"labels outside \[0, 90\).*e\.g\. 90"):
    check_federated("f", "clients", FederatedData(x, bad, count), 90)
  bad[1, 0, 2], bad[1, 2, 0] = 1, 95  # padding is not looked at
  check_federated("f", "clients", FederatedData(x, bad, count), 90)
