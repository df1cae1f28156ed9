"""The notebooks run top to bottom, headless, on their small settings."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import COMPILATION_CACHE

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = pathlib.Path(__file__).parent.parent / "notebooks"
# The inline figures each notebook draws at its small settings, counted by
# hand from its cells (plt.show() calls; the sweep's report heat map).
FIGURES = {"quickstart": 4, "migration_strategies": 2, "sweep": 3}


def test_every_notebook_is_run_here():
  assert set(FIGURES) == {p.stem for p in NOTEBOOKS.glob("*.ipynb")}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_runs_clean_with_small_settings(tmp_path, monkeypatch, name):
  notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  # Committed without outputs: diffs stay readable, no stale figures.
  assert all(not cell.get("outputs") for cell in notebook.cells
             if cell.cell_type == "code")
  assert any("parameters" in cell.metadata.get("tags", ())
             for cell in notebook.cells)
  # The kernel inherits the environment: small settings, a private cwd, and
  # the package importable from this checkout.
  monkeypatch.setenv("FEDJAX_TL_SMALL", "1")
  monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline one
  src = str(NOTEBOOKS.parent / "src")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      p for p in (src, os.environ.get("PYTHONPATH")) if p))
  # The tests' compilation cache: the notebooks' small runs share programs.
  for key, value in COMPILATION_CACHE.items():
    monkeypatch.setenv(key, value)
  client = nbclient.NotebookClient(
      notebook, timeout=300, kernel_name="python3",
      resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError on any failing cell
  outputs = [o for cell in notebook.cells if cell.cell_type == "code"
             for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  # The plots were drawn, inline.
  assert sum("image/png" in o.get("data", {}) for o in outputs) == \
      FIGURES[name]


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_install_cell_installs_the_checkout_or_says_what_to_run(
    tmp_path, monkeypatch, capsys, name):
  notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  source = next(c.source for c in notebook.cells if c.cell_type == "code")
  assert "YOUR_ORG" not in (NOTEBOOKS / f"{name}.ipynb").read_text()
  calls = []
  monkeypatch.setattr(subprocess, "run",
                      lambda args, **kwargs: calls.append(args))
  monkeypatch.setattr(importlib.util, "find_spec", lambda *args: None)
  # No checkout (Colab): one line saying what to do, nothing installed.
  monkeypatch.chdir(tmp_path)
  exec(source, {})  # pylint: disable=exec-used
  out = capsys.readouterr().out
  assert out.count("\n") == 1 and "fedjax_tl" in out and not calls
  # In a checkout's notebooks/: that checkout, pip-installed.
  checkout = tmp_path / "repo"
  (checkout / "src" / "fedjax_tl").mkdir(parents=True)
  (checkout / "notebooks").mkdir()
  (checkout / "pyproject.toml").write_text("")
  monkeypatch.chdir(checkout / "notebooks")
  exec(source, {})  # pylint: disable=exec-used
  assert calls == [[sys.executable, "-m", "pip", "install", "-q",
                    str(checkout)]]
  assert not capsys.readouterr().out
