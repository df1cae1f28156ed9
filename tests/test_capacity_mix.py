"""Tests for HeteroFL's capacity-mix notation (`config.capacity_mix`)."""

import pytest

from conftest import tiny_config, tiny_config_dict
from fedjax_tl import config as config_lib
from fedjax_tl.config import parse_capacity_mix
from fedjax_tl.errors import ConfigError


@pytest.mark.parametrize("mix, fractions, proportions", [
    ("a1-b1-c1-d1-e1", (1, 1 / 2, 1 / 4, 1 / 8, 1 / 16), (0.2,) * 5),
    ("a6-b10-c11-d18-e55", (1, 1 / 2, 1 / 4, 1 / 8, 1 / 16),
     (0.06, 0.10, 0.11, 0.18, 0.55)),
    ("a-e", (1, 1 / 16), (0.5, 0.5)),
    ("a1-e", (1, 1 / 16), (0.5, 0.5)),
    ("e3-a1", (1 / 16, 1), (0.75, 0.25)),
    ("b2-c0-d2", (1 / 2, 1 / 4, 1 / 8), (0.5, 0.0, 0.5)),
    ("c", (1 / 4,), (1.0,)),
])
def test_published_mixes_parse(mix, fractions, proportions):
  got_fractions, got_proportions = parse_capacity_mix(mix)
  assert got_fractions == pytest.approx(fractions, abs=0)
  assert got_proportions == pytest.approx(proportions, abs=1e-12)


def test_mix_sets_the_tiers_of_the_config():
  cfg = tiny_config(capacity_mix="a6-b10-c11-d18-e55")
  assert cfg.tier_fractions == (1.0, 0.5, 0.25, 0.125, 0.0625)
  assert cfg.tier_proportions == pytest.approx((0.06, 0.1, 0.11, 0.18, 0.55))
  assert cfg.tier_names == ("1", "0.5", "0.25", "0.125", "0.0625")
  assert len(cfg.device_classes) == 5
  assert cfg.to_dict()["capacity_mix"] == "a6-b10-c11-d18-e55"
  assert tiny_config().capacity_mix is None


def test_mix_from_the_command_line():
  cfg = config_lib.apply_overrides(tiny_config_dict(),
                                   [("capacity_mix", "a-e")])
  assert config_lib.validate(cfg).tier_fractions == (1.0, 0.0625)


@pytest.mark.parametrize("mix, words", [
    ("a1-f2", "unknown level 'f2'"),
    ("a-b-a", "repeats level 'a'"),
    ("a0-e0", "sum to 0"),
    ("a1-b1.5", "bad count"),
    ("a1--b1", "unknown level ''"),
    ("A1", "unknown level"),
    ("", "must be a mix"),
])
def test_bad_mixes_name_key_and_value(mix, words):
  with pytest.raises(ConfigError) as error:
    tiny_config(capacity_mix=mix)
  assert f"config.capacity_mix={mix!r}" in str(error.value)
  assert words in str(error.value)


@pytest.mark.parametrize("key, value", [
    ("tier_fractions", (1.0, 0.5)),
    ("tier_proportions", (0.4, 0.2, 0.2, 0.2)),
])
def test_mix_and_explicit_tiers_conflict(key, value):
  with pytest.raises(ConfigError) as error:
    tiny_config(capacity_mix="a-e", **{key: value})
  assert "config.capacity_mix='a-e'" in str(error.value)
  assert f"config.{key}=" in str(error.value)
