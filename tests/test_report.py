"""`fedjax-tl report` on hand-written run, compare and sweep directories."""

import csv
import html
import json
import random
from xml.etree import ElementTree

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


def _table_rows(md, first_header, second=None):
  """The rows of the markdown table whose header starts `| first_header |`
  (and `second |` when given)."""
  lines = md.splitlines()
  start = next(i for i, l in enumerate(lines)
               if l.startswith(f"| {first_header} |") and (
                   second is None or l.startswith(
                       f"| {first_header} | {second} |")))
  rows = []
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    rows.append([c.strip() for c in line.strip("|").split("|")])
  return rows


# comparison_tiers.csv of the compare fixture: (policy, tier) -> accuracy,
# accuracy before, training memory, total bytes down (up: half), simulated
# seconds per round.
TIER_FIGURES = {
    ("heterofl", "1"): (0.8, 0.5, 2.5e6, 4e6, 2.0),
    ("heterofl", "0.5"): (0.6, 0.25, 0.7e6, 1e6, 3.0),
    ("fjord", "1"): (0.75, 0.5, 3.0e6, 5e6, 2.5),
    ("fjord", "0.5"): (0.7, 0.25, 0.5e6, 0.6e6, 1.0),
}


def _write_compare(path):
  """A compare directory (schema 2) with one policy's run directory."""
  _write_run(path / "heterofl", "heterofl", final=(0.8, 0.6))
  _write_csv(path / "comparison.csv", [
      {"schema_version": 2, "policy": p, "accuracy": a,
       "worst_tier_accuracy": w, "tier_1_accuracy": a, "tier_0.5_accuracy": w,
       "bytes_up": 3e6, "bytes_down": 6e6, "sim_seconds": 12.5,
       "slowest_tier": "0.5" if p == "heterofl" else "1",
       "server_flops": 2.41e9 if p == "fjord" else 0.0}
      for p, a, w in (("heterofl", 0.8, 0.6), ("fjord", 0.75, 0.7))])
  _write_csv(path / "comparison_tiers.csv", [
      {"schema_version": 2, "policy": p, "tier": t, "accuracy": acc,
       "initial_accuracy": start, "params": 1000 if t == "1" else 250,
       "model_bytes": 4000 if t == "1" else 1000, "forward_flops": 2e3,
       "train_flops_per_step": 3e6, "train_memory_bytes": memory,
       "client_bytes_down": 4000, "client_bytes_up": 2000,
       "bytes_down_per_round": down / 4, "bytes_up_per_round": down / 8,
       "bytes_down": down, "bytes_up": down / 2, "round_seconds": seconds,
       "slowest": seconds == max(v[4] for (q, _), v in TIER_FIGURES.items()
                                 if q == p)}
      for (p, t), (acc, start, memory, down, seconds) in TIER_FIGURES.items()])


def _tier_rows(md, first_header):
  """The rows of the per-tier cost table keyed by `first_header`."""
  return _table_rows(md, first_header, "tier")


def test_report_writes_valid_pngs_and_tables_matching_the_files(tmp_path,
                                                                capsys):
  _write_run(tmp_path / "a", "heterofl", final=(0.8, 0.6))
  _write_run(tmp_path / "b", "fjord", final=(0.7, 0.65))
  cmp = tmp_path / "cmp"
  _write_compare(cmp)
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
       "cmp_pareto_bytes.png", "cmp_pareto_memory.png", "cmp_pareto_time.png",
       "cmp_accuracy_vs_rounds.png", "cmp_accuracy_vs_sim_time.png",
       "cmp_accuracy_vs_bytes.png", "sw_heatmap.png"])
  for name in pngs:
    assert f"![{name}]({name})" in md
    with Image.open(out / name) as image:
      image.verify()  # a whole, well-formed PNG
      assert image.format == "PNG" and min(image.size) > 200
    svg = ElementTree.parse(out / name.replace(".png", ".svg")).getroot()
    assert svg.tag.endswith("svg")  # its SVG twin, well-formed XML

  # Run table: accuracy, worst tier, each tier, MB up + down, simulated s.
  assert _table_rows(md, "run") == [
      ["a", "heterofl", "fedavg", "4", "0.800", "0.600", "0.800", "0.600",
       "12", "120"],
      ["b", "fjord", "fedavg", "4", "0.700", "0.650", "0.700", "0.650",
       "12", "120"]]
  # ... and their per-tier costs: not in these (version 1) summaries.
  assert [r[4:] for r in _tier_rows(md, "run")] == [["-"] * 7] * 4
  assert _table_rows(md, "policy") == [
      ["heterofl", "0.800", "0.600", "0.800", "0.600", "9", "12.5", "0.5",
       "0"],
      ["fjord", "0.750", "0.700", "0.750", "0.700", "9", "12.5", "1",
       "2.41"]]
  # The per-tier cost table, figures converted by hand, each byte column in
  # the unit of its largest value: kB of the model, MB of memory, MB down
  # and kB up per round (4 rounds), MB in total.
  assert ("| model kB | train memory MB | down / round MB | up / round kB | "
          "down + up total MB | MFLOP / step | s / round |") in md
  assert _tier_rows(md, "policy") == [
      ["heterofl", "1", "0.500 → 0.800", "1,000", "4", "2.5", "1", "500",
       "6", "3", "2"],
      ["heterofl", "0.5", "0.250 → 0.600", "250", "1", "0.7", "0.25",
       "125", "1.5", "3", "3 (slowest)"],
      ["fjord", "1", "0.500 → 0.750", "1,000", "4", "3", "1.25", "625",
       "7.5", "3", "2.5 (slowest)"],
      ["fjord", "0.5", "0.250 → 0.700", "250", "1", "0.5", "0.15", "75",
       "0.9", "3", "1"]]
  assert "tier 1: heterofl, tier 0.5: fjord" in md

  # report.html: every table's cells, every PNG inline, nothing fetched.
  page = (out / "report.html").read_text()
  assert "http://" not in page and "https://" not in page
  assert page.count("data:image/png;base64,") == len(pngs)
  assert page.count("<table>") == sum(
      line.startswith("| --- |") for line in md.splitlines())
  for row in _table_rows(md, "policy") + _tier_rows(md, "policy"):
    assert "".join(f"<td>{html.escape(c, quote=False)}</td>"
                   for c in row) in page
  # Sweep table: one row per (client_lr, mu), mean and std over 2 seeds.
  sweep = _table_rows(md, "client_lr")
  assert len(sweep) == 6
  for row in sweep:
    lr, mu = float(row[0]), float(row[1])
    accs = np.array([0.5 + lr + 10 * mu, 0.5 + lr + 10 * mu + 0.02])
    assert row[2] == "2"
    assert row[3] == f"{accs.mean():.3f} ± {accs.std(ddof=1):.3f}"


@pytest.mark.parametrize("initial", [None, 0.4])
def test_heatmap_means_over_seeds_on_the_two_most_varied_settings(
    tmp_path, initial):
  path = tmp_path / "sweep.csv"
  rows = _sweep_rows()
  if initial is not None:  # sweep.csv of schema 2: where the runs started
    rows = [{"schema_version": 2, **r, "initial_accuracy": initial,
             "initial_worst_tier_accuracy": initial - 0.3} for r in rows]
  _write_csv(path, rows)
  table = report.load_table(path, "sw", ("accuracy",))
  fig = Figure()
  assert report.plot_heatmap(fig, table, "t") == ("client_lr", "mu")
  image = fig.axes[0].images[0]
  grid = np.asarray(image.get_array())
  # Rows mu (0, 0.01), columns client_lr (0.05, 0.1, 0.2); seeds averaged.
  expected = [[0.5 + lr + 10 * mu + 0.01 for lr in (0.05, 0.1, 0.2)]
              for mu in (0.0, 0.01)]
  np.testing.assert_allclose(grid, expected, atol=1e-12)
  # Colours start at the stated baseline: the start accuracy, else the
  # lowest cell; the colour bar's label says which.
  low, high = image.get_clim()
  assert low == pytest.approx(np.min(expected) if initial is None else initial)
  assert high == pytest.approx(np.max(expected))
  label = fig.axes[2].get_ylabel()  # the first panel's colour bar
  assert f"colour from {low:.3f}" in label
  assert ("before federated training" if initial else "lowest cell") in label
  # Each cell: mean, sample std over its 2 seeds (0.02 apart), count.
  texts = sorted(t.get_text() for t in fig.axes[0].texts)
  std = np.std([0, 0.02], ddof=1)
  assert texts == sorted(f"{m:.3f}\n± {std:.3f}\n(n=2)"
                         for row in expected for m in row)
  assert "2 seeds" in fig.get_suptitle() and "t:" in fig.get_suptitle()


def _pareto_by_brute_force(costs, accs):
  """The indices no other point beats on both (strictly on one)."""
  return {i for i in range(len(costs))
          if not any(costs[j] <= costs[i] and accs[j] >= accs[i] and
                     (costs[j] < costs[i] or accs[j] > accs[i])
                     for j in range(len(costs)))}


def test_pareto_front_and_best_policy_against_brute_force():
  rng = random.Random(0)
  for _ in range(200):
    n = rng.randint(1, 9)
    # Few distinct values, so ties in cost, accuracy or both are common.
    costs = [float(rng.randint(1, 5)) for _ in range(n)]
    accs = [rng.randint(0, 4) / 4 for _ in range(n)]
    front = report.pareto_front(costs, accs)
    assert set(front) == _pareto_by_brute_force(costs, accs)
    assert [costs[i] for i in front] == sorted(costs[i] for i in front)
    top = max(accs)
    cheapest = min(c for c, a in zip(costs, accs) if a == top)
    best = report.best_policy(costs, accs)
    assert (accs[best], costs[best]) == (top, cheapest)
    assert best == min(i for i in range(n)
                       if (accs[i], costs[i]) == (top, cheapest))
  # A point without an accuracy or a cost is on no front.
  assert report.pareto_front([1.0, float("nan"), 3.0],
                             [0.5, 0.9, float("nan")]) == [0]


def test_pareto_plot_draws_each_tiers_front_and_best(tmp_path):
  _write_compare(tmp_path / "cmp")
  rows = report.load_table(tmp_path / "cmp" / "comparison_tiers.csv", "c",
                           ("tier",)).rows
  for row in rows:
    row["tier"] = f"{row['tier']:g}"
  fig = Figure()
  assert report.plot_pareto(fig, rows, "memory", "t") == {
      "1": "heterofl", "0.5": "fjord"}
  for ax, tier in zip(fig.axes, ("1", "0.5")):
    mine = [r for r in rows if r["tier"] == tier]
    xs = [r["train_memory_bytes"] / 1e6 for r in mine]  # MB
    ys = [r["accuracy"] for r in mine]
    (line,) = ax.lines  # the front, as steps
    front = sorted(_pareto_by_brute_force(xs, ys), key=lambda i: xs[i])
    np.testing.assert_allclose(line.get_xdata(), [xs[i] for i in front])
    np.testing.assert_allclose(line.get_ydata(), [ys[i] for i in front])
    assert ax.get_xlabel() == "training memory per device (MB)"
    assert ax.get_title().startswith(f"tier {tier}: best ")


def test_report_of_a_compare_directory_before_per_tier_costs(tmp_path):
  # Schema 1: no schema_version, no comparison_tiers.csv.
  cmp = tmp_path / "old"
  cmp.mkdir()
  _write_csv(cmp / "comparison.csv", [
      {"policy": "heterofl", "accuracy": 0.8, "worst_tier_accuracy": 0.6,
       "tier_1_accuracy": 0.8, "tier_0.5_accuracy": 0.6, "bytes_up": 3e6,
       "bytes_down": 6e6, "sim_seconds": 12.5}])
  written = report.report([cmp])
  md = (cmp / "report" / "report.md").read_text()
  assert "predates comparison_tiers.csv" in md
  assert _table_rows(md, "policy") == [
      ["heterofl", "0.800", "0.600", "0.800", "0.600", "9", "12.5", "-", "-"]]
  assert sorted(p.name for p in written if p.suffix == ".png") == [
      "old_tiers.png"]


@pytest.mark.parametrize("setup,fragment", [
    (lambda d: None, "is not a directory"),
    (lambda d: d.mkdir(), "holds no metrics.jsonl"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text("{}\n")),
     "has no summary.json"),
    (lambda d: (d.mkdir(), (d / "sweep.csv").write_text("seed,mu\n0,1\n")),
     "no column 'accuracy'"),
    (lambda d: _write_run(d, "heterofl", final=(0.8, 0.6)) or (
        d / "summary.json").write_text(json.dumps({
            "schema_version": 99, "per_tier_accuracy": {"1": 0.5}})),
     "schema_version=99 is newer than this fedjax-tl reads"),
    (lambda d: (d.mkdir(), (d / "sweep.csv").write_text(
        "schema_version,seed,accuracy,worst_tier_accuracy\nx,0,1,1\n")),
     "schema_version='x' is not a version number"),
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
