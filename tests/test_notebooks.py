"""The notebooks in notebooks/ run top to bottom and are committed without outputs.

Each notebook is executed with nbclient on a python3 (ipykernel) kernel in a temporary
working directory, as a user would run it: its cells assert their own outcomes (the loss
fell, the Hugging Face round trip is exact), so any failing cell fails the test with that
cell's traceback. The kernel imports this checkout's herd (PYTHONPATH) and sees one CPU
device, as in Colab: the suite's eight fake devices (tests/conftest.py) are taken out of
its XLA_FLAGS. HERD_NOTEBOOK_OUT=DIR keeps the executed notebooks (with outputs) there.
"""

import glob
import os
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
IDS = [os.path.basename(p) for p in NOTEBOOKS]
CELL_TIMEOUT_S = 1200  # one cell (training) on a loaded 2-core machine


def test_the_quickstart_notebook_exists():
    assert os.path.join(ROOT, "notebooks", "llama_quickstart.ipynb") in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    for n, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs, f"{path}: cell {n} has outputs (strip them)"
            assert cell.execution_count is None, f"{path}: cell {n} has an execution count"


def _one_device_xla_flags() -> str:
    flags = os.environ.get("XLA_FLAGS", "")
    return re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags).strip()


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    # The kernel inherits this environment: this checkout first on its path, one device.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    )
    monkeypatch.setenv("XLA_FLAGS", _one_device_xla_flags())
    monkeypatch.delenv("MPLBACKEND", raising=False)  # ipykernel's inline backend, as in Colab
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    try:
        client.execute()  # raises CellExecutionError naming the failing cell
    finally:
        keep = os.environ.get("HERD_NOTEBOOK_OUT")  # optional: keep the executed notebook
        if keep:
            os.makedirs(keep, exist_ok=True)
            nbformat.write(nb, os.path.join(keep, os.path.basename(path)))
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.get("output_type") == "error"
    ]
    assert not errors, errors
    if os.path.basename(path) == "llama_quickstart.ipynb":  # it ran in the temporary dir
        assert os.path.isdir(tmp_path / "workdir" / "quickstart" / "checkpoints")
