"""The ``alore-train`` loop: Accelerate, AdamW, cosine warm-up, checkpoints, resume, merge.

:func:`train` runs a whole job on one process or many (launch it with
``accelerate launch``); :func:`main` is the console script. A job is five
steps, one function each: :func:`_setup` (data, model, optimizer, schedule,
resume), :func:`_train_epoch` (one epoch, its evaluation and checkpoint),
:func:`_select_adapter` (the best or last adapter back in the model),
:func:`_check_merge` (the merged model must predict like the adapter) and
:func:`_write_outputs` (results, curves, model card, Hub).

Output layout (``args.output_dir``)::

    train_args.json           the resolved TrainArgs
    metrics.jsonl             one JSON record per log step / evaluation
    training_curves.png       loss and accuracy curves
    checkpoints/step-NNNNNNN  resumable states (accelerator.save_state), each renamed into place when complete
    eval_images/              a few evaluation images, for ``alore inspect``
    adapter/                  the selected adapter: adapter_config.json, adapter_model.safetensors, README.md
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..adapter_files import TRAINING_IMAGES
from .args import TrainArgs, parse_args
from .data import ImageClassificationDataset, ImageTransform, collate, load_data
from .metrics import MetricsLog, plot_curves
from .modeling import attach_alore, base_model_name, build_model

__all__ = ["SimulatedInterruption", "TrainState", "EpochShuffleSampler", "train", "main", "adapter_digest"]

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
CHECKPOINT_DIR = "checkpoints"
TRAINABLE_FILE = "trainable_parameters.safetensors"
STATE_FILE = "train_state.json"  # written last: a checkpoint folder holding it is complete
KEPT_IMAGES = 8  # evaluation images kept in eval_images/ for `alore inspect`


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


# -- checkpoints: written to a temporary name, renamed into place when complete ----------------------
def _is_complete(folder: Path) -> bool:
    return (folder / STATE_FILE).is_file() and (folder / TRAINABLE_FILE).is_file()


def _checkpoints(output_dir: Path) -> list[Path]:
    """The ``step-N`` folders, oldest first (complete or not: folders from before atomic saving may be torn)."""
    found = [p for p in (output_dir / CHECKPOINT_DIR).glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def _partial_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints whose writing was interrupted (still under their temporary name)."""
    return sorted((output_dir / CHECKPOINT_DIR).glob(".step-*.partial"))


def _resolve_checkpoint(args: TrainArgs) -> tuple[Path, list[Path]]:
    """The checkpoint to resume from, and the incomplete ones passed over to find it."""
    output_dir = Path(args.output_dir)
    if args.resume_from_checkpoint == "latest":
        found = _checkpoints(output_dir)
        complete = [p for p in found if _is_complete(p)]
        if not complete:
            raise ValueError(
                f"--resume-from-checkpoint latest found no complete checkpoint under {args.output_dir}/"
                f"{CHECKPOINT_DIR}; start without it, or pass a checkpoint folder."
            )
        newest = complete[-1]
        step = int(newest.name[5:])
        skipped = [p for p in found if not _is_complete(p) and int(p.name[5:]) > step]
        skipped += [p for p in _partial_checkpoints(output_dir) if int(p.name[6:].split(".")[0]) > step]
        return newest, skipped
    path = Path(args.resume_from_checkpoint).expanduser()
    if not _is_complete(path):
        raise ValueError(
            f"--resume-from-checkpoint {args.resume_from_checkpoint!r} is not a complete checkpoint folder (it needs "
            f"{STATE_FILE} and {TRAINABLE_FILE}); pass one of {args.output_dir}/{CHECKPOINT_DIR}/step-* or 'latest'."
        )
    return path, []


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


@dataclass
class _Run:
    """Everything a job's steps share: set up by :func:`_setup`, advanced by the others."""

    args: TrainArgs
    accelerator: Any
    output_dir: Path
    data: Any
    processor: Any
    model_source: str
    model: nn.Module  # as prepared by Accelerate (possibly DDP-wrapped)
    optimizer: Any
    scheduler: Any
    state: TrainState
    sampler: EpochShuffleSampler
    train_set: ImageClassificationDataset
    train_loader: Any
    eval_loader: Any
    final_loader: Any
    total_steps: int
    epochs: int
    metrics: MetricsLog
    trainable_parameters: int
    all_parameters: int
    progress: Any = None
    seen_indices: dict = field(default_factory=dict)

    @property
    def main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)


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
    started = time.time()
    run = _setup(args)
    while run.state.epoch < run.epochs and run.state.global_step < run.total_steps:
        _train_epoch(run)
    run.progress.close()
    results = _select_adapter(run)
    _evaluate_final(run, results)
    merged = _check_merge(run, results) if args.merge else None
    _write_outputs(run, results, merged, started)
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return results


# -- 1. setup ---------------------------------------------------------------------------------------
def _setup(args: TrainArgs) -> _Run:
    """Data, model, optimizer and schedule; a resumed job's state; nothing written before all of it loads."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    output_dir = Path(args.output_dir)
    resume = _resolve_checkpoint(args) if args.resume_from_checkpoint else None  # fail before any work
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
    # Preparing the offline default writes to the cache: the main process goes first.
    with accelerator.main_process_first():
        data = load_data(args)
        set_seed(args.seed)  # the new head starts the same on every process
        model, processor, model_source = build_model(args, data.labels)
    if accelerator.is_main_process:  # only once the data and the model are known to load
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_args.json").write_text(json.dumps(args.to_dict(), indent=2) + "\n")
        _keep_eval_images(data, args, output_dir / TRAINING_IMAGES)
    set_seed(args.seed)
    model = attach_alore(model, args, num_labels=len(data.labels))
    model.peft_config["default"].base_model_name_or_path = base_model_name(args)  # portable, see modeling
    trainable_parameters = sum(p.numel() for p in _trainable(model).values())
    all_parameters = sum(p.numel() for p in model.parameters())

    train_set, sampler, train_loader, eval_loader, test_loader = _loaders(args, data, processor)
    optimizer = torch.optim.AdamW(list(_trainable(model).values()), lr=args.learning_rate, weight_decay=args.weight_decay)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    eval_loader, test_loader = (None if x is None else accelerator.prepare(x) for x in (eval_loader, test_loader))

    # Steps are counted per process after sharding: each process sees len(train_loader) batches per epoch.
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    warmup_steps = min(total_steps, round(args.warmup_epochs * steps_per_epoch))
    # Stepped once per optimizer step on every process; not passed to prepare(), which would
    # step it num_processes times per call.
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_for_checkpointing(state)
    _register_trainable_only_checkpoints(accelerator, model)
    state.init_rules_digest = adapter_digest(accelerator.unwrap_model(model), only="alore_rules")
    run = _Run(
        args, accelerator, output_dir, data, processor, model_source, model, optimizer, scheduler, state, sampler,
        train_set, train_loader, eval_loader, test_loader if test_loader is not None else eval_loader, total_steps,
        math.ceil(total_steps / steps_per_epoch), MetricsLog(output_dir / "metrics.jsonl", accelerator.is_main_process),
        trainable_parameters, all_parameters,
    )  # fmt: skip
    _start_or_resume(run, resume)
    return run


def _loaders(args: TrainArgs, data, processor) -> tuple:
    """``(train set, its sampler, train loader, eval loader or None, test loader or None)``."""
    train_set = ImageClassificationDataset(
        data.train, ImageTransform(processor, args.image_size, args.augmentation), args.image_column,
        args.label_column, data.label_to_id, args.seed,
    )  # fmt: skip
    sampler = EpochShuffleSampler(len(train_set), args.seed)
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=args.batch_size, sampler=sampler, collate_fn=collate, num_workers=args.num_workers
    )
    eval_transform = ImageTransform(processor, args.image_size, "none")
    eval_loader, test_loader = (
        None if split is None else torch.utils.data.DataLoader(
            ImageClassificationDataset(split, eval_transform, args.image_column, args.label_column, data.label_to_id),
            batch_size=args.eval_batch_size, shuffle=False, collate_fn=collate, num_workers=args.num_workers,
        )
        for split in (data.eval, data.test)
    )  # fmt: skip
    return train_set, sampler, train_loader, eval_loader, test_loader


def _keep_eval_images(data, args: TrainArgs, folder: Path, count: int = KEPT_IMAGES) -> None:
    """Save the first ``count`` evaluation (else test) images as PNG files, for ``alore inspect``."""
    split = data.eval if data.eval is not None else data.test
    if split is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    for i in range(min(count, len(split))):
        row = split[i]
        label = row[args.label_column]
        name = data.labels[label] if isinstance(label, int) and not data.label_to_id else str(label)
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
        temporary = folder / f".{i:02d}.png"
        row[args.image_column].convert("RGB").save(temporary, format="PNG")
        os.replace(temporary, folder / f"{i:02d}_{safe}.png")


def _start_or_resume(run: _Run, resume: Optional[tuple[Path, list[Path]]]) -> None:
    """Load the checkpoint to resume from, or clear an earlier run's log and checkpoints; start the progress bar."""
    from tqdm.auto import tqdm

    accelerator, state = run.accelerator, run.state
    if resume is not None:
        checkpoint, skipped = resume
        accelerator.load_state(str(checkpoint))
        run.metrics.truncate_after(state.global_step)
        note = ""
        if skipped:
            note = f"; skipped incomplete checkpoint(s) {', '.join(p.name for p in skipped)} (interrupted while written)"
        accelerator.print(f"Resumed from {checkpoint} at step {state.global_step} (epoch {state.epoch}){note}.")
        if run.main_process:
            for folder in skipped + _partial_checkpoints(run.output_dir):
                shutil.rmtree(folder, ignore_errors=True)
    elif run.main_process:
        # A fresh run starts over: an earlier run's log and checkpoints would mix with its own.
        (run.output_dir / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(run.output_dir / CHECKPOINT_DIR, ignore_errors=True)
    accelerator.wait_for_everyone()
    if run.main_process:
        accelerator.print(
            f"alore-train: {len(run.data.train)} training images, {len(run.data.labels)} classes, model "
            f"{run.model_source}, {run.trainable_parameters:,} trainable of {run.all_parameters:,} parameters, "
            f"{accelerator.num_processes} process(es) on {accelerator.device}, {run.total_steps} optimizer steps."
        )
    run.progress = tqdm(
        total=run.total_steps, initial=state.global_step, desc="alore-train", dynamic_ncols=True,
        disable=not (run.main_process and run.args.progress),
    )  # fmt: skip


def _save_checkpoint(run: _Run) -> None:
    """Write ``checkpoints/step-N`` under a temporary name and rename it when complete; keep the newest few."""
    accelerator, args = run.accelerator, run.args
    final = run.output_dir / CHECKPOINT_DIR / f"step-{run.state.global_step:07d}"
    partial = final.with_name(f".{final.name}.partial")
    if run.main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if run.main_process:
        (partial / STATE_FILE).write_text(json.dumps(run.state.state_dict(), indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)  # a torn folder of that name (from an older release)
        os.replace(partial, final)
        if args.keep_checkpoints:
            for old in _checkpoints(run.output_dir)[: -args.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _save_adapter(run: _Run) -> None:
    if run.main_process:
        # An image classifier has no vocabulary to save. Left at "auto", PEFT looks the base's config up by
        # base_model_name_or_path, which for the offline backbone is a portable name, not a folder or Hub id,
        # and warns that it could not find it.
        run.unwrapped.save_pretrained(str(run.output_dir / ADAPTER_DIR), save_embedding_layers=False)
    run.accelerator.wait_for_everyone()


# -- 2. one epoch -------------------------------------------------------------------------------------
def _train_epoch(run: _Run) -> None:
    """Train the rest of the epoch in progress, evaluate, keep the adapter if it is the best so far, checkpoint."""
    accelerator, args, state, model = run.accelerator, run.args, run.state, run.model
    epoch = state.epoch
    run.sampler.start_epoch(epoch)
    run.train_set.start_epoch(epoch)
    loader = run.train_loader
    if state.batches_done:
        loader = accelerator.skip_first_batches(run.train_loader, state.batches_done)
    else:
        state.epoch_loss_sum, state.epoch_loss_count = 0.0, 0
    trainable = list(_trainable(run.unwrapped).values())
    model.train()
    for batch in loader:
        run.seen_indices.setdefault(epoch, []).extend(batch["index"].tolist())
        with accelerator.accumulate(model):
            outputs = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
            accelerator.backward(outputs.loss)
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad()
        state.batches_done += 1
        loss = outputs.loss.detach().float().item()
        state.epoch_loss_sum, state.epoch_loss_count = state.epoch_loss_sum + loss, state.epoch_loss_count + 1
        state.window_loss_sum, state.window_loss_count = state.window_loss_sum + loss, state.window_loss_count + 1
        if not accelerator.sync_gradients:
            continue
        _optimizer_step_done(run, epoch)
        end_of_epoch = accelerator.gradient_state.end_of_dataloader or state.global_step >= run.total_steps
        # At the end of an epoch the checkpoint is written after the evaluation, below.
        if args.checkpoint_steps and state.global_step % args.checkpoint_steps == 0 and not end_of_epoch:
            _save_checkpoint(run)
        if args.stop_after_steps and state.global_step >= args.stop_after_steps:
            run.progress.close()
            raise SimulatedInterruption(
                f"--stop-after-steps {args.stop_after_steps}: stopped at step {state.global_step}; resume with "
                f"--resume-from-checkpoint latest --output-dir {args.output_dir}."
            )
        if state.global_step >= run.total_steps:
            break
    _evaluate_epoch(run, epoch)
    state.epoch += 1
    state.batches_done = 0
    _save_checkpoint(run)


def _optimizer_step_done(run: _Run, epoch: int) -> None:
    """Advance the schedule and the counters; log the mean loss every ``logging_steps``."""
    state = run.state
    run.scheduler.step()
    state.global_step += 1
    run.progress.update(1)
    if state.global_step % run.args.logging_steps == 0 or state.global_step == run.total_steps:
        mean_loss = _reduce_mean(run.accelerator, state.window_loss_sum, state.window_loss_count, run.accelerator.device)
        state.window_loss_sum, state.window_loss_count = 0.0, 0
        lr = run.scheduler.get_last_lr()[0]
        run.progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", epoch=epoch)
        run.metrics.append({"kind": "train", "step": state.global_step, "epoch": epoch, "loss": mean_loss, "lr": lr})


def _evaluate_epoch(run: _Run, epoch: int) -> None:
    """Log the epoch's loss and eval accuracy; with ``selection="best"``, save the adapter when it improves."""
    state = run.state
    epoch_loss = _reduce_mean(run.accelerator, state.epoch_loss_sum, state.epoch_loss_count, run.accelerator.device)
    record = {"kind": "epoch", "step": state.global_step, "epoch": epoch, "train_loss": epoch_loss}
    if run.eval_loader is None:
        run.metrics.append(record)
        return
    result = _evaluate(run.accelerator, run.model, run.eval_loader)
    record.update(kind="eval", loss=result["loss"], accuracy=result["accuracy"], count=result["count"])
    run.metrics.append(record)
    if run.main_process:
        run.progress.write(
            f"epoch {epoch}: train loss {epoch_loss:.4f}, eval loss {result['loss']:.4f}, "
            f"eval accuracy {result['accuracy']:.4f} ({result['count']} images)"
        )
    if run.args.selection == "best" and (state.best_accuracy is None or result["accuracy"] > state.best_accuracy):
        state.best_accuracy = result["accuracy"]
        state.best_epoch, state.best_step = epoch, state.global_step
        _save_adapter(run)


# -- 3. the selected adapter --------------------------------------------------------------------------
def _select_adapter(run: _Run) -> dict[str, Any]:
    """Put the selected adapter's weights in the model (saving the last one if it is selected); start the results."""
    state = run.state
    run.accelerator.wait_for_everyone()
    if run.args.selection == "last" or state.best_epoch is None:
        _save_adapter(run)
        state.best_epoch, state.best_step = state.epoch - 1, state.global_step
    else:
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        saved = load_file(str(run.output_dir / ADAPTER_DIR / "adapter_model.safetensors"))
        set_peft_model_state_dict(run.unwrapped, saved)
    return {
        "model": run.model_source,
        "base_model_name_or_path": run.unwrapped.peft_config["default"].base_model_name_or_path,
        "dataset": run.data.source,
        "num_labels": len(run.data.labels),
        "train_images": len(run.data.train),
        "trainable_parameters": run.trainable_parameters,
        "all_parameters": run.all_parameters,
        "optimizer_steps": state.global_step,
        "selected_epoch": state.best_epoch,
        "selected_step": state.best_step,
        "selection": run.args.selection,
        "best_eval_accuracy": state.best_accuracy,
        "num_processes": run.accelerator.num_processes,
        "adapter_sha256": adapter_digest(run.unwrapped),
        "adapter_dir": str(run.output_dir / ADAPTER_DIR),
    }


def _evaluate_final(run: _Run, results: dict[str, Any]) -> None:
    """The selected adapter on the test split (else the eval split), in float32."""
    if run.final_loader is None:
        return
    # The final evaluation and the merge check run in float32, without the mixed-precision
    # autocast: the merged model is saved in float32, and 16-bit rounding differs between the
    # merged and the unmerged computation.
    model = run.accelerator.unwrap_model(run.model, keep_fp32_wrapper=False)
    final = _evaluate(run.accelerator, model, run.final_loader, autocast=False)
    split = run.args.test_split or run.args.eval_split
    results.update(final_split=split, final_images=final["count"], accuracy=final["accuracy"], loss=final["loss"])
    results["_logits"] = final["logits"]
    run.metrics.append(
        {"kind": "test", "step": run.state.global_step, "split": split, "loss": final["loss"],
         "accuracy": final["accuracy"], "count": final["count"]}
    )  # fmt: skip


# -- 4. the merge check ----------------------------------------------------------------------------------
def _check_merge(run: _Run, results: dict[str, Any]) -> nn.Module:
    """Fold the adapter into the backbone; it must give the same accuracy and logits (to a tolerance)."""
    merged = run.accelerator.unwrap_model(run.model, keep_fp32_wrapper=False).merge_and_unload()
    check = _evaluate(run.accelerator, merged, run.final_loader, autocast=False)
    expected = results["_logits"]
    max_diff = (check["logits"] - expected).abs().max().item()
    tolerance = MERGE_TOLERANCE * max(1.0, expected.abs().max().item())
    results.update(merged_accuracy=check["accuracy"], merged_max_logit_diff=max_diff, merge_tolerance=tolerance)
    if check["accuracy"] != results["accuracy"] or not max_diff <= tolerance:
        raise RuntimeError(
            f"The merged model disagrees with the adapter model on the {results['final_split']} split: accuracy "
            f"{check['accuracy']:.6f} vs {results['accuracy']:.6f}, max |logit difference| {max_diff:.3e} "
            f"(tolerance {tolerance:.3e}). The adapter is saved in {run.output_dir / ADAPTER_DIR}; the merged model "
            "was not saved."
        )
    return merged


# -- 5. outputs ----------------------------------------------------------------------------------------
def _write_outputs(run: _Run, results: dict[str, Any], merged: Optional[nn.Module], started: float) -> None:
    """The merged model, the rank reports, the curves, the model card, the Hub upload and results.json."""
    from .._noise import progress_bars_hidden

    results.pop("_logits", None)
    args, output_dir = run.args, run.output_dir
    if merged is not None and run.main_process:
        with progress_bars_hidden():
            merged.save_pretrained(str(output_dir / MERGED_DIR))
        run.processor.save_pretrained(str(output_dir / MERGED_DIR))
        results["merged_dir"] = str(output_dir / MERGED_DIR)
    if args.rank_report:
        _write_rank_report(run, results["adapter_sha256"])
    results["seconds"] = round(time.time() - started, 1)
    if not run.main_process:
        return
    if args.plot:
        plot_path = output_dir / "training_curves.png"
        plot_curves(run.metrics.read(), plot_path, title=f"ALoRE on {Path(run.data.source).name}")
        results["plot"] = str(plot_path)
    results["metrics"] = str(run.metrics.path)
    _write_model_card(run, results)
    if args.push_to_hub:
        results["hub_url"] = _push_to_hub(output_dir / ADAPTER_DIR, args)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    run.accelerator.print(_summary_line(results, output_dir))


def _summary_line(results: dict[str, Any], output_dir: Path) -> str:
    if "accuracy" in results:
        correct = round(results["accuracy"] * results["final_images"])
        head = (
            f"{results['final_split']} accuracy {results['accuracy']:.4f} ({correct:,} of {results['final_images']:,} "
            "images)"
        )
    else:
        head = "no evaluation split"
    parts = [f"adapter {results['adapter_dir']}"]
    if "merged_dir" in results:
        parts.append(f"merged model {results['merged_dir']}")
    if "plot" in results:
        parts.append(f"curves {results['plot']}")
    parts.append(f"results {output_dir / 'results.json'}")
    return f"alore-train done: {head}; {', '.join(parts)}."


def _write_rank_report(run: _Run, digest: str) -> None:
    import torch.distributed as dist

    accelerator = run.accelerator
    report = {
        "rank": accelerator.process_index,
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
        "adapter_sha256": digest,
        "rules_sha256": adapter_digest(run.unwrapped, only="alore_rules"),
        "rules_init_sha256": run.state.init_rules_digest,
        "optimizer_steps": run.state.global_step,
        "indices_by_epoch": {str(k): v for k, v in run.seen_indices.items()},
    }
    ranks = run.output_dir / "ranks"
    ranks.mkdir(parents=True, exist_ok=True)
    (ranks / f"rank{accelerator.process_index}.json").write_text(json.dumps(report) + "\n")


def _write_model_card(run: _Run, results: dict[str, Any]) -> None:
    """The adapter folder's README.md, with the data, metrics and curve of this run (see :mod:`alore_peft.hub`)."""
    from ..hub import write_model_card
    from .card import training_section

    adapter_dir = run.output_dir / ADAPTER_DIR
    if "plot" in results:
        shutil.copy(results["plot"], adapter_dir / "training_curves.png")
    section = training_section(run.args, run.data, results, run.metrics.read(), curve="plot" in results)
    write_model_card(adapter_dir, run.unwrapped, training=section, repo_id=run.args.hub_model_id)


def _push_to_hub(folder: Path, args: TrainArgs) -> str:
    """Upload the adapter folder as written (weights, config, model card, curve) to ``args.hub_model_id``."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(args.hub_model_id, private=args.hub_private, exist_ok=True)
    info = api.upload_folder(repo_id=args.hub_model_id, folder_path=str(folder), commit_message="alore-train")
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{args.hub_model_id}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point ``alore-train``.

    Returns:
        The exit status: 0 on success, 2 for unusable arguments, 3 for a
        simulated interruption.
    """
    from .._noise import expected_warnings_hidden

    try:
        args = parse_args(argv)
        with expected_warnings_hidden():
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
