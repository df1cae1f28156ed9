"""The package's import graph: no cycles, names tested only in registries, and
no name used that is never bound."""

import ast
import pathlib
import re

import pytest

SRC = pathlib.Path(__file__).parent.parent / "src"
PACKAGE = SRC / "fedjax_tl"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(SRC).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking_lines(tree: ast.Module) -> set[int]:
  """Lines inside `if TYPE_CHECKING:` blocks (annotations only)."""
  lines = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
      for child in node.body:
        lines.update(range(child.lineno, child.end_lineno + 1))
  return lines


def _target(name: str) -> str | None:
  """The package module `name` refers to, or None outside the package."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def imports_of(module: str) -> set[str]:
  """The package modules `module` imports anywhere (functions included),
  except under `if TYPE_CHECKING:`. `from a import b` counts as importing
  the submodule `a.b` where there is one, else `a`."""
  path = MODULES[module]
  tree = ast.parse(path.read_text())
  skip = _type_checking_lines(tree)
  found = set()
  for node in ast.walk(tree):
    if getattr(node, "lineno", None) in skip:
      continue
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = [f"{node.module}.{alias.name}" if
               f"{node.module}.{alias.name}" in MODULES else node.module
               for alias in node.names]
    else:
      continue
    found.update(t for t in map(_target, names) if t and t != module)
  return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """A cycle of `graph` as a list of nodes (first repeated last), or None."""
  state = {}

  def visit(node, trail):
    state[node] = "open"
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return trail[trail.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt, trail + [nxt])
        if cycle:
          return cycle
    state[node] = "done"
    return None

  for start in sorted(graph):
    if start not in state:
      cycle = visit(start, [start])
      if cycle:
        return cycle
  return None


def test_find_cycle_finds_one_and_only_one():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c",
                                                              "a"]
  assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_the_package_has_no_import_cycle():
  graph = {module: imports_of(module) for module in MODULES}
  assert "fedjax_tl.policies.base" in graph["fedjax_tl.simulation"] or \
      "fedjax_tl.policies" in graph["fedjax_tl.simulation"]  # edges are read
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


@pytest.mark.parametrize("pattern, registry", [
    (r"policy ==|policy in|policy not in|_POLICIES", "fedjax_tl/policies/"),
    (r"aggregator ==|aggregator\"\] ==|aggregator in|_AGGREGATORS",
     "fedjax_tl/aggregators/"),
])
def test_names_are_tested_only_in_their_registry(pattern, registry):
  offenders = [f"{path.relative_to(SRC)}:{i}" for path in PACKAGE.rglob("*.py")
               if registry not in path.as_posix()
               for i, line in enumerate(path.read_text().splitlines(), 1)
               if re.search(pattern, line)]
  assert offenders == []


def _fresh_python(*lines: str) -> None:
  """Runs `lines` in a new interpreter (nothing imported yet); each
  `assert` must hold."""
  import subprocess
  import sys
  result = subprocess.run([sys.executable, "-c", "\n".join(lines)],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr


def test_the_command_and_the_report_import_no_jax():
  """`fedjax-tl` installs its signal handlers before jax is imported (a
  Ctrl-C during `import jax` is then one line), and `report` needs no jax;
  the package's config names still resolve on first use."""
  _fresh_python(
      "import sys, fedjax_tl, fedjax_tl.cli, fedjax_tl.report",
      "assert 'jax' not in sys.modules, 'jax imported'",
      "from fedjax_tl.config import ExperimentConfig, validate",
      "assert fedjax_tl.validate is validate",
      "assert fedjax_tl.ExperimentConfig is ExperimentConfig",
      "assert set(fedjax_tl.__all__) <= set(dir(fedjax_tl))")


def test_a_run_imports_neither_matplotlib_nor_scipy_stats():
  """What every `fedjax-tl run` imports leaves out the plots (matplotlib)
  and DP's slot count (scipy.stats), a second or more of each process's
  start; the report's names all resolve from the package."""
  _fresh_python(
      "import sys, fedjax_tl.runner, fedjax_tl.experiment.loop",
      "late = {'matplotlib', 'scipy.stats'} & set(sys.modules)",
      "assert not late, late",
      "from fedjax_tl import report",
      "assert all(getattr(report, n) for n in report.__all__)",
      "assert report.plot_accuracy.__module__ == 'fedjax_tl.report.plots'")


def undefined_names(paths) -> list[str]:
  """pyflakes' undefined-name messages for every file under `paths` (a name
  used but never bound: a helper renamed in one module and still called by
  its old name in another fails only when that line runs)."""
  from pyflakes import api, messages, reporter

  found = []

  class Collect(reporter.Reporter):

    def __init__(self):
      super().__init__(None, None)

    def flake(self, message):
      if isinstance(message, messages.UndefinedName):
        found.append(str(message))

    def syntaxError(self, filename, msg, lineno, offset, text):
      found.append(f"{filename}:{lineno}: {msg}")

  for path in paths:
    api.checkRecursive([str(path)], Collect())
  return found


def test_undefined_names_finds_one(tmp_path):
  (tmp_path / "m.py").write_text("def f():\n  return _records(1)\n")
  assert undefined_names([tmp_path]) == [
      f"{tmp_path / 'm.py'}:2:10: undefined name '_records'"]


def test_no_undefined_names_in_the_package_tests_and_benchmarks():
  root = SRC.parent
  assert undefined_names(
      [PACKAGE, root / "tests", root / "benchmarks"]) == []


def missing_attributes(paths) -> list[str]:
  """`module.name` reads of a package module (imported as `from fedjax_tl.x
  import module` or `import fedjax_tl.x as module`) whose module has no
  `name`: what pyflakes cannot see, e.g. a function moved to another
  module and still called through the old one."""
  import importlib

  found = []
  for path in (p for root in paths for p in sorted(
      pathlib.Path(root).rglob("*.py"))):
    tree = ast.parse(path.read_text())
    modules = {}  # local name -> package module
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and not node.level and (
          node.module or "").split(".")[0] == "fedjax_tl":
        for alias in node.names:
          if f"{node.module}.{alias.name}" in MODULES:
            modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
      elif isinstance(node, ast.Import):
        for alias in node.names:
          if alias.asname and alias.name in MODULES:
            modules[alias.asname] = alias.name
    # A name also bound otherwise (a variable, an argument) is left out.
    for node in ast.walk(tree):
      if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) or \
          isinstance(node, ast.arg):
        modules.pop(getattr(node, "id", getattr(node, "arg", None)), None)
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load)
          and isinstance(node.value, ast.Name) and node.value.id in modules):
        module = importlib.import_module(modules[node.value.id])
        if not hasattr(module, node.attr):
          found.append(f"{path}:{node.lineno}: {modules[node.value.id]} has "
                       f"no {node.attr!r}")
  return found


def test_missing_attributes_finds_one(tmp_path):
  (tmp_path / "m.py").write_text(
      "from fedjax_tl import checkpoint\ncheckpoint.DiskFullError\n")
  assert missing_attributes([tmp_path]) == [
      f"{tmp_path / 'm.py'}:2: fedjax_tl.checkpoint has no 'DiskFullError'"]


def test_no_package_module_attribute_is_missing():
  root = SRC.parent
  assert missing_attributes(
      [PACKAGE, root / "tests", root / "benchmarks"]) == []
