"""The notebooks under notebooks/ run end to end at tiny scale (their own asserts must hold) and are committed
without outputs."""

from __future__ import annotations

import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("01_quickstart", "02_backbones", "03_degradation", "04_transfer")
CELL_TIMEOUT_S = 300  # one cell; the whole tiny run of all four is about 4 minutes on 2 quiet cores


def load(name: str) -> nbformat.NotebookNode:
    return nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name: str) -> None:
    notebook = load(name)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells
    for index, cell in enumerate(code_cells):
        assert cell.outputs == [], f"{name}: code cell {index} has outputs; strip them before committing"
        assert cell.execution_count is None, f"{name}: code cell {index} has an execution count"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_runs_at_tiny_scale(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESNET_TASKS_NOTEBOOK_SCALE", "tiny")
    monkeypatch.setenv("RESNET_TASKS_NOTEBOOK_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    # The kernel must import this checkout (the package is installed editable; keep it first anyway).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    notebook = load(name)
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})  # fmt: skip
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the failing cell's traceback, when a cell or assert fails
    seconds = time.perf_counter() - start
    errors = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
              if output.output_type == "error"]  # fmt: skip
    assert not errors
    print(f"{name}: {seconds:.0f} s")
