"""Device catalogue and population generator: counts, figures, jitter."""

import jax
import numpy as np
import pytest

from fedjax_tl import device_catalog as dc
from fedjax_tl.devices import make_population, sample_cohort
from fedjax_tl.errors import ConfigError

NAMES = ("flagship_phone", "midrange_phone", "lowend_phone", "iot_board")


def test_catalogue_figures_are_sane():
  assert tuple(dc.CATALOGUE) == NAMES
  for c in dc.CATALOGUE.values():
    assert c.compute_gflops > 0 and c.memory_mb > 0
    assert 0 < c.up_mbps <= c.down_mbps
    assert 0 < c.availability < 1 and 0 < c.width_fraction <= 1
  # Better classes are faster and bigger.
  phones = [dc.CATALOGUE[n] for n in NAMES[:3]]
  assert [c.compute_gflops for c in phones] == sorted(
      (c.compute_gflops for c in phones), reverse=True)
  assert [c.width_fraction for c in phones] == [1.0, 0.5, 0.25]


def test_zero_jitter_gives_the_class_figures_in_kbps():
  prof = dc.make_device_population(8, {"midrange_phone": 1.0}, seed=0,
                                   jitter=0.0)
  np.testing.assert_array_equal(prof.device_class, [1] * 8)
  np.testing.assert_allclose(prof.compute_gflops, 12.0)
  np.testing.assert_allclose(prof.memory_mb, 1024.0)
  np.testing.assert_allclose(prof.up_kbps, 10_000.0)
  np.testing.assert_allclose(prof.down_kbps, 50_000.0)
  np.testing.assert_allclose(prof.availability, 0.25, rtol=1e-6)
  for a in (prof.compute_gflops, prof.memory_mb, prof.up_kbps,
            prof.down_kbps, prof.availability):
    assert a.dtype == np.float32 and a.shape == (8,)


@pytest.mark.parametrize("num,mix,expected", [
    (1000, {"flagship_phone": 0.1, "midrange_phone": 0.2,
            "lowend_phone": 0.3, "iot_board": 0.4}, [100, 200, 300, 400]),
    # 2.5 each: the two leftover devices go to the first tied classes.
    (10, (1, 1, 1, 1), [3, 3, 2, 2]),
    # Unnormalised proportions; 7 * (2/7, 5/7) = (2, 5).
    (7, {"lowend_phone": 2, "flagship_phone": 5}, [5, 0, 2, 0]),
])
def test_class_counts_are_exact(num, mix, expected):
  prof = dc.make_device_population(num, mix, seed=3)
  np.testing.assert_array_equal(np.bincount(prof.device_class, minlength=4),
                                expected)


def test_deterministic_from_seed():
  a = dc.make_device_population(50, (1, 1, 1, 1), seed=5)
  b = dc.make_device_population(50, (1, 1, 1, 1), seed=5)
  c = dc.make_device_population(50, (1, 1, 1, 1), seed=6)
  for field in ("device_class", "compute_gflops", "memory_mb", "up_kbps",
                "down_kbps", "availability"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
  assert not np.array_equal(a.compute_gflops, c.compute_gflops)


def test_jitter_is_lognormal_around_the_class_median():
  sigma = 0.3
  prof = dc.make_device_population(20_000, {"flagship_phone": 1}, seed=1,
                                   jitter=sigma)
  for values, median in ((prof.compute_gflops, 40.0),
                         (prof.memory_mb, 2048.0), (prof.up_kbps, 20_000.0),
                         (prof.down_kbps, 150_000.0)):
    log_ratio = np.log(values.astype(np.float64) / median)
    assert abs(log_ratio.mean()) < 0.02
    assert abs(log_ratio.std() - sigma) < 0.02
  avail = prof.availability.astype(np.float64)
  assert np.all((avail > 0) & (avail < 1))
  logit = np.log(avail / (1 - avail))
  assert abs(np.median(logit) - np.log(0.3 / 0.7)) < 0.02
  # Independent draws per field.
  assert abs(np.corrcoef(prof.compute_gflops, prof.memory_mb)[0, 1]) < 0.05


def test_ms_per_sample_by_hand():
  prof = dc.make_device_population(2, {"flagship_phone": 1}, seed=0,
                                   jitter=0.0)
  # 2 MFLOP at 40 GFLOP/s: 2e6 / 40e9 s = 0.05 ms.
  np.testing.assert_allclose(prof.ms_per_sample(2e6), [0.05, 0.05],
                             rtol=1e-6)


def test_to_population_feeds_the_cohort_sampler():
  prof = dc.make_device_population(30, (1, 2, 3, 4), seed=2)
  pop = prof.to_population()
  np.testing.assert_array_equal(pop.tier, prof.device_class)
  np.testing.assert_array_equal(pop.availability, prof.availability)
  assert pop.tier_fractions == (1.0, 0.5, 0.25, 0.125)
  assert pop.tier_names == NAMES and pop.profiles is prof
  np.testing.assert_array_equal(pop.tier_counts(), [3, 6, 9, 12])
  ids, valid = sample_cohort(jax.random.key(0), pop.availability, 5)
  assert ids.shape == valid.shape == (5,)
  assert len(set(np.asarray(ids).tolist())) == 5


def test_make_population_unchanged_without_profiles():
  pop = make_population(10, (1.0, 0.5), (0.5, 0.5), min_availability=0.3,
                        seed=0)
  assert pop.profiles is None and pop.num_devices == 10


@pytest.mark.parametrize("mix,needle", [
    ({"phablet": 1.0}, "'phablet'"),
    ({"iot_board": -0.5}, "-0.5"),
    ((1, 1), "2 proportions"),
    ({"iot_board": 0.0}, "sum to 0"),
    ({"iot_board": float("nan")}, "nan"),
])
def test_bad_mix_is_a_one_line_config_error(mix, needle):
  with pytest.raises(ConfigError) as e:
    dc.make_device_population(10, mix, seed=0)
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_count_and_jitter():
  with pytest.raises(ConfigError, match="num_devices"):
    dc.make_device_population(0, (1, 1, 1, 1), seed=0)
  with pytest.raises(ConfigError, match="jitter"):
    dc.make_device_population(5, (1, 1, 1, 1), seed=0, jitter=-1.0)
