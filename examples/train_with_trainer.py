"""Fine-tune an image classifier with ALoRE through the Hugging Face ``Trainer``, then evaluate it.

The same data and model helpers as ``alore-train``, but the loop is
``transformers.Trainer``. Because the model is a ``PeftModel``, the Trainer
saves only the adapter (``adapter_config.json`` + ``adapter_model.safetensors``,
the new classifier head included, and the model card), never the frozen
backbone. After training it evaluates on ``--eval-split`` and prints the
accuracy.

    alore-prepare-data fashion-mnist ./data/fashion-mnist --train-size 200 --test-size 100
    python examples/train_with_trainer.py --model-config tiny-vit --dataset ./data/fashion-mnist \
        --eval-split test --output-dir runs/trainer --max-steps 10 --cpu

Without ``--dataset`` / ``--model`` it uses the offline Fashion-MNIST split and
DINOv2 ViT-S/14 that ``alore-train`` uses by default (its ``validation`` split
is the default ``--eval-split``).
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import numpy as np
import torch
from transformers import EvalPrediction, Trainer, TrainingArguments, set_seed

from alore_peft.training import TrainArgs
from alore_peft.training.data import ImageClassificationDataset, ImageTransform, load_data
from alore_peft.training.modeling import attach_alore, build_model


def collate_for_trainer(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Batch examples for ``model(pixel_values=..., labels=...)``."""
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),  # (B, 3, H, W)
        "labels": torch.tensor([e["labels"] for e in examples], dtype=torch.long),  # (B,)
    }


def accuracy(prediction: EvalPrediction) -> dict[str, float]:
    """Share of examples whose highest logit is the label."""
    logits, labels = prediction.predictions, prediction.label_ids  # (N, num_labels), (N,)
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def main(argv: Optional[Sequence[str]] = None) -> Trainer:
    """Train with the Trainer, save the adapter to ``--output-dir`` and evaluate it.

    Returns:
        The ``Trainer`` (its ``model`` is the ``PeftModel``; ``trainer.eval_metrics``
        holds the evaluation's metrics).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default=None, help="save_to_disk folder, image folder or Hub name")
    parser.add_argument("--eval-split", default="validation", help="split evaluated after training (default %(default)s)")
    parser.add_argument("--model", default=None, help="AutoModelForImageClassification id or folder")
    parser.add_argument("--model-config", default=None, help="'tiny-vit' or a config.json: random weights")
    parser.add_argument("--output-dir", default="runs/trainer")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after N steps (-1: use --epochs)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=TrainArgs.learning_rate,
        help="peak learning rate (default %(default)g, alore-train's, which its alpha 16 assumes)",
    )
    parser.add_argument("--cpu", action="store_true", help="train on CPU even if a GPU is present")
    parser.add_argument("--seed", type=int, default=42)
    options = parser.parse_args(argv)

    # TrainArgs only carries the data/model/adapter settings (alore-train's defaults) to the shared helpers.
    args = TrainArgs(
        dataset=options.dataset, model=options.model, model_config=options.model_config, seed=options.seed,
        eval_split=options.eval_split, test_split="",
    )  # fmt: skip
    data = load_data(args)
    set_seed(options.seed)
    model, processor, _ = build_model(args, data.labels)
    model = attach_alore(model, args, num_labels=len(data.labels))
    model.print_trainable_parameters()

    transform = ImageTransform(processor, args.image_size, "none")
    train_set, eval_set = (
        ImageClassificationDataset(split, transform, args.image_column, args.label_column, data.label_to_id)
        for split in (data.train, data.eval)
    )
    training_args = TrainingArguments(
        output_dir=options.output_dir,
        max_steps=options.max_steps,
        num_train_epochs=options.epochs,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=options.learning_rate,
        weight_decay=1e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        use_cpu=options.cpu,
        report_to=[],
        save_strategy="no",  # only the final adapter below; no intermediate checkpoints
        remove_unused_columns=False,  # the dataset yields tensors, not named columns
        seed=options.seed,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collate_for_trainer,
        compute_metrics=accuracy,
    )
    trainer.train()
    trainer.save_model(options.output_dir)  # a PeftModel: writes the adapter files only
    trainer.eval_metrics = trainer.evaluate()
    print(
        f"{options.eval_split} accuracy {trainer.eval_metrics['eval_accuracy']:.4f} on {len(eval_set)} images; "
        f"adapter in {options.output_dir}"
    )
    return trainer


if __name__ == "__main__":
    main()
