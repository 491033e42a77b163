"""Metrics of a run: one JSON record per line in ``metrics.jsonl``, and a PNG of the curves."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

__all__ = ["MetricsLog", "plot_curves"]


class MetricsLog:
    """Append-only JSONL log of ``{"kind": "train" | "eval" | "test", "step": ..., ...}`` records.

    Args:
        path: The ``.jsonl`` file.
        enabled: ``False`` on non-main processes: nothing is written.
    """

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def append(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read(self) -> list[dict[str, Any]]:
        """Every complete record (a last line cut short by a crash is left out)."""
        if not self.path.is_file():
            return []
        records = []
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                if not line.endswith("\n"):
                    break  # torn by an interruption while being written
                if line.strip():
                    records.append(json.loads(line))
        return records

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (written by an interrupted run after its last checkpoint).

        The kept records go to a temporary file renamed over the log, so an
        interruption here leaves the old log or the new one, never a mix.
        """
        if not self.enabled or not self.path.is_file():
            return
        kept = [r for r in self.read() if r.get("step", 0) <= step and r.get("kind") != "test"]
        temporary = self.path.with_name(self.path.name + ".tmp")
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in kept)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)


def plot_curves(records: list[dict[str, Any]], path: str | Path, title: Optional[str] = None) -> Path:
    """Plot training loss, evaluation loss and evaluation accuracy against the step.

    Args:
        records: Records of :class:`MetricsLog`.
        path: PNG file to write.
        title: Figure title.

    Returns:
        ``path``.

    Raises:
        ImportError: If matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "Plotting the training curves needs matplotlib: pip install 'alore-peft[train]' (or pip install "
            "matplotlib), or pass --no-plot."
        ) from error

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    # Figure() rather than pyplot: no global state, no GUI backend needed.
    fig = Figure(figsize=(10, 4), dpi=100)
    loss_ax, acc_ax = fig.subplots(1, 2)
    if train:
        loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", color="tab:blue")
    if evals:
        loss_ax.plot(
            [r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval loss", color="tab:orange"
        )
        acc_ax.plot([r["step"] for r in evals], [r["accuracy"] for r in evals], "o-", color="tab:green")
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_ylabel("cross-entropy")
    loss_ax.set_title("loss")
    loss_ax.legend()
    acc_ax.set_xlabel("optimizer step")
    acc_ax.set_ylabel("accuracy")
    acc_ax.set_title("eval accuracy")
    acc_ax.set_ylim(0, 1)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
