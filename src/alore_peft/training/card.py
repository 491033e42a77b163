"""The training section of the model card ``alore-train`` writes into the adapter folder.

:mod:`alore_peft.hub` writes the rest of the card (what ALoRE is, how to load
the adapter, its configuration); this is what only the run knows: the data,
the schedule, the metrics per epoch and at the end, and the curve.
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["training_section"]


def _dataset_text(args, data) -> str:
    if args.dataset is None:
        return (
            f"the offline Fashion-MNIST low-data split ({args.offline_train_size} train / {args.offline_val_size} "
            f"validation / {args.offline_test_size} test images, drawn class-balanced from Debian's "
            "`dataset-fashion-mnist` by `alore_peft.offline`)"
        )
    return f"`{args.dataset}`" + (f" (configuration `{args.dataset_config}`)" if args.dataset_config else "")


def _accuracy(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.4f}"


def training_section(args, data, results: dict[str, Any], records: list[dict], curve: bool) -> str:
    """Markdown: data, schedule, results and per-epoch metrics of one ``alore-train`` run.

    Args:
        args: The run's :class:`~alore_peft.training.TrainArgs`.
        data: Its :class:`~alore_peft.training.data.DataBundle`.
        results: ``results.json``'s content so far.
        records: The ``metrics.jsonl`` records.
        curve: Whether ``training_curves.png`` sits next to the card.
    """
    classes = ", ".join(f"`{name}`" for name in data.labels[:20]) + (" ..." if len(data.labels) > 20 else "")
    lines = [
        "## Training",
        "",
        f"Trained with `alore-train` (alore-peft) on {_dataset_text(args, data)}: {results['train_images']:,} "
        f"training images of {results['num_labels']} classes ({classes}), split `{args.train_split}`.",
        "",
        f"- schedule: {results['optimizer_steps']} optimizer steps (batch {args.batch_size} x "
        f"{results['num_processes']} process(es) x {args.gradient_accumulation_steps} accumulation), AdamW lr "
        f"{args.learning_rate:g}, weight decay {args.weight_decay:g}, cosine with {args.warmup_epochs:g} warm-up "
        f"epoch(s), seed {args.seed}" + (f", recipe `{args.recipe}`" if args.recipe else ""),
        f"- images: {'the processor size' if args.image_size is None else f'{args.image_size} px'}, augmentation "
        f"`{args.augmentation}`",
        f"- selection: `{args.selection}` (epoch {results['selected_epoch']}, step {results['selected_step']})",
        "",
        "## Results",
        "",
        "| split | images | accuracy |",
        "|---|---|---|",
    ]
    if results.get("best_eval_accuracy") is not None:
        lines.append(f"| `{args.eval_split}` (best epoch) | | {_accuracy(results['best_eval_accuracy'])} |")
    if "accuracy" in results:
        lines.append(f"| `{results['final_split']}` | {results['final_images']:,} | {_accuracy(results['accuracy'])} |")
    if "merged_accuracy" in results:
        lines.append(
            f"| `{results['final_split']}`, merged model | {results['final_images']:,} | "
            f"{_accuracy(results['merged_accuracy'])} (largest logit difference {results['merged_max_logit_diff']:.2e}) |"
        )
    evals = [r for r in records if r.get("kind") == "eval"]
    if evals:
        lines += ["", "| epoch | step | train loss | eval loss | eval accuracy |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['epoch']} | {r['step']} | {r['train_loss']:.4f} | {r['loss']:.4f} | {r['accuracy']:.4f} |"
            for r in evals
        ]
    if curve:
        lines += ["", "![training curves](training_curves.png)"]
    return "\n".join(lines)
