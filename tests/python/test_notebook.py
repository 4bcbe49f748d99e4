"""The quickstart notebook runs top to bottom in a real kernel."""

import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = pathlib.Path(__file__).resolve().parents[2] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("FRAMESHM_DIR", str(tmp_path / "shm"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    assert "Error" not in outputs
    assert "alive epoch 1" in outputs
    # the last cell lists streams after closing: nothing left
    assert outputs.rstrip().endswith("[]")


def test_live_notebook_executes(tmp_path, monkeypatch):
    """notebooks/live.ipynb (frameshm.show and Frame._repr_png_) top to bottom in a kernel;
    without a browser the view encodes nothing, and everything is closed at the end."""
    monkeypatch.setenv("FRAMESHM_DIR", str(tmp_path / "shm"))
    nb = nbformat.read(NOTEBOOK.parent / "live.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outs)
    assert "Error" not in text and "Traceback" not in text
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outs), "the live view"
    pngs = [o["data"]["image/png"] for o in outs if "image/png" in o.get("data", {})]
    assert len(pngs) == 1, "the frame shows as a PNG"
    assert "encoded by the live view so far: 0" in text
    assert text.rstrip().endswith("[]")
