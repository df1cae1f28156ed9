"""`fedjax-tl report` on hand-written run, compare and sweep directories."""

import csv
import json

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from fedjax_tl import report
from fedjax_tl.cli import main

TIERS = ("1", "0.5")


def _write_run(path, policy, final, start=(0.5, 0.25), rounds=(0, 2, 4)):
  """A run directory: accuracy moves linearly from `start` to `final`."""
  path.mkdir(parents=True)
  records = []
  for i, r in enumerate(rounds):
    t = i / (len(rounds) - 1)
    acc = {k: s + t * (f - s) for k, s, f in zip(TIERS, start, final)}
    records.append({"round": r, "accuracy": acc["1"],
                    "per_tier_accuracy": acc, "bytes_up": 1e6 * r,
                    "bytes_down": 2e6 * r, "sim_seconds": 30.0 * r})
  (path / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in records))
  last = records[-1]
  (path / "summary.json").write_text(json.dumps({
      "accuracy": last["accuracy"], "per_tier_accuracy": last[
          "per_tier_accuracy"], "worst_tier_accuracy": min(final),
      "bytes_up": last["bytes_up"], "bytes_down": last["bytes_down"],
      "sim_seconds": last["sim_seconds"], "rounds": rounds[-1],
      "policy": policy, "algorithm": "fedavg"}))


def _write_csv(path, rows):
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def _sweep_rows():
  # 3 client_lr x 2 mu x 2 seeds; alpha is constant, `note` is a column a
  # later sweep.csv might add. Accuracy is a known function of the setting.
  rows = []
  for lr in (0.05, 0.1, 0.2):
    for mu in (0.0, 0.01):
      for seed in (0, 1):
        acc = 0.5 + lr + 10 * mu + 0.02 * seed
        rows.append({"alpha": 0.5, "client_lr": lr, "mu": mu, "seed": seed,
                     "accuracy": acc, "worst_tier_accuracy": acc - 0.3,
                     "tier_1_accuracy": acc, "tier_0.5_accuracy": acc - 0.3,
                     "bytes_up": 1e6, "bytes_down": 1e6, "sim_seconds": 2.0,
                     "note": "x"})
  return rows


def _table_rows(md, first_header):
  """The rows of the markdown table whose header starts `| first_header |`."""
  lines = md.splitlines()
  start = next(i for i, l in enumerate(lines)
               if l.startswith(f"| {first_header} |"))
  rows = []
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    rows.append([c.strip() for c in line.strip("|").split("|")])
  return rows


def test_report_writes_valid_pngs_and_tables_matching_the_files(tmp_path,
                                                                capsys):
  _write_run(tmp_path / "a", "heterofl", final=(0.8, 0.6))
  _write_run(tmp_path / "b", "fjord", final=(0.7, 0.65))
  cmp = tmp_path / "cmp"
  _write_run(cmp / "heterofl", "heterofl", final=(0.8, 0.6))
  _write_csv(cmp / "comparison.csv", [
      {"policy": p, "accuracy": a, "worst_tier_accuracy": w,
       "tier_1_accuracy": a, "tier_0.5_accuracy": w, "bytes_up": 3e6,
       "bytes_down": 6e6, "sim_seconds": 12.5}
      for p, a, w in (("heterofl", 0.8, 0.6), ("fjord", 0.75, 0.7))])
  (tmp_path / "sw").mkdir()
  _write_csv(tmp_path / "sw" / "sweep.csv", _sweep_rows())
  out = tmp_path / "out"
  code = main(["report", str(tmp_path / "a"), str(tmp_path / "b"), str(cmp),
               str(tmp_path / "sw"), "--out", str(out)])
  assert code == 0, capsys.readouterr().err

  md = (out / "report.md").read_text()
  pngs = sorted(p.name for p in out.glob("*.png"))
  assert pngs == sorted(
      ["accuracy_vs_rounds.png", "accuracy_vs_sim_time.png",
       "accuracy_vs_bytes.png", "tier_accuracy.png", "cmp_tiers.png",
       "cmp_accuracy_vs_rounds.png", "cmp_accuracy_vs_sim_time.png",
       "cmp_accuracy_vs_bytes.png", "sw_heatmap.png"])
  for name in pngs:
    assert f"![{name}]({name})" in md
    with Image.open(out / name) as image:
      image.verify()  # a whole, well-formed PNG
      assert image.format == "PNG" and min(image.size) > 200

  # Run table: accuracy, worst tier, each tier, MB up + down, simulated s.
  assert _table_rows(md, "run") == [
      ["a", "heterofl", "fedavg", "4", "0.800", "0.600", "0.800", "0.600",
       "12", "120"],
      ["b", "fjord", "fedavg", "4", "0.700", "0.650", "0.700", "0.650",
       "12", "120"]]
  assert _table_rows(md, "policy") == [
      ["heterofl", "0.800", "0.600", "0.800", "0.600", "9", "12.5"],
      ["fjord", "0.750", "0.700", "0.750", "0.700", "9", "12.5"]]
  # Sweep table: one row per (client_lr, mu), mean and std over 2 seeds.
  sweep = _table_rows(md, "client_lr")
  assert len(sweep) == 6
  for row in sweep:
    lr, mu = float(row[0]), float(row[1])
    accs = np.array([0.5 + lr + 10 * mu, 0.5 + lr + 10 * mu + 0.02])
    assert row[2] == "2"
    assert row[3] == f"{accs.mean():.3f} ± {accs.std(ddof=1):.3f}"


def test_heatmap_means_over_seeds_on_the_two_most_varied_settings(tmp_path):
  path = tmp_path / "sweep.csv"
  _write_csv(path, _sweep_rows())
  table = report.load_table(path, "sw", ("accuracy",))
  fig = Figure()
  assert report.plot_heatmap(fig, table, "t") == ("client_lr", "mu")
  grid = np.asarray(fig.axes[0].images[0].get_array())
  # Rows mu (0, 0.01), columns client_lr (0.05, 0.1, 0.2); seeds averaged.
  expected = [[0.5 + lr + 10 * mu + 0.01 for lr in (0.05, 0.1, 0.2)]
              for mu in (0.0, 0.01)]
  np.testing.assert_allclose(grid, expected, atol=1e-12)


@pytest.mark.parametrize("setup,fragment", [
    (lambda d: None, "is not a directory"),
    (lambda d: d.mkdir(), "holds no metrics.jsonl"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text("{}\n")),
     "has no summary.json"),
    (lambda d: (d.mkdir(), (d / "sweep.csv").write_text("seed,mu\n0,1\n")),
     "no column 'accuracy'"),
])
def test_bad_directory_is_one_line_exit_2_and_writes_nothing(
    tmp_path, capsys, setup, fragment):
  bad = tmp_path / "bad"
  setup(bad)
  _write_run(tmp_path / "good", "heterofl", final=(0.8, 0.6))
  code = main(["report", str(tmp_path / "good"), str(bad), "--out",
               str(tmp_path / "out")])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1 and fragment in err, err
  assert str(bad) in err
  assert not (tmp_path / "out").exists()
