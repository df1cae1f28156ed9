"""The notebooks run top to bottom, headless, on their small settings."""

import os
import pathlib

import pytest

from conftest import COMPILATION_CACHE

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = pathlib.Path(__file__).parent.parent / "notebooks"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["quickstart", "migration_strategies"])
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
  for name, value in COMPILATION_CACHE.items():
    monkeypatch.setenv(name, value)
  client = nbclient.NotebookClient(
      notebook, timeout=300, kernel_name="python3",
      resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError on any failing cell
  outputs = [o for cell in notebook.cells if cell.cell_type == "code"
             for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  # The plots were drawn, inline.
  assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2
