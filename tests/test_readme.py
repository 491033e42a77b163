"""The README's quickstart runs as written, and CI runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_quickstart_runs_as_written(capsys):
    (code,) = _blocks("python")
    assert len(code.strip().splitlines()) <= 14, "the quickstart should stay short"
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert "trainable params:" in capsys.readouterr().out
    merged = namespace["merged"]
    assert not any("alore" in type(m).__module__ for m in merged.modules())
    assert isinstance(merged.vit.layers[0].attention.q_proj, nn.Linear)
    assert torch.isfinite(namespace["loss"])


def test_ci_runs_the_readme_test_command():
    test_command = next(b.strip() for b in _blocks("bash") if "pytest" in b)
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci_lines[-1] == test_command
