"""The ``alore-train`` loop: Accelerate, AdamW, cosine warm-up, checkpoints, resume, merge.

One function, :func:`train`, runs a whole job on one process or many (launch
it with ``accelerate launch``); :func:`main` is the console script.

Output layout (``args.output_dir``)::

    train_args.json           the resolved TrainArgs
    metrics.jsonl             one JSON record per log step / evaluation
    training_curves.png       loss and accuracy curves
    checkpoints/step-NNNNNNN  resumable states (accelerator.save_state)
    adapter/                  the selected adapter: adapter_config.json, adapter_model.safetensors
    merged/                   the backbone with the adapter folded in, and its image processor
    results.json              final accuracies, the merge check, parameter counts
    ranks/rankN.json          with --rank-report: one file per process
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .args import TrainArgs, parse_args
from .data import ImageClassificationDataset, ImageTransform, collate, load_data
from .metrics import MetricsLog, plot_curves
from .modeling import attach_alore, build_model

__all__ = ["SimulatedInterruption", "TrainState", "EpochShuffleSampler", "train", "main", "adapter_digest"]

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
CHECKPOINT_DIR = "checkpoints"
TRAINABLE_FILE = "trainable_parameters.safetensors"


class SimulatedInterruption(RuntimeError):
    """Raised by ``--stop-after-steps`` to stand in for a crash or a pre-empted job."""


class TrainState:
    """Loop counters saved in every checkpoint (``accelerator.register_for_checkpointing``)."""

    def __init__(self) -> None:
        self.global_step = 0
        self.epoch = 0  # epoch in progress
        self.batches_done = 0  # micro-batches of that epoch already trained on (this process)
        self.best_accuracy: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.best_step: Optional[int] = None
        self.epoch_loss_sum = 0.0
        self.epoch_loss_count = 0
        self.window_loss_sum = 0.0
        self.window_loss_count = 0
        self.init_rules_digest: Optional[str] = None

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A random order that depends only on ``(seed, epoch)``, so every process and every resume agree.

    Args:
        size: Dataset length.
        seed: Base seed.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def start_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s order. (Not ``set_epoch``: Accelerate calls that with its own counter.)"""
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def adapter_digest(model: nn.Module, only: Optional[str] = None) -> str:
    """SHA-256 of the trainable parameters (names, shapes and bytes), optionally those whose name contains ``only``."""
    digest = hashlib.sha256()
    for name, param in sorted(_trainable(model).items()):
        if only is not None and only not in name:
            continue
        tensor = param.detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _checkpoints(output_dir: Path) -> list[Path]:
    return sorted((output_dir / CHECKPOINT_DIR).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def _resolve_checkpoint(args: TrainArgs) -> Path:
    if args.resume_from_checkpoint == "latest":
        found = _checkpoints(Path(args.output_dir))
        if not found:
            raise ValueError(
                f"--resume-from-checkpoint latest found no checkpoint under {args.output_dir}/{CHECKPOINT_DIR}; "
                "start without it, or pass a checkpoint folder."
            )
        return found[-1]
    path = Path(args.resume_from_checkpoint).expanduser()
    if not (path / "train_state.json").is_file():
        raise ValueError(
            f"--resume-from-checkpoint {args.resume_from_checkpoint!r} is not a checkpoint folder (no "
            f"train_state.json); pass one of {args.output_dir}/{CHECKPOINT_DIR}/step-* or 'latest'."
        )
    return path


def _register_trainable_only_checkpoints(accelerator, model: nn.Module) -> None:
    """Make ``save_state``/``load_state`` write and read only the trainable parameters.

    The frozen backbone never changes, so a checkpoint is the adapter, the head,
    the optimizer, the scheduler, the RNG states and the loop counters: a few
    MB instead of the whole model. (FSDP and DeepSpeed save models their own
    way; their lists arrive empty here and are left alone.)
    """
    from safetensors.torch import load_file, save_file

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if not weights:
            return
        if accelerator.is_main_process:
            state = {n: p.detach().cpu().contiguous() for n, p in _trainable(accelerator.unwrap_model(model)).items()}
            save_file(state, str(Path(output_dir) / TRAINABLE_FILE))
        weights.clear()

    def load_hook(models: list, input_dir: str) -> None:
        if not models:
            return
        state = load_file(str(Path(input_dir) / TRAINABLE_FILE))
        params = _trainable(accelerator.unwrap_model(model))
        if set(state) != set(params):
            missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            raise ValueError(
                f"Checkpoint {input_dir} does not match this model's trainable parameters (missing {missing[:3]}, "
                f"unexpected {extra[:3]}); resume with the same model and adapter settings it was written with."
            )
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name])
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _evaluate(accelerator, model: nn.Module, loader, autocast: bool = True) -> dict[str, Any]:
    """Loss, accuracy and the logits of every example (gathered from all processes, in order).

    ``autocast=False`` runs in the weights' dtype (float32) even under ``--mixed-precision``.
    """
    model.eval()
    all_logits, all_labels = [], []
    with torch.no_grad():
        for batch in loader:
            with accelerator.autocast() if autocast else nullcontext():
                logits = model(pixel_values=batch["pixel_values"]).logits
            logits, labels = accelerator.gather_for_metrics((logits.float(), batch["labels"]))
            all_logits.append(logits.cpu())
            all_labels.append(labels.cpu())
    logits = torch.cat(all_logits)  # (N, num_labels)
    labels = torch.cat(all_labels)  # (N,)
    loss = nn.functional.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(-1) == labels).float().mean().item()
    return {"loss": loss, "accuracy": accuracy, "logits": logits, "labels": labels, "count": len(labels)}


def _reduce_mean(accelerator, total: float, count: int, device) -> float:
    values = torch.tensor([total, float(count)], device=device, dtype=torch.float64)
    values = accelerator.reduce(values, reduction="sum")
    return (values[0] / values[1].clamp(min=1)).item()


def _multi_process_without_accelerator() -> bool:
    """``True`` when launched as several processes on a machine without a GPU (or other accelerator).

    ``accelerate launch --multi_gpu`` on such a machine would otherwise start
    independent single-process jobs; ``Accelerator(cpu=True)`` makes them one
    DDP job over gloo instead.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    has_accelerator = (
        torch.cuda.is_available()
        or (hasattr(torch, "xpu") and torch.xpu.is_available())
        or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())
    )
    return world_size > 1 and not has_accelerator


# Largest |merged - unmerged| logit allowed, relative to the largest logit (at least 1): folding
# changes only the float32 summation order.
MERGE_TOLERANCE = 1e-3


def train(args: TrainArgs) -> dict[str, Any]:
    """Run a training job and return its results (also written to ``results.json``).

    Args:
        args: The resolved arguments.

    Returns:
        ``results.json``'s content: accuracies, the merge check, parameter
        counts, the selected epoch and the output paths.

    Raises:
        SimulatedInterruption: When ``args.stop_after_steps`` is reached.
        ValueError: For unusable data, model or checkpoint arguments.
        RuntimeError: If the merged model does not predict like the adapter model.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    started = time.time()
    output_dir = Path(args.output_dir)
    checkpoint = _resolve_checkpoint(args) if args.resume_from_checkpoint else None  # fail before any work
    if args.merge and not (args.eval_split or args.test_split):
        raise ValueError(
            "--merge checks the merged model on held-out data, but --eval-split and --test-split are both empty; "
            "name a split, or pass --no-merge."
        )
    accelerator = Accelerator(
        cpu=args.cpu or _multi_process_without_accelerator(),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
    )
    main_process = accelerator.is_main_process

    # Preparing the offline default writes to the cache: the main process goes first.
    with accelerator.main_process_first():
        data = load_data(args)
        set_seed(args.seed)  # the new head starts the same on every process
        model, processor, model_source = build_model(args, data.labels)
    if main_process:  # only once the data and the model are known to load
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_args.json").write_text(json.dumps(args.to_dict(), indent=2) + "\n")
    set_seed(args.seed)
    model = attach_alore(model, args, num_labels=len(data.labels))
    trainable_parameters = sum(p.numel() for p in _trainable(model).values())
    all_parameters = sum(p.numel() for p in model.parameters())

    train_transform = ImageTransform(processor, args.image_size, args.augmentation)
    eval_transform = ImageTransform(processor, args.image_size, "none")
    train_set = ImageClassificationDataset(
        data.train, train_transform, args.image_column, args.label_column, data.label_to_id, args.seed
    )
    sampler = EpochShuffleSampler(len(train_set), args.seed)
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=args.batch_size, sampler=sampler, collate_fn=collate, num_workers=args.num_workers
    )

    def eval_loader_for(split):
        if split is None:
            return None
        dataset = ImageClassificationDataset(
            split, eval_transform, args.image_column, args.label_column, data.label_to_id
        )
        return torch.utils.data.DataLoader(
            dataset, batch_size=args.eval_batch_size, shuffle=False, collate_fn=collate, num_workers=args.num_workers
        )

    eval_loader = eval_loader_for(data.eval)
    test_loader = eval_loader_for(data.test) if data.test is not None else None

    optimizer = torch.optim.AdamW(
        list(_trainable(model).values()), lr=args.learning_rate, weight_decay=args.weight_decay
    )
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    if test_loader is not None:
        test_loader = accelerator.prepare(test_loader)
    final_loader = test_loader if test_loader is not None else eval_loader

    # Steps are counted per process after sharding: each process sees len(train_loader) batches per epoch.
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    warmup_steps = min(total_steps, round(args.warmup_epochs * steps_per_epoch))
    # Stepped once per optimizer step on every process; not passed to prepare(), which would
    # step it num_processes times per call.
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_for_checkpointing(state)
    _register_trainable_only_checkpoints(accelerator, model)

    unwrapped = accelerator.unwrap_model(model)
    rules_key = "alore_rules"
    state.init_rules_digest = adapter_digest(unwrapped, only=rules_key)
    metrics = MetricsLog(output_dir / "metrics.jsonl", enabled=main_process)

    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        metrics.truncate_after(state.global_step)
        accelerator.print(f"Resumed from {checkpoint} at step {state.global_step} (epoch {state.epoch}).")
    elif main_process:
        # A fresh run starts over: an earlier run's log and checkpoints would mix with its own.
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(output_dir / CHECKPOINT_DIR, ignore_errors=True)
    accelerator.wait_for_everyone()

    def save_checkpoint() -> None:
        path = output_dir / CHECKPOINT_DIR / f"step-{state.global_step:07d}"
        accelerator.save_state(str(path))
        if main_process:
            (path / "train_state.json").write_text(json.dumps(state.state_dict(), indent=2) + "\n")
            if args.keep_checkpoints:
                for old in _checkpoints(output_dir)[: -args.keep_checkpoints]:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def save_adapter() -> None:
        if main_process:
            accelerator.unwrap_model(model).save_pretrained(str(output_dir / ADAPTER_DIR))
        accelerator.wait_for_everyone()

    if main_process:
        accelerator.print(
            f"alore-train: {len(data.train)} training images, {len(data.labels)} classes, model {model_source}, "
            f"{trainable_parameters:,} trainable of {all_parameters:,} parameters, {accelerator.num_processes} "
            f"process(es) on {accelerator.device}, {total_steps} optimizer steps."
        )
    progress = tqdm(
        total=total_steps,
        initial=state.global_step,
        desc="alore-train",
        disable=not (main_process and args.progress),
        dynamic_ncols=True,
    )
    seen_indices: dict[int, list[int]] = {}
    trainable_list = list(_trainable(unwrapped).values())

    while state.epoch < epochs and state.global_step < total_steps:
        epoch = state.epoch
        sampler.start_epoch(epoch)
        train_set.start_epoch(epoch)
        loader = train_loader
        if state.batches_done:
            loader = accelerator.skip_first_batches(train_loader, state.batches_done)
        else:
            state.epoch_loss_sum, state.epoch_loss_count = 0.0, 0
        model.train()
        for batch in loader:
            seen_indices.setdefault(epoch, []).extend(batch["index"].tolist())
            with accelerator.accumulate(model):
                outputs = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable_list, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            state.batches_done += 1
            loss = outputs.loss.detach().float().item()
            state.epoch_loss_sum += loss
            state.epoch_loss_count += 1
            state.window_loss_sum += loss
            state.window_loss_count += 1
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            state.global_step += 1
            progress.update(1)
            if state.global_step % args.logging_steps == 0 or state.global_step == total_steps:
                mean_loss = _reduce_mean(
                    accelerator, state.window_loss_sum, state.window_loss_count, accelerator.device
                )
                state.window_loss_sum, state.window_loss_count = 0.0, 0
                lr = scheduler.get_last_lr()[0]
                progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", epoch=epoch)
                metrics.append(
                    {"kind": "train", "step": state.global_step, "epoch": epoch, "loss": mean_loss, "lr": lr}
                )
            end_of_epoch = accelerator.gradient_state.end_of_dataloader or state.global_step >= total_steps
            # At the end of an epoch the checkpoint is written after the evaluation, below.
            if args.checkpoint_steps and state.global_step % args.checkpoint_steps == 0 and not end_of_epoch:
                save_checkpoint()
            if args.stop_after_steps and state.global_step >= args.stop_after_steps:
                progress.close()
                raise SimulatedInterruption(
                    f"--stop-after-steps {args.stop_after_steps}: stopped at step {state.global_step}; resume with "
                    f"--resume-from-checkpoint latest --output-dir {args.output_dir}."
                )
            if state.global_step >= total_steps:
                break

        epoch_loss = _reduce_mean(accelerator, state.epoch_loss_sum, state.epoch_loss_count, accelerator.device)
        record = {"kind": "epoch", "step": state.global_step, "epoch": epoch, "train_loss": epoch_loss}
        if eval_loader is None:
            metrics.append(record)
        else:
            result = _evaluate(accelerator, model, eval_loader)
            record.update(kind="eval", loss=result["loss"], accuracy=result["accuracy"], count=result["count"])
            metrics.append(record)
            if main_process:
                progress.write(
                    f"epoch {epoch}: train loss {epoch_loss:.4f}, eval loss {result['loss']:.4f}, "
                    f"eval accuracy {result['accuracy']:.4f} ({result['count']} images)"
                )
            if args.selection == "best" and (state.best_accuracy is None or result["accuracy"] > state.best_accuracy):
                state.best_accuracy = result["accuracy"]
                state.best_epoch, state.best_step = epoch, state.global_step
                save_adapter()
        state.epoch += 1
        state.batches_done = 0
        save_checkpoint()
    progress.close()

    # -- the selected adapter ----------------------------------------------------------
    accelerator.wait_for_everyone()
    if args.selection == "last" or state.best_epoch is None:
        save_adapter()
        state.best_epoch, state.best_step = state.epoch - 1, state.global_step
    else:
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        saved = load_file(str(output_dir / ADAPTER_DIR / "adapter_model.safetensors"))
        set_peft_model_state_dict(unwrapped, saved)
    digest = adapter_digest(unwrapped)
    rules_digest = adapter_digest(unwrapped, only=rules_key)

    results: dict[str, Any] = {
        "model": model_source,
        "dataset": data.source,
        "num_labels": len(data.labels),
        "train_images": len(data.train),
        "trainable_parameters": trainable_parameters,
        "all_parameters": all_parameters,
        "optimizer_steps": state.global_step,
        "selected_epoch": state.best_epoch,
        "selected_step": state.best_step,
        "selection": args.selection,
        "best_eval_accuracy": state.best_accuracy,
        "num_processes": accelerator.num_processes,
        "adapter_sha256": digest,
        "adapter_dir": str(output_dir / ADAPTER_DIR),
    }
    # The final evaluation and the merge check run in float32, without the mixed-precision
    # autocast: the merged model is saved in float32, and 16-bit rounding differs between the
    # merged and the unmerged computation.
    unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    if final_loader is not None:
        final_split = args.test_split or args.eval_split
        unmerged = _evaluate(accelerator, unwrapped, final_loader, autocast=False)
        results.update(
            final_split=final_split,
            final_images=unmerged["count"],
            accuracy=unmerged["accuracy"],
            loss=unmerged["loss"],
        )
        metrics.append(
            {"kind": "test", "step": state.global_step, "split": final_split, "loss": unmerged["loss"],
             "accuracy": unmerged["accuracy"], "count": unmerged["count"]}
        )
    if args.push_to_hub and main_process:
        url = unwrapped.push_to_hub(args.hub_model_id, private=args.hub_private)
        results["hub_url"] = str(url)

    if args.merge:
        merged = unwrapped.merge_and_unload()
        check = _evaluate(accelerator, merged, final_loader, autocast=False)
        max_diff = (check["logits"] - unmerged["logits"]).abs().max().item()
        scale = max(1.0, unmerged["logits"].abs().max().item())
        tolerance = MERGE_TOLERANCE * scale
        results.update(merged_accuracy=check["accuracy"], merged_max_logit_diff=max_diff, merge_tolerance=tolerance)
        if check["accuracy"] != unmerged["accuracy"] or not max_diff <= tolerance:
            raise RuntimeError(
                f"The merged model disagrees with the adapter model on the {results['final_split']} split: accuracy "
                f"{check['accuracy']:.6f} vs {unmerged['accuracy']:.6f}, max |logit difference| {max_diff:.3e} "
                f"(tolerance {tolerance:.3e}). The adapter is saved in {output_dir / ADAPTER_DIR}; the merged model "
                "was not saved."
            )
        if main_process:
            merged.save_pretrained(str(output_dir / MERGED_DIR))
            processor.save_pretrained(str(output_dir / MERGED_DIR))
            results["merged_dir"] = str(output_dir / MERGED_DIR)

    if args.rank_report:
        import torch.distributed as dist

        report = {
            "rank": accelerator.process_index,
            "world_size": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
            "adapter_sha256": digest,
            "rules_sha256": rules_digest,
            "rules_init_sha256": state.init_rules_digest,
            "optimizer_steps": state.global_step,
            "indices_by_epoch": {str(k): v for k, v in seen_indices.items()},
        }
        ranks = output_dir / "ranks"
        ranks.mkdir(parents=True, exist_ok=True)
        (ranks / f"rank{accelerator.process_index}.json").write_text(json.dumps(report) + "\n")

    results["seconds"] = round(time.time() - started, 1)
    if main_process:
        plot_path = output_dir / "training_curves.png"
        if args.plot:
            plot_curves(metrics.read(), plot_path, title=f"ALoRE on {Path(data.source).name}")
            results["plot"] = str(plot_path)
        results["metrics"] = str(metrics.path)
        (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        summary = f"accuracy {results['accuracy']:.4f} on {results['final_images']} {results['final_split']} images" \
            if "accuracy" in results else "no evaluation split"
        accelerator.print(f"alore-train done: {summary}; adapter in {output_dir / ADAPTER_DIR}.")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point ``alore-train``.

    Returns:
        The exit status: 0 on success, 2 for unusable arguments, 3 for a
        simulated interruption.
    """
    try:
        args = parse_args(argv)
        train(args)
    except SimulatedInterruption as error:
        print(f"alore-train: {error}", file=sys.stderr)
        return 3
    except ValueError as error:
        print(f"alore-train: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
