"""Pretrained weights in: params files (npz, safetensors, orbax) loaded by
name into a model with another head, renamed, selected and frozen.

The references are independent of the loader: the exporting model's own
arrays, the file as numpy or safetensors reads it, the importing model's
fresh init, and the params before federated rounds.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import (assert_trees_close, disk_full_writing, partial_files,
                      small_simulation, tiny_config_dict)
from fedjax_tl import aggregators, api, checkpoint, cli, weights
from fedjax_tl import config as config_lib
from fedjax_tl.errors import ConfigError, DataError, DiskFullError
from fedjax_tl.models import build_model

BACKBONE = ("dense_0/bias", "dense_0/kernel", "dense_1/bias",
            "dense_1/kernel")
HEAD = ("head/bias", "head/kernel")


def _source():
  """The exporting model: 10 classes, its params moved off their init (as
  training would), so that no loaded tensor equals a fresh one."""
  model = build_model("mlp", (8, 8, 1), 10, seed=0, hidden=(16, 8))
  rng = np.random.default_rng(0)
  moved = jax.tree.map(lambda a: a + rng.normal(size=a.shape).astype(
      a.dtype), model.init_params)
  return dataclasses.replace(model, init_params=moved)


def _target():
  """The importing model: 5 classes (a new head), another seed."""
  return build_model("mlp", (8, 8, 1), 5, seed=1, hidden=(16, 8))


def _flat(params):
  return {f"{layer}/{name}": np.asarray(value)
          for layer, values in params.items()
          for name, value in values.items()}


def _export(params, path, fmt):
  """`params` written as `fmt` by the format's own writer (save_npz for
  npz), returning the path."""
  if fmt == "npz":
    return weights.save_npz(params, path / "w.npz")
  if fmt == "safetensors":
    save_file(_flat(params), str(path / "w.safetensors"))
    return path / "w.safetensors"
  if fmt == "orbax":
    checkpoint.save_params(path / "ckpt", params)
    return path / "ckpt"
  sim = small_simulation()  # "round": a run's round checkpoint
  state = sim.init(params)
  ckpts = checkpoint.RoundCheckpoints(path / "checkpoints", 1)
  ckpts.save(3, state)
  ckpts.close()
  return path / "checkpoints" / "3"


def test_save_npz_writes_layer_param_arrays(tmp_path):
  params = _source().init_params
  path = weights.save_npz(params, tmp_path / "w.npz")
  with np.load(path) as npz:
    stored = {name: npz[name] for name in npz.files}
  assert sorted(stored) == sorted(BACKBONE + HEAD)
  for name, value in _flat(params).items():
    assert stored[name].dtype == value.dtype
    np.testing.assert_array_equal(stored[name], value)
  assert [p.name for p in tmp_path.iterdir()] == ["w.npz"]  # no temp left


def test_save_npz_follows_no_planted_link_and_leaves_nothing_partial(
    tmp_path, monkeypatch):
  # The old temporary name was predictable and opened through a symlink.
  victim = tmp_path / "victim.txt"
  victim.write_text("must not change")
  (tmp_path / ".w.npz.tmp").symlink_to(victim)
  params = _source().init_params
  path = weights.save_npz(params, tmp_path / "w.npz")
  assert victim.read_bytes() == b"must not change"
  saved = path.read_bytes()
  disk_full_writing("w.npz")(monkeypatch)  # the next save finds no space
  with pytest.raises(DiskFullError, match="disk full writing .*w.npz"):
    weights.save_npz(_target().init_params, path)
  assert path.read_bytes() == saved and not partial_files(tmp_path)


def test_dotted_names_read_as_layer_param(tmp_path):
  np.savez(tmp_path / "d.npz", **{"dense_0.kernel": np.ones((2, 3)),
                                  "blocks.0.up.bias": np.zeros(4)})
  read = weights.read_params(tmp_path / "d.npz")
  assert list(read) == ["dense_0/kernel", "blocks/0/up/bias"]
  np.savez(tmp_path / "two.npz", **{"a.b": np.ones(1), "a/b": np.ones(1)})
  with pytest.raises(DataError, match="two stored names read as 'a/b'"):
    weights.read_params(tmp_path / "two.npz")


@pytest.mark.parametrize("fmt", ["npz", "safetensors", "orbax", "round"])
def test_backbone_loaded_exactly_new_head_fresh(tmp_path, fmt):
  source, target = _source(), _target()
  path = _export(source.init_params, tmp_path, fmt)
  params, report = weights.load_file(target.init_params, path,
                                     dont_load=("head/.*",))
  got, file, fresh = _flat(params), _flat(source.init_params), _flat(
      target.init_params)
  for name in BACKBONE:
    assert got[name].dtype == file[name].dtype
    np.testing.assert_array_equal(got[name], file[name])
    assert not np.array_equal(got[name], fresh[name])  # seeds differ
  for name in HEAD:
    np.testing.assert_array_equal(got[name], fresh[name])
  assert report == {"loaded": list(BACKBONE), "reinitialised": list(HEAD),
                    "unused": list(HEAD)}
  assert jax.tree.structure(params) == jax.tree.structure(target.init_params)


def test_safetensors_file_as_safetensors_reads_it(tmp_path):
  # The reference is the file itself, through safetensors' own reader.
  from safetensors.numpy import load_file
  path = _export(_source().init_params, tmp_path, "safetensors")
  params, _ = weights.load_file(_target().init_params, path,
                                dont_load=("head/.*",))
  stored = load_file(str(path))
  for name in BACKBONE:
    np.testing.assert_array_equal(_flat(params)[name], stored[name])


def test_a_new_head_without_dont_load_names_it_and_both_shapes(tmp_path):
  path = _export(_source().init_params, tmp_path, "npz")
  with pytest.raises(DataError) as e:
    weights.load_file(_target().init_params, path, origin="w")
  message = str(e.value)
  assert message.startswith("w: parameter ")
  assert "'head/kernel' has shape (8, 10) in the file but (8, 5)" in message
  assert "'head/bias' has shape (10,) in the file but (5,)" in message
  assert "weights_dont_load" in message and "\n" not in message


def test_a_missing_parameter_is_named(tmp_path):
  stored = _flat(_source().init_params)
  del stored["dense_1/kernel"]
  np.savez(tmp_path / "w.npz", **stored)
  with pytest.raises(DataError) as e:
    weights.load_file(_target().init_params, tmp_path / "w.npz",
                      dont_load=("head/.*",))
  assert "'dense_1/kernel' (16, 8) is not in the file" in str(e.value)
  assert "dense_1/bias" not in str(e.value).split(";")[0]


def test_mapping_renames_the_files_names(tmp_path):
  # Another framework's layout: params.Dense_0.w and params.Dense_0.b.
  source = _flat(_source().init_params)
  other = {}
  for name, value in source.items():
    layer, param = name.split("/")
    other[f"params.{layer.title()}.{'w' if param == 'kernel' else 'b'}"] = (
        value)
  save_file(other, str(tmp_path / "w.safetensors"))
  mapping = weights.parse_mapping([r"^params/=", r"^Dense_(\d)=dense_\1",
                                   "Head=head", "/w$=/kernel", "/b$=/bias"])
  assert mapping[0] == ("^params/", "")
  params, report = weights.load_file(
      _target().init_params, tmp_path / "w.safetensors",
      dont_load=("head/.*",), mapping=mapping)
  for name in BACKBONE:
    np.testing.assert_array_equal(_flat(params)[name], source[name])
  assert report["loaded"] == list(BACKBONE)
  # The file's names as read (dots as slashes), before renaming.
  assert sorted(report["unused"]) == ["params/Head/b", "params/Head/w"]
  # A dict works alike; two names renamed into one are refused.
  same, _ = weights.load_file(_target().init_params,
                              tmp_path / "w.safetensors",
                              dont_load=("head/.*",), mapping=dict(mapping))
  assert_trees_close(same, params, atol=0)
  with pytest.raises(DataError, match="both renamed"):
    weights.load_file(_target().init_params, tmp_path / "w.safetensors",
                      mapping=[("/[wb]$", "/x")])


def test_load_selects_and_patterns_must_match(tmp_path):
  source, target = _source(), _target()
  path = _export(source.init_params, tmp_path, "npz")
  params, report = weights.load_file(target.init_params, path,
                                     load="dense_0/.*")
  assert report["loaded"] == ["dense_0/bias", "dense_0/kernel"]
  np.testing.assert_array_equal(_flat(params)["dense_1/kernel"],
                                _flat(target.init_params)["dense_1/kernel"])
  with pytest.raises(ConfigError, match=r"config.weights_dont_load='head': "
                     "matches no parameter"):
    weights.load_file(target.init_params, path, dont_load=("head",))
  with pytest.raises(ConfigError, match="config.weights_freeze"):
    weights.frozen_names(target.init_params, ("dense_9/.*",))


def test_freeze_mask_and_names():
  params = _target().init_params
  assert weights.frozen_names(params, ("dense_.*",)) == BACKBONE
  assert weights.frozen_names(params, ()) == ()
  mask = _flat(weights.freeze_mask(params, ("dense_.*", "head/bias")))
  for name, value in mask.items():
    assert value.shape == _flat(params)[name].shape
    assert np.all(value == (1.0 if name == "head/kernel" else 0.0))


@pytest.mark.parametrize("setting", [
    dict(), dict(activation_masks=False), dict(tier_fast_path=True),
    dict(policy="fjord"), dict(policy="fedrolex"), dict(algorithm="fedadam"),
    dict(aggregator=aggregators.get("median"))])
def test_frozen_params_are_bitwise_unchanged_after_rounds(setting):
  source = _source()
  frozen = weights.frozen_names(source.init_params, ("dense_.*",))
  sim = small_simulation(model_def=source, frozen=frozen, **setting)
  start = sim.init(source.init_params)
  state = start
  for _ in range(2):
    state, stats = sim.round(state)
  assert int(stats.participants) > 0
  before, after = _flat(start.params), _flat(state.params)
  for name in BACKBONE:
    np.testing.assert_array_equal(after[name], before[name])
  assert not np.array_equal(after["head/kernel"], before["head/kernel"])
  if not setting:
    # Masks on activations train the head on the same frozen features as
    # masks on params do (the client never moves a frozen param).
    params_path = dataclasses.replace(sim, activation_masks=False)
    other = params_path.init(source.init_params)
    for _ in range(2):
      other, _ = params_path.round(other)
    assert_trees_close(state.params, other.params)
    # Frozen params are not uploaded: less traffic up than unfrozen.
    plain = dataclasses.replace(sim, frozen=())
    frozen_up = sim.sub_model_costs(np.float32([1.0]))[2]
    plain_up = plain.sub_model_costs(np.float32([1.0]))[2]
    assert float(frozen_up[0]) < float(plain_up[0])


def _raw(**overrides):
  raw = tiny_config_dict().to_dict()
  raw.update(overrides)
  return ml_collections.ConfigDict(raw)


@pytest.mark.parametrize("overrides,needle", [
    (dict(init_weights="missing.npz"), "config.init_weights='missing.npz': "
     "no such file"),
    (dict(weights_freeze=("(",)), "config.weights_freeze=('(',): '(' is not "
     "a regular expression"),
    (dict(weights_load="[", init_weights="."), "config.weights_load='['"),
    (dict(weights_map=("nothing",), init_weights="."),
     "config.weights_map=('nothing',): must be regex=replacement"),
    (dict(weights_map=(r"a=\2",), init_weights="."),
     "invalid group reference"),
    (dict(weights_dont_load=("head/.*",)), "config.weights_dont_load=("
     "'head/.*',): needs init_weights"),
    (dict(init_weights=".", pretrain="."), "config.init_weights='.': "
     "replaces the fresh init"),
    (dict(pretrain_reinit=("head/.*",), pretrain="none"),
     "config.pretrain_reinit=('head/.*',): resets params after pretraining"),
])
def test_config_keys_name_key_and_value(overrides, needle):
  with pytest.raises(ConfigError) as e:
    config_lib.validate(_raw(**overrides))
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_config_keys_validate():
  cfg = config_lib.validate(_raw(
      init_weights=".", weights_dont_load=("head/.*",),
      weights_map=("^params/=",), weights_freeze=("dense_.*",),
      pretrain="none"))
  assert cfg.weights_dont_load == ("head/.*",)
  assert cfg.weights_load == ".*" and cfg.weights_freeze == ("dense_.*",)


def _cli(monkeypatch, capsys, *args, cwd):
  """`fedjax-tl run` in this process (no interpreter and jax start-up to
  pay), from `cwd`: its exit code and its stderr."""
  monkeypatch.chdir(cwd)
  code = cli.main(["run", "--no-progress", *args])
  return code, capsys.readouterr().err.strip()


def _listing(path: pathlib.Path):
  return sorted((str(p.relative_to(path)), p.stat().st_mtime_ns)
                for p in path.rglob("*"))


def test_cli_missing_file_exits_2_in_one_line_workdir_untouched(
    tmp_path, monkeypatch, capsys):
  workdir = tmp_path / "w"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("mine")
  before = _listing(workdir)
  code, err = _cli(monkeypatch, capsys, f"--workdir={workdir}",
                   "--config.init_weights=missing.npz", cwd=tmp_path)
  assert code == 2 and len(err.splitlines()) == 1, err
  assert err.startswith("error: config.init_weights='missing.npz': ")
  assert _listing(workdir) == before


def test_cli_file_that_does_not_fit_exits_2_workdir_untouched(
    tmp_path, monkeypatch, capsys):
  weights.save_npz(_source().init_params, tmp_path / "w.npz")
  workdir = tmp_path / "w"
  code, err = _cli(monkeypatch, capsys, f"--workdir={workdir}",
                   "--config.init_weights=w.npz", "--config.hidden=(16, 4)",
                   "--config.pretrain=none", "--config.num_clients=60",
                   "--config.clients_per_round=12", cwd=tmp_path)
  assert code == 2 and len(err.splitlines()) == 1, err
  assert ("error: config.init_weights='w.npz': parameter 'dense_1/bias' "
          "has shape (8,) in the file but (4,) in the model") in err
  assert not workdir.exists()


@pytest.mark.slow
def test_run_reports_loaded_reinitialised_frozen(tmp_path):
  """End to end: a digits model's backbone from a file, a new head, the
  backbone frozen through every round (read back from the last round's
  checkpoint)."""
  digits_model = build_model("mlp", (8, 8, 1), 7, seed=5, hidden=(16, 8))
  weights.save_npz(digits_model.init_params, tmp_path / "w.npz")
  cfg = tiny_config_dict(
      init_weights=str(tmp_path / "w.npz"), weights_dont_load=("head/.*",),
      weights_freeze=("dense_.*",), pretrain="none", num_rounds=2,
      eval_every=2, checkpoint_every=2)
  result = api.run(cfg, tmp_path / "run", quiet=True)
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert summary["weights"] == {
      "file": str(tmp_path / "w.npz"), "loaded": list(BACKBONE),
      "reinitialised": list(HEAD), "unused": list(HEAD),
      "frozen": list(BACKBONE)}
  assert result.summary["weights"]["frozen"] == list(BACKBONE)
  final = weights.read_params(tmp_path / "run" / "checkpoints" / "2")
  exported = _flat(digits_model.init_params)
  for name in BACKBONE:
    np.testing.assert_array_equal(final[name], exported[name])
  assert final["head/kernel"].shape == (8, 10)


def test_pretrain_reinit_resets_the_head_after_pretraining():
  # The backbone as pretraining left it, the head as the model's init: a
  # new head for another label set (cifar10 before cifar100).
  from fedjax_tl.experiment.build import build_experiment
  from fedjax_tl.experiment.params import initial_params
  from fedjax_tl.policies.transfer import pretrain
  cfg = config_lib.validate(tiny_config_dict(pretrain_reinit=("head/.*",)))
  exp = build_experiment(cfg)
  lines = []
  params, origin, fresh = initial_params(exp, None, lines.append)
  trained, _ = pretrain(exp.model.apply, exp.model.init_params,
                        exp.data.source_train, steps=cfg.pretrain_steps,
                        batch_size=cfg.pretrain_batch_size,
                        learning_rate=cfg.pretrain_lr, seed=cfg.seed)
  got, init, want = (_flat(t) for t in (params, exp.model.init_params,
                                         trained))
  for name in HEAD:
    np.testing.assert_array_equal(got[name], init[name])
    assert not np.array_equal(want[name], init[name])  # pretraining moved it
  for name in BACKBONE:
    np.testing.assert_array_equal(got[name], want[name])
  assert origin == "source" and fresh
  assert lines[-1].endswith(": head/bias, head/kernel")


def test_a_pretrain_reinit_matching_nothing_is_refused_before_pretraining():
  from fedjax_tl.experiment.build import build_experiment
  cfg = config_lib.validate(tiny_config_dict(pretrain_reinit=("fc/.*",)))
  with pytest.raises(ConfigError, match="pretrain_reinit.*matches no"):
    build_experiment(cfg)
