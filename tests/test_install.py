"""The light install: `pip install .` (no extras) runs the main job.

pyproject.toml's core dependencies are what `fedjax-tl run|compare|sweep|
report` need; everything else is an extra, imported where it is used. The
fast test reads the package's imports; the slow one installs the package
into a fresh virtual environment, as a user would, and runs it there.
"""

import ast
import functools
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
  """A requirement's distribution name, normalised (PEP 503)."""
  name = re.match(r"[A-Za-z0-9._-]+", requirement).group()
  return re.sub(r"[-_.]+", "-", name).lower()


CORE = {_name(r) for r in PROJECT["dependencies"]}
EXTRAS = {_name(r) for extra in PROJECT["optional-dependencies"].values()
          for r in extra}


def _imports(path: pathlib.Path) -> tuple[set[str], set[str]]:
  """The top-level modules `path` imports when loaded (outside functions,
  `if TYPE_CHECKING:` left out), and those it imports inside functions."""
  tree = ast.parse(path.read_text())
  eager, lazy = set(), set()

  def visit(node: ast.AST, in_function: bool) -> None:
    for child in ast.iter_child_nodes(node):
      if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(
          child.test):
        continue
      names = []
      if isinstance(child, ast.Import):
        names = [alias.name for alias in child.names]
      elif isinstance(child, ast.ImportFrom) and not child.level:
        names = [child.module]
      (lazy if in_function else eager).update(n.split(".")[0] for n in names)
      visit(child, in_function or isinstance(
          child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

  visit(tree, False)
  return eager, lazy


@functools.cache
def _providers() -> dict[str, list[str]]:
  return importlib.metadata.packages_distributions()  # reads every RECORD


def _distributions(module: str) -> set[str]:
  """The installed distributions that provide top-level `module`."""
  return {_name(d) for d in _providers().get(module, [])}


THIRD_PARTY = lambda m: m not in sys.stdlib_module_names and m != "fedjax_tl"


def test_module_level_imports_are_core_dependencies():
  # What `import fedjax_tl.X` loads must come with `pip install .`; a
  # module only a feature needs is imported inside that feature's function
  # (with one line naming the extra when it is missing).
  outside = {}
  for path in [*(ROOT / "src").rglob("*.py"), *(ROOT / "configs").glob(
      "*.py")]:
    eager, _ = _imports(path)
    for module in filter(THIRD_PARTY, eager):
      if not _distributions(module) & CORE:
        outside.setdefault(module, []).append(str(path.relative_to(ROOT)))
  assert not outside


def test_lazy_imports_come_from_core_or_an_extra():
  unlisted = {}
  for path in (ROOT / "src").rglob("*.py"):
    _, lazy = _imports(path)
    for module in filter(THIRD_PARTY, lazy):
      dists = _distributions(module)
      if dists and not dists & (CORE | EXTRAS):
        unlisted.setdefault(module, []).append(str(path.relative_to(ROOT)))
  assert not unlisted


def test_the_main_job_needs_none_of_the_extras():
  # scikit-learn, pandas and dp-accounting were core before: the digits
  # ship in the package, DataFrames and DP accounting are extras now.
  assert not CORE & {"scikit-learn", "pandas", "dp-accounting",
                     "tensorflow-datasets", "jupyter", "pytest"}
  assert {"scikit-learn", "pandas", "dp-accounting", "pytest"} <= {
      _name(r) for r in PROJECT["optional-dependencies"]["dev"]}


def test_ci_installs_and_tests_as_the_readme_says():
  section = (ROOT / "README.md").read_text().split(
      "## The two commands")[1].split("\n## ")[0]
  run, tests = re.findall(r"```bash\n(.*?)\n```", section, re.S)
  assert run == "pip install . && fedjax-tl run"  # no extras
  install, test = tests.split(" && ")
  ci = (ROOT / ".ci" / "run").read_text().splitlines()
  assert f"python -m {install}" in ci and test in ci


def _checkout_copy(to: pathlib.Path) -> pathlib.Path:
  """The files `pip install .` reads (the build writes beside them)."""
  for name in ("src", "configs"):
    shutil.copytree(ROOT / name, to / name, ignore=shutil.ignore_patterns(
        "__pycache__", "*.egg-info"))
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, to)
  return to


@pytest.mark.slow
def test_a_fresh_venv_with_pip_install_dot_runs_and_reports(tmp_path):
  # A venv that sees no other packages, `pip install .` as the README says
  # (from the registry, or pip's configured local index), then the default
  # experiment (tiny) and its report, from outside any checkout.
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  bin_dir = venv / "bin"
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
  subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q",
                  "--no-compile", str(_checkout_copy(tmp_path / "checkout"))],
                 check=True, env=env, cwd=tmp_path)
  # Exactly the core: none of the extras came along.
  listed = subprocess.run(
      [str(bin_dir / "python"), "-m", "pip", "list", "--format=json"],
      check=True, env=env, capture_output=True, text=True).stdout
  installed = {_name(d["name"]) for d in json.loads(listed)}
  assert CORE <= installed
  assert not {"scikit-learn", "pandas", "dp-accounting", "pytest",
              "tensorflow-datasets"} & installed

  run = ["fedjax-tl", "run", "--workdir=run", "--no-progress",
         "--config.num_clients=30", "--config.clients_per_round=6",
         "--config.num_rounds=2", "--config.eval_every=1",
         "--config.hidden=(16,)", "--config.pretrain_steps=10",
         "--config.local_steps=2"]
  subprocess.run(run, check=True, env=env, cwd=tmp_path,
                 capture_output=True)
  records = [json.loads(line) for line in
             (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["round"] for r in records] == [0, 1, 2]
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert summary["accuracy"] == records[-1]["accuracy"]
  out = subprocess.run(["fedjax-tl", "report", "run", "--out", "report"],
                       check=True, env=env, cwd=tmp_path,
                       capture_output=True, text=True)
  assert "report.md" in out.stdout
  assert (tmp_path / "report" / "report.md").is_file()
  assert list((tmp_path / "report").glob("*.png"))
  # The shipped configs, by name, from the installed package.
  out = subprocess.run(
      [str(bin_dir / "python"), "-c", "import fedjax_tl; "
       "print(fedjax_tl.configs.get('compare_migration').policy); "
       "print(fedjax_tl.configs.DIRECTORY)"],
      check=True, env=env, cwd=tmp_path, capture_output=True,
      text=True).stdout.split()
  assert out[0] == "heterofl"
  assert pathlib.Path(out[1]).is_relative_to(venv)


def test_a_missing_extra_is_one_line_before_anything_runs(
    tmp_path, monkeypatch, capsys):
  # As the light install has it: no dp-accounting, no pandas.
  import fedjax_tl
  from fedjax_tl.cli import main
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if
                      name == "dp_accounting" else find_spec(name, *a))
  monkeypatch.setitem(sys.modules, "pandas", None)  # import raises
  assert main(["run", f"--workdir={tmp_path / 'dp'}", "--config.dp=True"]) \
      == 2
  assert capsys.readouterr().err == (
      'error: config.dp=True: needs dp-accounting for the privacy '
      'accounting: pip install "fedjax-tl[dp]"\n')
  with pytest.raises(fedjax_tl.UserError, match=re.escape(
      'DataFrames need pandas: pip install "fedjax-tl[notebooks]"')):
    fedjax_tl.compare(None, tmp_path / "cmp")
  assert not any(tmp_path.iterdir())
