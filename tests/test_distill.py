"""Server distillation (policy=distill): its loss and FLOPs by hand, its effect
on the narrow slices, its config keys, and its cost in the run's summary."""

import json

import jax
import numpy as np
import pytest

from conftest import tiny_config, tiny_config_dict
from fedjax_tl import config as config_lib
from fedjax_tl import runner
from fedjax_tl.client import distillation_loss
from fedjax_tl.data.digits import load_digits_transfer
from fedjax_tl.data.federated import Dataset
from fedjax_tl.errors import ConfigError
from fedjax_tl.evaluation import make_evaluator
from fedjax_tl.models import build_model
from fedjax_tl.policies.transfer import distill, pretrain


def _numpy_kd(teacher, student, temperature):
  """T^2 x mean over rows of KL(softmax(t/T) || softmax(s/T)), in float64."""
  def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
  p = softmax(np.float64(teacher) / temperature)
  q = softmax(np.float64(student) / temperature)
  return temperature**2 * np.mean(np.sum(p * np.log(p / q), -1))


@pytest.mark.parametrize("temperature", [1.0, 2.5, 4.0])
def test_distillation_loss_by_hand(temperature):
  rng = np.random.default_rng(0)
  teacher = rng.normal(size=(5, 4)).astype(np.float32) * 3
  student = rng.normal(size=(5, 4)).astype(np.float32) * 3
  np.testing.assert_allclose(
      distillation_loss(teacher, student, temperature),
      _numpy_kd(teacher, student, temperature), rtol=1e-5)
  # A student equal to its teacher has nothing left to learn.
  np.testing.assert_allclose(distillation_loss(teacher, teacher, temperature),
                             0.0, atol=1e-6)


def _mlp_flops(d_in, hidden, classes):
  """Forward FLOPs per example of a ReLU MLP, 2 per multiply-add."""
  widths = (d_in, *hidden, classes)
  return 2 * sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def _toy_data(n=40, seed=0):
  rng = np.random.default_rng(seed)
  return Dataset(rng.normal(size=(n, 4, 4, 1)).astype(np.float32),
                 rng.integers(0, 3, n).astype(np.int32))


def test_flops_closed_form_determinism_and_labels_unread():
  # MLP 16 -> 8 -> 4 -> 3; tiers 1/2 and 1/4, full width added: the widths
  # keep (8, 4), (4, 2), (2, 1) hidden units.
  model = build_model("mlp", (4, 4, 1), 3, seed=0, hidden=(8, 4))
  data = _toy_data()
  kwargs = dict(layers=model.layers,
                widths=(0.5, 0.25), steps=3, batch_size=16,
                learning_rate=0.05, temperature=2.0, seed=1)
  params, cost = distill(model.apply, model.init_params, data,
                         use_labels=False, **kwargs)
  teacher = _mlp_flops(16, (8, 4), 3)
  students = sum(_mlp_flops(16, kept, 3) for kept in ((8, 4), (4, 2), (2, 1)))
  assert cost.flops == (teacher + 3 * students) * 16 * 3
  assert cost.seconds > 0 and np.isfinite(cost.loss)

  again, _ = distill(model.apply, model.init_params, data, use_labels=False,
                     **kwargs)
  # Without labels, the labels are never read: other labels, same result.
  relabelled = Dataset(data.x, (data.y + 1) % 3)
  unread, _ = distill(model.apply, model.init_params, relabelled,
                      use_labels=False, **kwargs)
  with_labels, _ = distill(model.apply, model.init_params, relabelled,
                           use_labels=True, **kwargs)
  for a, b, c, d, e in zip(*map(jax.tree.leaves, (
      params, again, unread, with_labels, model.init_params))):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert not np.array_equal(a, d) and not np.array_equal(a, e)


def test_distilled_narrow_slices_beat_the_pretrained_ones():
  data = load_digits_transfer(40, seed=0)
  model = build_model("mlp", data.input_shape, data.num_classes, seed=0,
                      hidden=(128,))
  pretrained, _ = pretrain(model.apply, model.init_params, data.source_train,
                           steps=400, batch_size=64, learning_rate=0.05,
                           seed=0)
  widths = (1.0, 0.5, 0.25, 0.125)
  distilled, _ = distill(model.apply, pretrained, data.source_train,
                         layers=model.layers,
                         widths=widths, steps=200, batch_size=64,
                         learning_rate=0.05, temperature=4.0,
                         use_labels=True, seed=0)
  evaluate = make_evaluator(model, data.source_test)
  before, _ = evaluate(pretrained, widths)
  after, _ = evaluate(distilled, widths)
  # The plain 1/4 and 1/8 slices of a pretrained model are poor; distilled,
  # every slice is close to the full model, which stays where it was.
  assert before[3] < 0.6 and after[3] > before[3] + 0.25
  assert after[2] > before[2] + 0.15
  assert np.all(after[1:] > after[0] - 0.05)
  assert abs(after[0] - before[0]) < 0.03


@pytest.mark.parametrize("key,value,fragment", [
    ("distill_steps", "-1", "config.distill_steps=-1: must be >= 0"),
    ("distill_temperature", "0", "config.distill_temperature=0.0"),
    ("distill_lr", "-0.1", "config.distill_lr=-0.1"),
    ("distill_lr", "1e999", "config.distill_lr=inf"),
    ("distill_batch_size", "0", "config.distill_batch_size=0"),
    ("distill_labels", "'yes'", "config.distill_labels"),
])
def test_bad_distill_values_name_the_key(key, value, fragment):
  with pytest.raises(ConfigError) as info:
    config_lib.validate(config_lib.apply_overrides(
        config_lib.default_config(), [(key, value)]))
  assert fragment in str(info.value)


def test_distill_is_a_heterofl_family_policy():
  cfg = tiny_config(policy="distill", algorithm="heterofl")
  assert cfg.masked_ce  # HeteroFL's recipe, like heterofl and importance
  exp = runner.build_experiment(tiny_config(policy="distill"))
  # Its sub-models are the first-k ones.
  params = exp.model.init_params
  present, train = exp.simulation.masks(np.float32(0.25), params, 3,
                                        jax.random.key(0))
  bias = np.asarray(train["dense_0"]["bias"])
  np.testing.assert_array_equal(bias, np.arange(16) < 4)
  np.testing.assert_array_equal(np.asarray(present["dense_1"]["bias"]),
                                np.arange(8) < 2)


def test_run_reports_the_server_cost_and_keeps_it_on_resume(tmp_path):
  cfg = tiny_config(policy="distill", distill_steps=20, num_rounds=2)
  summary = runner.run(cfg, tmp_path / "d", quiet=True)
  # Tiny config: 64 -> 16 -> 8 -> 10 MLP, tiers 1 .. 1/8, 64 examples a step.
  teacher = _mlp_flops(64, (16, 8), 10)
  students = sum(_mlp_flops(64, kept, 10)
                 for kept in ((16, 8), (8, 4), (4, 2), (2, 1)))
  assert summary["server_flops"] == (teacher + 3 * students) * 64 * 20
  assert summary["server_seconds"] > 0
  saved = json.loads((tmp_path / "d" / "distill.json").read_text())
  assert saved["server_flops"] == summary["server_flops"]

  # Resumed from its checkpoint, the run reports the same saved cost.
  resumed = runner.run(tiny_config(policy="distill", distill_steps=20,
                                   num_rounds=4), tmp_path / "d", quiet=True)
  assert resumed["rounds"] == 4
  assert resumed["server_flops"] == summary["server_flops"]
  assert resumed["server_seconds"] == summary["server_seconds"]


@pytest.mark.slow
def test_compare_tabulates_the_server_cost(tmp_path):
  config = tiny_config_dict(num_rounds=2, pretrain_steps=10, distill_steps=10,
                            compare_policies=("heterofl", "distill"))
  rows = runner.compare(config, tmp_path / "cmp", quiet=True)
  assert rows[0]["server_flops"] == 0 and rows[0]["server_seconds"] == 0
  assert rows[1]["server_flops"] > 0 and rows[1]["server_seconds"] > 0
  table = (tmp_path / "cmp" / "comparison.md").read_text()
  assert "server_flops" in table and "GFLOP" in table
