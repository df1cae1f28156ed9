"""The config library: published setups load, validate, run and cost right.

Their data (tfds mnist, emnist, cifar10) is not on this machine: runs go
through tfds' mock data, which has the real shapes and label counts.
"""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tfds_mock_data
from fedjax_tl import cost, models, runner
from fedjax_tl.cli import main
from fedjax_tl.config import apply_overrides, load_config, validate
from fedjax_tl.errors import ConfigError

CONFIGS = pathlib.Path(__file__).parent.parent / "configs"
# data set -> (input height/width, channels, classes, train examples).
DATA = {"mnist": (28, 1, 10, 60_000), "emnist": (28, 1, 62, 697_932),
        "cifar10": (32, 3, 10, 50_000)}
LEVELS = {"a": 1.0, "b": 0.5, "c": 0.25, "d": 0.125, "e": 0.0625}


def _load(name, variant=""):
  return validate(load_config(
      f"{CONFIGS / name}.py" + (f":{variant}" if variant else "")))


def _mix(*levels_and_counts):
  """HeteroFL mix by hand: fractions and proportions."""
  total = sum(n for _, n in levels_and_counts)
  return (tuple(LEVELS[l] for l, _ in levels_and_counts),
          tuple(n / total for _, n in levels_and_counts))


def test_every_config_and_variant_validates_to_the_published_setup():
  for name in ("default", "compare_migration", "digits_resnet"):
    assert _load(name).data == "digits"
  assert _load("digits_resnet").model == "preresnet18"
  # (config, variant) -> fields from the papers' published setups, by hand.
  heterofl = dict(batch_size=10, client_lr=0.1, client_momentum=0.9,
                  weight_decay=5e-4, policy="heterofl",
                  heterofl_mode="dynamic", pretrain="none", model="cnn",
                  cnn_channels=(64, 128, 256, 512), num_clients=100,
                  clients_per_round=10, min_availability=1.0)
  fjord = dict(batch_size=32, client_lr=0.1, policy="fjord", num_rounds=500,
               tier_fractions=(0.2, 0.4, 0.6, 0.8, 1.0),
               tier_proportions=(0.2,) * 5)
  cases = {
      # 5 epochs of 495 examples (1% of 50,000 held out) in batches of 10;
      # on CIFAR-10 each method trains its paper's model.
      ("cifar10", ""): dict(heterofl, local_steps=250, num_rounds=400,
                            partition="iid", max_examples=495,
                            model="preresnet18", norm=None,
                            resnet_widths=(64, 128, 256, 512),
                            **dict(zip(("tier_fractions", "tier_proportions"),
                                       _mix(("a", 1), ("e", 1))))),
      ("cifar10", "model=cnn"): dict(heterofl, model="cnn"),
      ("cifar10", "mix=a-b-c-d-e"): dict(zip(
          ("tier_fractions", "tier_proportions"),
          _mix(*((l, 1) for l in "abcde")))),
      ("cifar10", "mix=a"): dict(tier_fractions=(1.0,)),
      ("cifar10", "mix=e,alpha=0.1"): dict(
          tier_fractions=(0.0625,), partition="dirichlet", alpha=0.1,
          num_rounds=800),
      ("cifar10", "method=fedrolex,mix=real-world"): dict(
          policy="fedrolex", local_steps=50, model="resnet18", **dict(zip(
              ("tier_fractions", "tier_proportions"),
              _mix(("a", 6), ("b", 10), ("c", 11), ("d", 18), ("e", 55))))),
      ("cifar10", "method=fed_dropout"): dict(
          policy="fed_dropout", tier_fractions=tuple(LEVELS.values()),
          model="resnet18"),
      # 1 epoch of 495 examples in batches of 32.
      ("cifar10", "method=fjord"): dict(fjord, local_steps=16,
                                        fjord_distill=False,
                                        model="resnet18"),
      ("cifar10", "method=fedrolex,model=preresnet18"): dict(
          policy="fedrolex", model="preresnet18"),
      ("cifar10", "model=mobilenetv2"): dict(policy="heterofl",
                                             model="mobilenetv2"),
      ("cifar10", "method=fjord_kd,model=mlp"): dict(
          fjord, fjord_distill=True, model="mlp", hidden=(512, 256, 128)),
      ("mnist", ""): dict(heterofl, local_steps=300, max_examples=594),
      ("mnist", " model = mlp , alpha = 0.5 "): dict(
          model="mlp", partition="dirichlet", alpha=0.5),
      # 3,400 clients of ceil(690,953 / 3,400) = 204 examples, label skew.
      ("emnist", ""): dict(fjord, num_clients=3400, max_examples=204,
                           local_steps=7, partition="dirichlet", alpha=1.0),
      ("emnist", "method=heterofl,alpha=iid"): dict(
          policy="heterofl", partition="iid", local_steps=105,
          num_rounds=400),
  }
  for (name, variant), want in cases.items():
    cfg = _load(name, variant)
    assert cfg.data == name
    for key, value in want.items():
      got = getattr(cfg, key)
      if isinstance(value, (float, tuple)):
        assert got == pytest.approx(value), (name, variant, key)
      else:
        assert got == value, (name, variant, key)


@pytest.mark.parametrize("variant,named", [
    ("mix=a-z", "mix='a-z'"), ("method=fedavg", "method='fedavg'"),
    ("alpha=-1", "alpha='-1'"), ("alpha=many", "alpha='many'"),
    ("model=resnet", "model='resnet'"), ("width=2", "width='2'"),
    ("mix=a,mix=e", "mix='e'"), ("cnn", "'cnn'"),
])
def test_bad_variant_names_key_and_value(variant, named, tmp_path, capsys):
  with pytest.raises(ConfigError, match="variant " + named.replace(
      "(", r"\(")):
    load_config(f"{CONFIGS / 'cifar10'}.py:{variant}")
  # On the command line: one line, exit 2, nothing written.
  workdir = tmp_path / "w"
  code = main(["run", f"--config={CONFIGS / 'cifar10'}.py:{variant}",
               f"--workdir={workdir}", "--no-progress"])
  err = capsys.readouterr().err.strip()
  assert code == 2 and named in err and len(err.splitlines()) == 1
  assert not workdir.exists()


def _tiny(config, **extra):
  """A published config shrunk to run one round in a test."""
  overrides = dict(num_clients=6, clients_per_round=3, max_examples=6,
                   source_fraction=0.1, local_test_examples=0, local_steps=1,
                   batch_size=4, cnn_channels=(4,), cnn_dense=8, hidden=(8,),
                   num_rounds=1, eval_every=1, **extra)
  return apply_overrides(config, [(k, repr(v)) for k, v in overrides.items()])


@pytest.mark.slow
@pytest.mark.parametrize("name,variant", [
    ("mnist", "model=mlp"), ("emnist", "model=mlp"),
    # The CNN: a round of a ResNet, even narrowed, takes minutes on CPU.
    ("cifar10", "method=fedrolex,mix=real-world,alpha=0.5,model=cnn")])
def test_one_round_of_each_data_set_under_mock_data(name, variant, tmp_path):
  config = _tiny(load_config(f"{CONFIGS / name}.py:{variant}"))
  with tfds_mock_data(40):
    summary = runner.run(validate(config), tmp_path, quiet=True,
                         progress=False)
  assert summary["rounds"] == 1
  assert set(summary["per_tier_accuracy"]) == set(validate(config).tier_names)
  assert 0 <= summary["accuracy"] <= 1
  assert summary["bytes_down"] > 0 and summary["bytes_up"] > 0
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["data"] == name and saved["pretrain"] == "none"


def _cnn_cost(width, size, in_channels, classes, channels, dense):
  """Parameters and forward FLOPs per example of the width-p CNN, by hand.

  3x3 same convolutions each followed by a 2x2 max-pool, then a dense layer
  and the head; hidden widths ceil(p * C), input and classes kept.
  """
  kept = [math.ceil(width * c) for c in channels]
  d = math.ceil(width * dense)
  params, flops, side, prev = 0, 0, size, in_channels
  for c in kept:
    params += 9 * prev * c + c
    flops += 2 * 9 * prev * c * side * side
    side, prev = side // 2, c
  flat = side * side * prev
  params += flat * d + d + d * classes + classes
  flops += 2 * (flat * d + d * classes)
  return params, flops


def _mlp_cost(width, inputs, classes, hidden):
  kept = [inputs] + [math.ceil(width * h) for h in hidden] + [classes]
  params = sum(a * b + b for a, b in zip(kept, kept[1:]))
  return params, sum(2 * a * b for a, b in zip(kept, kept[1:]))


@pytest.mark.parametrize("name,variant", [
    ("cifar10", "model=cnn,mix=a-b-c-d-e"),
    ("mnist", "model=mlp,method=fjord")])
def test_published_model_costs_match_closed_form(name, variant):
  size, channels, classes, _ = DATA[name]
  config = load_config(f"{CONFIGS / name}.py:{variant}")
  # The published model as built for a run; only the population shrinks.
  config = apply_overrides(config, [("num_clients", "4"),
                                    ("clients_per_round", "2"),
                                    ("max_examples", "4"),
                                    ("source_fraction", "0.1")])
  cfg = validate(config)
  with tfds_mock_data(20):
    exp = runner.build_experiment(cfg)
  widths = cfg.tier_fractions
  # What a round charges each client of these widths (one compiled call).
  share, down, up = (np.asarray(a, np.float64) for a in jax.jit(
      exp.simulation.sub_model_costs)(jnp.asarray(widths)))
  if cfg.model == "cnn":
    cost = [_cnn_cost(w, size, channels, classes, cfg.cnn_channels,
                      cfg.cnn_dense) for w in (*widths, 1.0)]
  else:
    cost = [_mlp_cost(w, size * size * channels, classes, cfg.hidden)
            for w in (*widths, 1.0)]
  params = np.array([p for p, _ in cost[:-1]], np.float64)
  flops = np.array([f for _, f in cost[:-1]], np.float64)
  # A client downloads and uploads its whole sub-model, 4 bytes a value.
  np.testing.assert_array_equal(down, 4 * params)
  np.testing.assert_array_equal(up, 4 * params)
  np.testing.assert_allclose(share, flops / cost[-1][1], rtol=1e-6)
  if name == "cifar10":
    assert cost[-1][0] == 2_605_194  # the figure in the config's docstring


# CIFAR-10 model variant -> (parameters, forward MFLOP per example at full
# width); the default's and resnet18's are the figures in the config's
# docstring.
CIFAR10_MODELS = {"preresnet18": (9_622_090, 657.9),
                  "resnet18": (11_173_962, 1110.8),
                  "mobilenetv2": (2_236_682, 176.0)}


@pytest.mark.parametrize("model", sorted(CIFAR10_MODELS))
def test_cifar10_model_variants_build_at_their_stated_cost(model):
  cfg = _load("cifar10", f"model={model}")
  built = {}

  def init():
    built["model"] = models.build_model(
        cfg.model, (32, 32, 3), 10, seed=cfg.seed,
        **{key: getattr(cfg, key) for key in models.Options._fields})
    return built["model"].init_params

  # Shapes only (an eager init compiles each shape's initialiser: minutes).
  params = jax.eval_shape(init)
  layers = built["model"].layers
  flops = cost.forward_flops(layers, params, positions=cost.conv_positions(
      (32, 32, 3), layers, params))
  want_params, want_mflop = CIFAR10_MODELS[model]
  assert sum(math.prod(a.shape) for a in jax.tree.leaves(params)) == (
      want_params)
  assert round(float(flops) / 1e6, 1) == want_mflop
  assert built["model"].normalised
  assert built["model"].static_batch_norm == (model != "resnet18")
