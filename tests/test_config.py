"""Config overrides and validation: one clear error naming key and value."""

import pathlib

import pytest

from fedjax_tl import config as config_lib
from fedjax_tl.errors import ConfigError


def _validated(**overrides):
  cfg = config_lib.apply_overrides(config_lib.default_config(),
                                   list(overrides.items()))
  return config_lib.validate(cfg)


def test_default_config_is_valid_and_frozen():
  cfg = config_lib.validate(config_lib.default_config())
  assert cfg.num_clients >= 1000 and cfg.clients_per_round >= 100
  assert cfg.server_lr == 1.0 and cfg.mu == 0.0
  with pytest.raises(Exception):
    cfg.seed = 3


def test_overrides_parse_as_written():
  cfg = _validated(num_clients="20000", clients_per_round="10000",
                   num_rounds="5", seed="1", pretrain="none",
                   algorithm="fedadam", tier_fractions="(1, 0.5)",
                   tier_proportions="(0.5, 0.5)", client_lr="1")
  assert (cfg.num_clients, cfg.clients_per_round, cfg.num_rounds) == (
      20000, 10000, 5)
  assert cfg.pretrain == "none" and cfg.algorithm == "fedadam"
  assert cfg.server_lr == 0.01  # fedadam's default server learning rate
  assert cfg.tier_fractions == (1.0, 0.5) and cfg.client_lr == 1.0
  assert _validated(algorithm="fedprox").mu == 0.01
  assert _validated(data_dir="/tmp/x").data_dir == "/tmp/x"


@pytest.mark.parametrize("key,value,fragment", [
    ("num_rounds", "0", "config.num_rounds=0"),
    ("num_rounds", "abc", "config.num_rounds='abc'"),
    ("clients_per_round", "5000", "must be <= num_clients"),
    ("algorithm", "fedsgd", "config.algorithm='fedsgd'"),
    ("tier_fractions", "(1.0, 1.5)", "config.tier_fractions"),
    ("tier_proportions", "(0.5, 0.6, 0.1, 0.1)", "sum to 1"),
    ("alpha", "-1", "config.alpha=-1.0"),
    ("client_lr", "nan", "config.client_lr"),
    ("model", "resnet", "config.model='resnet'"),
])
def test_bad_values_name_the_key(key, value, fragment):
  with pytest.raises(ConfigError) as info:
    _validated(**{key: value})
  assert fragment in str(info.value)
  assert "\n" not in str(info.value)


@pytest.mark.parametrize("policy", ["heterofl", "importance", "distill"])
def test_dynamic_levels_are_heterofls_familys(policy):
  assert _validated(policy=policy,
                    heterofl_mode="dynamic").heterofl_mode == "dynamic"


@pytest.mark.parametrize("policy", ["fedrolex", "fed_dropout", "fjord",
                                    "hetlora", "partial_finetune", "full"])
def test_dynamic_levels_elsewhere_are_refused_in_one_line(policy, tmp_path,
                                                          capsys):
  from fedjax_tl import cli
  with pytest.raises(ConfigError) as info:
    _validated(policy=policy, heterofl_mode="dynamic")
  message = str(info.value)
  assert message.startswith("config.heterofl_mode='dynamic': ")
  assert f"policy={policy!r}" in message and "\n" not in message
  assert _validated(policy=policy).heterofl_mode == "fix"
  assert cli.main(["run", f"--workdir={tmp_path / 'w'}",
                   f"--config.policy={policy}",
                   "--config.heterofl_mode=dynamic"]) == 2
  assert capsys.readouterr().err.strip() == f"error: {message}"
  assert not (tmp_path / "w").exists()


def test_unknown_key_suggests_the_nearest():
  with pytest.raises(ConfigError, match="did you mean 'num_rounds'"):
    _validated(num_round="3")


def test_config_files_and_args(tmp_path):
  file = tmp_path / "c.py"
  file.write_text("from fedjax_tl.config import default_config\n"
                  "def get_config(arg=None):\n"
                  "  c = default_config()\n"
                  "  if arg: c.num_rounds = int(arg)\n"
                  "  return c\n")
  assert config_lib.load_config(f"{file}:7").num_rounds == 7
  with pytest.raises(ConfigError, match="no such config file"):
    config_lib.load_config(str(tmp_path / "missing.py"))


ROOT = pathlib.Path(__file__).parent.parent


def test_shipped_configs_load_by_name(capsys):
  import fedjax_tl.configs
  from fedjax_tl import cli
  assert fedjax_tl.configs.names() == tuple(sorted(
      p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__"))
  by_name = config_lib.load_config("compare_migration")
  by_path = config_lib.load_config(str(ROOT / "configs/compare_migration.py"))
  assert by_name.to_dict() == by_path.to_dict()
  assert fedjax_tl.configs.get("compare_migration").to_dict() == (
      by_path.to_dict())
  assert (fedjax_tl.configs.get("mnist", "mix=e").to_dict() ==
          config_lib.load_config(f"{ROOT / 'configs/mnist.py'}:mix=e")
          .to_dict())
  assert fedjax_tl.get_config("compare_migration", num_rounds=3).num_rounds == 3
  import fedjax_tl.configs.default  # a module of the package, as installed
  assert fedjax_tl.configs.default.get_config().to_dict() == (
      config_lib.default_config().to_dict())
  with pytest.raises(ConfigError) as info:
    fedjax_tl.configs.get("compare_migratoin")
  assert str(info.value) == (
      "--config='compare_migratoin': no config file or shipped config "
      "'compare_migratoin'; shipped configs: "
      + ", ".join(fedjax_tl.configs.names()))
  assert cli.main(["config", "--config=compare_migratoin"]) == 2
  assert capsys.readouterr().err == f"error: {info.value}\n"
  # A path is never read as a name.
  with pytest.raises(ConfigError, match="no such config file"):
    config_lib.load_config("configs/nope.py")


def test_every_package_is_listed_for_the_install():
  import tomllib
  setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"][
      "setuptools"]
  found = {".".join(p.parent.relative_to(ROOT / "src").parts)
           for p in (ROOT / "src").rglob("__init__.py")}
  assert set(setup["packages"]) == found | {"fedjax_tl.configs"}
  assert setup["package-dir"]["fedjax_tl.configs"] == "configs"


# -- the key table: one declaration per key --

EXPECTED_SECTIONS = {  # by hand: a few keys and the section they live in
    "alpha": "data", "num_clients": "population", "hidden": "model",
    "policy": "policy", "lora_rank": "policy", "client_lr": "client",
    "server_lr": "server", "krum_f": "aggregator", "dp_delta": "privacy",
    "attack": "faults", "chunk_size": "run", "sweep_seeds": "sweep"}


def test_every_key_is_declared_once_and_listed_in_its_section():
  from fedjax_tl.experiment.keys import KEYS
  names = [key.name for key in KEYS]
  assert len(names) == len(set(names))
  defaults = config_lib.default_config().to_dict()
  fields = {f for f in config_lib.ExperimentConfig.__dataclass_fields__}
  assert set(defaults) == set(names) == fields
  text = config_lib.describe_keys()
  section = None
  seen = {}
  for line in text.splitlines():
    if line.startswith("["):
      section = line.strip("[]")
    elif line.startswith("  ") and not line.startswith("    "):
      seen[line.split(" = ")[0].strip()] = section
  assert set(seen) == set(names)
  assert {k: seen[k] for k in EXPECTED_SECTIONS} == EXPECTED_SECTIONS


@pytest.mark.parametrize("key,bad,good", [  # ranges written by hand
    ("client_momentum", "1.0", "0.99"),   # [0, 1)
    ("trim_fraction", "0.5", "0.49"),     # [0, 0.5)
    ("source_fraction", "0.0", "1.0"),    # (0, 1]
    ("overcommit", "0.99", "1.0"),        # >= 1
    ("lora_rank", "0", "16"),             # >= 1
    ("sweep_seeds", "(3, 3)", "(3, 4)"),  # distinct
    ("sweep_policy", "('nope',)", "('fjord',)"),  # registered names
    ("hidden", "()", "(4,)"),             # non-empty
])
def test_each_key_is_checked_against_its_declaration(key, bad, good):
  with pytest.raises(ConfigError, match=rf"^config\.{key}="):
    _validated(**{key: bad})
  assert getattr(_validated(**{key: good}), key) is not None


def test_config_command_lists_keys_with_values_and_help(capsys):
  from fedjax_tl import cli
  assert cli.main(["config", "--section", "client",
                   "--config.client_lr=0.3"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("[client]\n") and "[server]" not in out
  assert "  client_lr = 0.3  (default 0.1)\n      client learning rate" in out
  assert "  local_steps = 5\n" in out
  assert cli.main(["config", "--section", "nope"]) == 2
  assert "--section='nope': must be one of data," in capsys.readouterr().err


@pytest.mark.parametrize("policy,key,value", [
    ("heterofl", "gsd_gamma", 0.8), ("fjord", "lora_rank", 4),
    ("hetlora", "distill_steps", 10), ("flexlora", "lora_aggregation",
                                        "holders"),
    ("depthfl", "scalefl_kd_gamma", 0.1), ("fiarse", "exit_kd_rampup", 0)])
def test_a_policys_own_key_is_refused_under_another(policy, key, value):
  c = config_lib.default_config()
  c.policy = policy
  c[key] = value
  with pytest.raises(ConfigError, match=f"config.{key}=.*is read by policy="):
    config_lib.validate(c)


def test_compare_and_sweep_give_a_policy_its_own_keys_only():
  from fedjax_tl.experiment.relations import policy_variant, unread_keys
  from fedjax_tl.sweep import sweep_settings
  c = config_lib.default_config()
  c.gsd_gamma, c.lora_rank = 0.8, 4
  fedecover = config_lib.validate(policy_variant(c, "fedecover"))
  heterofl = config_lib.validate(policy_variant(c, "heterofl"))
  flexlora = config_lib.validate(policy_variant(c, "flexlora"))
  assert (fedecover.gsd_gamma, fedecover.lora_rank) == (0.8, 16)
  assert (heterofl.gsd_gamma, heterofl.lora_rank) == (0.9, 16)
  assert (flexlora.gsd_gamma, flexlora.lora_rank) == (0.9, 4)
  unread_keys(c, ("fedecover", "hetlora"))  # each key has a reader
  with pytest.raises(ConfigError, match="config.lora_rank=4: .*fedecover"):
    unread_keys(c, ("fedecover", "heterofl"))
  c.sweep_policy = ("heterofl", "fedecover", "hetlora")
  settings = sweep_settings(c)
  assert [(s.policy, s.gsd_gamma, s.lora_rank) for _, s in settings] == [
      ("heterofl", 0.9, 16), ("fedecover", 0.8, 16), ("hetlora", 0.9, 4)]
