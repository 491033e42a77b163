"""The evidence study: ALoRE vs LoRA vs LoKr vs linear probe vs full fine-tuning, one command.

VTAB-1k-style regime on real data and real pretrained weights (the bundle written by
``examples/evidence/bundle.py``): 800 training images, 200 validation images used only
to choose the learning rate and scale, a fixed class-balanced test subset evaluated
once per (method, seed) with the validation-selected setting, several seeds.

Backbones and methods (``trainable`` excludes the new 10-way classifier head, which
every method trains and which is reported separately):

* DINOv2 ViT-S/14 at 112 px: ``linear`` (head only), ``full`` (everything),
  ``lora`` (PEFT LoRA r=8 on q, v: 147,456), ``lokr`` (PEFT LoKr on q, v,
  decompose_factor=2, r=16: 147,552), ``alore_seq`` (ALoRE r=8, n=4, one sequential
  adapter on each block's attention input and one on its MLP input, the paper's
  placement: 147,520), ``alore_par`` (ALoRE r=8, n=4, parallel on q, v: 147,520).
* MobileNetV2 (ImageNet) at 112 px, adapters on its 34 pointwise (1x1) convolutions:
  ``linear``, ``lora`` (r=8), ``alore_par`` (r=8: LoRA's budget + 64),
  ``alore_seq`` (r=8, on the convolutions' inputs: 93 % of LoRA's budget). Its
  BatchNorm layers stay in eval mode (transformers builds them with momentum 0.997).

Protocol: AdamW (weight decay 1e-4), batch 64, linear warm-up over the first 10 % of
the steps then cosine decay to 0, no augmentation, images resized on the device
(bilinear, 28 -> 112 px, grey -> 3 channels, the saved image processor's mean/std),
bfloat16 autocast on CUDA, float32 on CPU. Grids: linear probe lr {1e-3, 3e-3, 1e-2};
full fine-tuning backbone lr {1e-5, 3e-5, 1e-4} (its new head at 1e-3); every adapter
lr {1e-3, 3e-3} x scale (alpha / r) {1, 4}. The grid (seed 0) picks the setting with
the best validation accuracy; the other seeds rerun that setting. The number of epochs
is fixed up front (``--epochs``) or, with ``--epochs auto``, chosen once from a timing
probe (a few optimiser steps per method, no accuracy is looked at) as the largest of
30/25/20/15/10/5 whose projected time, added to the time already spent, fits ``--budget-s``.

Usage::

    PYTHONPATH=src python examples/evidence/study.py --bundle .evidence_bundle --device cuda --out out/study
    python examples/evidence/study.py --bundle BUNDLE --device cpu --out OUT --quick   # seconds; CI smoke
    # a reduced CPU run: 56 px, 6 epochs, one seed, each method's first setting
    python examples/evidence/study.py --bundle .evidence_bundle --device cpu --out OUT --image-size 56 \
        --epochs 6 --grid first --seeds 0 --methods dinov2:linear,alore_seq,lora --threads 1
    # three seeds on a CPU at fixed settings (e.g. those a GPU grid selected on validation)
    python examples/evidence/study.py --bundle .evidence_bundle --device cpu --out OUT --image-size 56 \
        --epochs 6 --setting lr=3e-3,scale=4 --full-lr 3e-5 --methods dinov2 --threads 2

``--ablation`` runs ALoRE variants on DINOv2 instead (experts vs rank at a fixed
budget, rule initialisation, per-layer rules, placement; see ``ABLATIONS``).

``--sweep`` measures robustness to tuning past the adapter grid instead of selecting:
every adapter method trains each lr x scale cell of ``SWEEP_LRS`` x ``SWEEP_SCALES``
(3x the grid's largest lr, 4x its largest scale) and every cell is tested; the first
seed runs all nine cells, the later seeds rerun the cells past the grid and the grid's
top corner (``sweep_cells``); each run records whether it diverged (``divergence``).
Writes ``OUT/sweep.json``; ``--resume`` continues one that was cut short::

    python examples/evidence/study.py --bundle .evidence_bundle --device cpu --out OUT --sweep \
        --methods dinov2:lora,alore_par,alore_seq --seeds 0 1 2 --image-size 56 --epochs 6 --threads 1

Writes ``OUT/results.json`` after every run (so a cut-off run still leaves its finished
part) and prints one progress line per run.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundle_format import load_split_arrays, materialize, read_manifest  # noqa: E402

__all__ = ["main", "run_study", "METHODS", "analytic_trainable"]

SCHEMA = "alore-peft-evidence/1"
NUM_CLASSES = 10
HEAD_NAME = "classifier"
EPOCH_MENU = (30, 25, 20, 15, 10, 5)

ADAPTER_GRID = [{"lr": lr, "scale": s} for lr in (1e-3, 3e-3) for s in (1.0, 4.0)]
# --sweep: the adapter grid extended to 3x its largest lr and 4x its largest scale.
SWEEP_LRS = (1e-3, 3e-3, 1e-2)
SWEEP_SCALES = (1.0, 4.0, 16.0)
GRIDS = {
    "linear": [{"lr": 1e-3}, {"lr": 3e-3}, {"lr": 1e-2}],
    "full": [{"lr": 1e-5}, {"lr": 3e-5}, {"lr": 1e-4}],
}
FULL_HEAD_LR = 1e-3  # full fine-tuning: the random head gets this lr; the grid is over the backbone's

# (backbone, method) -> what it is, for the JSON and the report.
METHODS: dict[str, dict[str, dict]] = {
    "dinov2": {
        "linear": {"label": "linear probe", "placement": "new head on frozen features"},
        "full": {"label": "full fine-tune", "placement": "every weight"},
        "lora": {"label": "LoRA r=8", "placement": "q, v (parallel)"},
        "lokr": {"label": "LoKr r=16, factor 2", "placement": "q, v (parallel)"},
        "alore_seq": {"label": "ALoRE r=8, n=4, sequential", "placement": "block input of attention and MLP"},
        "alore_par": {"label": "ALoRE r=8, n=4, parallel", "placement": "q, v (parallel)"},
    },
    "mobilenet_v2": {
        "linear": {"label": "linear probe", "placement": "new head on frozen features"},
        "lora": {"label": "LoRA r=8", "placement": "34 pointwise convs (parallel)"},
        "alore_par": {"label": "ALoRE r=8, n=4, parallel", "placement": "34 pointwise convs (parallel)"},
        "alore_seq": {"label": "ALoRE r=8, n=4, sequential", "placement": "34 pointwise convs (input)"},
    },
}
# Ablations (DINOv2, --ablation): ALoRE variants next to the study's ALoRE and LoRA.
ABLATIONS: dict[str, dict] = {
    "alore_seq": {"label": "ALoRE n=4 r=8 block input (reference)", "placement": "blocks"},
    "alore_seq_n1": {"label": "n=1 (one rank-8 expert, no Kronecker)", "placement": "blocks", "n": 1},
    "alore_seq_n2": {"label": "n=2 experts, r=8", "placement": "blocks", "n": 2},
    "alore_seq_n8": {"label": "n=8 experts, r=8", "placement": "blocks", "n": 8},
    "alore_seq_r4n8": {"label": "n=8 experts, r=4 (half the expert budget)", "placement": "blocks", "n": 8, "r": 4},
    "alore_seq_normal": {"label": "normal rule init", "placement": "blocks", "rule_init": "normal"},
    "alore_seq_unshared": {"label": "per-layer rules", "placement": "blocks", "share_rules": False},
    "alore_seq_qfc1": {"label": "sequential on q and fc1 Linear inputs", "placement": "q_fc1"},
    # alore_par's targets in the sequential mode: separates the mode from the targets.
    "alore_seq_qv": {"label": "sequential on q and v Linear inputs", "placement": "q_v"},
    "lora": {"label": "LoRA r=8 q, v (reference)", "placement": "qv"},
}


PLACEMENTS = {
    "blocks": "block input of attention and MLP",
    "q_fc1": "inputs of q_proj and fc1 (sequential)",
    "q_v": "inputs of q_proj and v_proj (sequential)",
    "qv": "q, v (parallel)",
}


# --------------------------------------------------------------------------- environment


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    """Versions, machine and accelerator, for the JSON."""
    import peft
    import transformers

    import alore_peft

    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "alore_peft": getattr(alore_peft, "__version__", None),
        "numpy": np.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
    }
    try:
        repo = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        env["git_commit"] = out.stdout.strip() or None
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True, timeout=10
        )
        env["git_dirty"] = bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- data


def device_images(images: np.ndarray, size: int, mean, std, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 (N, 28, 28) -> normalised float32 (N, 3, size, size) on ``device`` (bilinear resize)."""
    x = torch.from_numpy(images).to(device).float().div_(255.0).unsqueeze(1)  # (N, 1, 28, 28)
    x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)  # (N, 1, S, S)
    x = x.expand(-1, 3, -1, -1)  # (N, 3, S, S): grey -> RGB, as do_convert_rgb does
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    x = (x - mean_t) / std_t
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# --------------------------------------------------------------------------- models and methods


def load_backbone(folder: Path, device: torch.device):
    """``AutoModelForImageClassification`` in float32 with a 10-way head; only the head may be missing."""
    import transformers
    from transformers import AutoModelForImageClassification

    # The loading report (the new head is "missing") is checked below; keep the log to one line per run.
    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        model, info = AutoModelForImageClassification.from_pretrained(
            folder, num_labels=NUM_CLASSES, dtype=torch.float32, output_loading_info=True
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
    missing = set(info.get("missing_keys") or [])
    bad = {
        "missing": sorted(missing - {f"{HEAD_NAME}.weight", f"{HEAD_NAME}.bias"}),
        "unexpected": sorted(info.get("unexpected_keys") or []),
        "mismatched": [str(m) for m in info.get("mismatched_keys") or []],
    }
    if any(bad.values()):
        raise RuntimeError(
            f"{folder} did not load cleanly into {type(model).__name__} with this transformers version: {bad}. "
            "The pretrained weights would be partly random; rewrite the bundle with a transformers version whose "
            "checkpoint names this one reads."
        )
    return model.to(device).eval()


def module_targets(backbone: str, model: nn.Module) -> dict[str, list[str]]:
    """Full module names per placement; resolves both transformers naming schemes of Dinov2.

    transformers 5.23 names the attention projections ``attention.q_proj`` etc.;
    older 5.x releases (e.g. 5.17) ``attention.attention.query``. Full names make
    PEFT's matching exact whatever the version.
    """
    names = [n for n, _ in model.named_modules()]
    if backbone == "dinov2":
        layer = r"(.*\.)?encoder\.layer\.\d+\."
        pick = lambda pattern: [n for n in names if re.fullmatch(layer + pattern, n)]  # noqa: E731
        targets = {
            "q": pick(r"attention\.(q_proj|attention\.query)"),
            "v": pick(r"attention\.(v_proj|attention\.value)"),
            "blocks": pick(r"(attention|mlp)"),
            "fc1": pick(r"mlp\.fc1"),
        }
        targets["qv"] = sorted(targets["q"] + targets["v"])
        targets["q_fc1"] = sorted(targets["q"] + targets["fc1"])
        targets["q_v"] = targets["qv"]  # the same modules, named apart for the sequential ablation
        layers = model.config.num_hidden_layers
        for key, want in (("q", layers), ("v", layers), ("blocks", 2 * layers), ("fc1", layers)):
            if len(targets[key]) != want:
                raise RuntimeError(f"found {len(targets[key])} Dinov2 '{key}' modules, expected {want}: {targets[key]}")
        return targets
    if backbone == "mobilenet_v2":
        pointwise = [
            n
            for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1
        ]
        return {"pointwise": pointwise}
    raise ValueError(f"backbone={backbone!r} is not one of {sorted(METHODS)}")


def _placement_targets(backbone: str, method: str, targets: dict, placement: str | None = None) -> list[str]:
    if backbone == "mobilenet_v2":
        return targets["pointwise"]
    if placement is not None:
        return targets[placement]
    return targets["blocks"] if method.startswith("alore_seq") else targets["qv"]


def peft_config(backbone: str, method: str, hp: dict, targets: dict, ablation: dict | None = None):
    """The PEFT config of an adapter method; ``scale`` is alpha / r."""
    import peft

    from alore_peft import AloreConfig

    scale = hp.get("scale", 1.0)
    common = {"modules_to_save": [HEAD_NAME]}
    if method == "lora":
        return peft.LoraConfig(
            r=8, lora_alpha=8 * scale, lora_dropout=0.0, target_modules=_placement_targets(backbone, method, targets),
            **common,
        )
    if method == "lokr":
        return peft.LoKrConfig(
            r=16, alpha=16 * scale, decompose_factor=2, target_modules=_placement_targets(backbone, method, targets),
            **common,
        )
    if method.startswith("alore"):
        ab = ablation or {}
        r, n = ab.get("r", 8), ab.get("n", 4)
        placement = ab.get("placement")
        return AloreConfig(
            r=r,
            num_experts=n,
            alpha=r * scale,
            mode="parallel" if method == "alore_par" else "sequential",
            share_rules=ab.get("share_rules", True),
            rule_init=ab.get("rule_init", "orthogonal"),
            target_modules=_placement_targets(backbone, method, targets, placement),
            **common,
        )
    raise ValueError(f"method={method!r} is not an adapter method")


def analytic_trainable(
    backbone: str, method: str, model: nn.Module, targets: dict, ablation: dict | None = None
) -> int:
    """Backbone parameters a method should train, from the layer shapes (head excluded)."""
    modules = dict(model.named_modules())
    if method == "linear":
        return 0
    if method == "full":
        return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(HEAD_NAME))

    def dims(name: str) -> tuple[int, int, int]:
        m = modules[name]
        if isinstance(m, nn.Linear):
            return m.in_features, m.out_features, 1
        if isinstance(m, nn.Conv2d):
            return m.in_channels, m.out_channels, m.kernel_size[0] * m.kernel_size[1]
        first = next(s for s in m.modules() if isinstance(s, (nn.Linear, nn.Conv2d)))  # a container
        return (first.in_features, first.in_features, 1) if isinstance(first, nn.Linear) else (
            first.in_channels, first.in_channels, 1)

    cfg = peft_config(backbone, method, {"lr": 0.0, "scale": 1.0}, targets, ablation)
    names = sorted(cfg.target_modules)
    if method == "lora":
        return sum(cfg.r * (d_in * k + d_out) for d_in, d_out, k in map(dims, names))
    if method == "lokr":
        from peft.tuners.lokr.layer import factorization

        total = 0
        for d_in, d_out, _ in map(dims, names):
            in_m, in_n = factorization(d_in, cfg.decompose_factor)
            out_l, out_k = factorization(d_out, cfg.decompose_factor)
            total += out_l * in_m  # w1, full
            total += cfg.r * (out_k + in_n) if cfg.r < max(out_k, in_n) / 2 else out_k * in_n  # w2
        return total
    from alore_peft import functional

    rules = functional.rule_parameters(cfg.num_experts, len(names), cfg.share_rules)
    shapes = [functional.delta_shape(cfg.mode, d_in, d_out, k) for d_in, d_out, k in map(dims, names)]
    return sum(functional.expert_parameters(d_out, d_in, cfg.r) for d_out, d_in in shapes) + rules


def reset_head(model: nn.Module) -> None:
    """A fresh head: truncated-normal weights (std 0.02, as HF initialises Dinov2's), zero bias."""
    head = getattr(model, HEAD_NAME)
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)


def freeze_batchnorm_stats(model: nn.Module) -> None:
    """BatchNorm in eval mode: transformers' MobileNetV2 momentum of 0.997 would overwrite the ImageNet statistics."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable backbone/adapter parameters, trainable head parameters)."""
    backbone = head = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            if f"{HEAD_NAME}." in name or name.startswith(HEAD_NAME):
                head += p.numel()
            else:
                backbone += p.numel()
    return backbone, head


# --------------------------------------------------------------------------- training


class Task:
    """One backbone's data on the device and the functions that build each method's model."""

    def __init__(self, backbone: str, base: nn.Module, data: dict, device: torch.device, amp: bool):
        self.backbone, self.base, self.data, self.device, self.amp = backbone, base, data, device, amp
        self.targets = module_targets(backbone, base)
        self.features: dict[str, torch.Tensor] | None = None
        self.feature_seconds: float | None = None

    def autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def build(self, method: str, hp: dict, seed: int, ablation: dict | None = None):
        """(model to train, its forward on a batch, optimiser parameter groups)."""
        import peft

        import alore_peft  # noqa: F401  (registers ALoRE with PEFT)

        torch.manual_seed(seed)
        if method == "linear":
            dim = self.features["train"].shape[1]
            head = nn.Linear(dim, NUM_CLASSES).to(self.device)
            reset_head(nn.ModuleDict({HEAD_NAME: head}))
            return head, head, [{"params": list(head.parameters()), "lr": hp["lr"]}]
        model = copy.deepcopy(self.base)
        reset_head(model)
        if method == "full":
            model.requires_grad_(True)
            backbone = [p for n, p in model.named_parameters() if not n.startswith(HEAD_NAME)]
            head = list(getattr(model, HEAD_NAME).parameters())
            groups = [{"params": backbone, "lr": hp["lr"]}, {"params": head, "lr": FULL_HEAD_LR}]
        else:
            model = peft.get_peft_model(model, peft_config(self.backbone, method, hp, self.targets, ablation))
            groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": hp["lr"]}]
        forward = lambda x: model(pixel_values=x).logits  # noqa: E731
        return model, forward, groups

    def train_mode(self, model: nn.Module) -> None:
        model.train()
        if self.backbone == "mobilenet_v2":
            freeze_batchnorm_stats(model)

    def inputs(self, method: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.features[split] if method == "linear" else self.data[split][0]
        return x, self.data[split][1]

    def compute_features(self, eval_batch: int) -> None:
        """The head's input for every image (frozen backbone, eval mode), computed once for the linear probe."""
        captured: list[torch.Tensor] = []
        hook = getattr(self.base, HEAD_NAME).register_forward_pre_hook(lambda m, args: captured.append(args[0]))
        self.features = {}
        _sync(self.device)
        start = time.perf_counter()
        try:
            for split, (x, _) in self.data.items():
                captured.clear()
                with torch.no_grad(), self.autocast():
                    for i in range(0, len(x), eval_batch):
                        self.base(pixel_values=x[i : i + eval_batch])
                self.features[split] = torch.cat([c.float() for c in captured])  # (N, head input)
        finally:
            hook.remove()
        _sync(self.device)
        self.feature_seconds = time.perf_counter() - start


def evaluate(task: Task, forward, model: nn.Module, method: str, split: str, eval_batch: int) -> dict:
    x, y = task.inputs(method, split)
    model.eval()
    correct, loss = 0, 0.0
    with torch.no_grad(), task.autocast():
        for i in range(0, len(x), eval_batch):
            logits = forward(x[i : i + eval_batch]).float()
            target = y[i : i + eval_batch]
            loss += nn.functional.cross_entropy(logits, target, reduction="sum").item()
            correct += (logits.argmax(-1) == target).sum().item()
    return {"acc": correct / len(y), "loss": loss / len(y), "n": len(y)}


def lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def train_run(task: Task, method: str, hp: dict, seed: int, cfg: dict, ablation: dict | None = None) -> dict:
    """Build, train and validate one (method, setting, seed); return the record and the trained model."""
    device = task.device
    wall = time.perf_counter()
    model, forward, groups = task.build(method, hp, seed, ablation)
    if method == "linear":  # the model is the head itself
        trainable, head = 0, sum(p.numel() for p in model.parameters())
    else:
        trainable, head = count_params(model)
    x, y = task.inputs(method, "train")
    n = len(y)
    batch = cfg["batch"]
    steps_per_epoch = math.ceil(n / batch)
    epochs = cfg["epochs"]
    total = epochs * steps_per_epoch
    if cfg.get("max_steps"):
        total = min(total, cfg["max_steps"])
    warmup = max(1, round(cfg["warmup_frac"] * total))
    opt = torch.optim.AdamW(groups, weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, warmup))
    gen = torch.Generator().manual_seed(seed)
    epoch_times, epoch_losses, step = [], [], 0
    while step < total:
        task.train_mode(model)
        order = torch.randperm(n, generator=gen).to(device)
        _sync(device)
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        seen = 0
        for i in range(0, n, batch):
            if step >= total:
                break
            idx = order[i : i + batch]
            with task.autocast():
                logits = forward(x[idx])
            loss = nn.functional.cross_entropy(logits.float(), y[idx])
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            loss_sum += loss.detach() * len(idx)
            seen += len(idx)
            step += 1
        epoch_losses.append(loss_sum.item() / max(seen, 1))  # .item() synchronises
        _sync(device)
        epoch_times.append(time.perf_counter() - start)
        if not math.isfinite(epoch_losses[-1]):
            break
    val = evaluate(task, forward, model, method, "validation", cfg["eval_batch"])
    record = {
        "backbone": task.backbone,
        "method": method,
        "seed": seed,
        "hparams": dict(hp),
        "epochs": len(epoch_times),
        "steps": step,
        "warmup_steps": warmup,
        "train_images": n,
        "train_loss_last_epoch": epoch_losses[-1] if epoch_losses else None,
        "train_loss_per_epoch": epoch_losses,
        "val_acc": val["acc"],
        "val_loss": val["loss"],
        "epoch_time_s": epoch_times,
        "epoch_time_median_s": float(np.median(epoch_times)) if epoch_times else None,
        "trainable_params": trainable,
        "head_params": head,
        "analytic_trainable_params": analytic_trainable(task.backbone, method, task.base, task.targets, ablation),
    }
    if method == "linear":
        record["feature_extraction_s"] = task.feature_seconds
    record["wall_s"] = time.perf_counter() - wall
    return record, (model, forward)


def probe_step_time(
    task: Task, method: str, hp: dict, cfg: dict, steps: int, ablation: dict | None = None
) -> tuple[float, float]:
    """Time full-batch optimiser steps; no accuracy is computed.

    Returns:
        ``(seconds per step, per-run setup seconds)``: the median of ``steps`` steps
        after 2 warm-up steps, and the model building plus the warm-up steps' excess
        over two ordinary steps (first-call tracing, kernel selection).
    """
    _sync(task.device)
    start = time.perf_counter()
    model, forward, groups = task.build(method, hp, 0, ablation)
    opt = torch.optim.AdamW(groups, weight_decay=cfg["weight_decay"])
    x, y = task.inputs(method, "train")
    idx = torch.arange(min(cfg["batch"], len(y)), device=task.device)
    task.train_mode(model)
    times = []
    for _ in range(steps + 2):
        _sync(task.device)
        t = time.perf_counter()
        with task.autocast():
            loss = nn.functional.cross_entropy(forward(x[idx]).float(), y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(task.device)
        times.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    step = float(np.median(times[2:]))
    del model, opt
    return step, max(0.0, total - step * len(times)) + 2 * step


# --------------------------------------------------------------------------- the sweep


def sweep_cells(first_seed: bool) -> list[dict]:
    """The ``--sweep`` settings of one seed, most informative first.

    The adapter grid's top corner (the setting every DINOv2 adapter selected) comes
    first as the reference, then the cells past the grid (larger lr, larger scale,
    both), then, on the first seed only, the rest of the grid. A run cut short by
    ``--stop-after-s`` keeps the cells that answer "does it still train past the grid?".
    """
    top = {"lr": max(g["lr"] for g in ADAPTER_GRID), "scale": max(g["scale"] for g in ADAPTER_GRID)}
    cells = [{"lr": lr, "scale": s} for lr in SWEEP_LRS for s in SWEEP_SCALES]
    beyond = [c for c in cells if c["lr"] > top["lr"] or c["scale"] > top["scale"]]

    def order(c: dict) -> tuple[bool, int]:
        # one factor past the corner, then both, then past it on one axis but below it on the other
        below = c["lr"] < top["lr"] or c["scale"] < top["scale"]
        return below, (c["lr"] > top["lr"]) + (c["scale"] > top["scale"])

    beyond.sort(key=order)
    inside = [c for c in cells if c not in beyond and c != top]
    return [top, *beyond, *(inside if first_seed else [])]


def divergence(record: dict) -> list[str]:
    """Why a trained run counts as diverged (an empty list when it trained steadily).

    A non-finite loss; an epoch whose mean training loss is at or above ln(classes), the
    loss of the untrained model (a uniform guess), even if later epochs come back down;
    an epoch's loss more than twice the lowest before it; validation accuracy below twice
    chance. A function of the recorded losses and accuracy only, so ``--resume`` can
    re-apply it to earlier runs.
    """
    losses = record["train_loss_per_epoch"]
    reasons = []
    if not all(math.isfinite(x) for x in losses) or not math.isfinite(record["val_loss"]):
        reasons.append("non-finite loss")
    above = [i + 1 for i, x in enumerate(losses) if math.isfinite(x) and x >= math.log(NUM_CLASSES)]
    if above:
        reasons.append(f"loss >= ln {NUM_CLASSES} (an untrained model's) in epoch(s) {above}")
    if any(x > 2 * min(losses[:i]) for i, x in enumerate(losses) if i and math.isfinite(x)):
        reasons.append("loss blow-up (an epoch over twice the best before it)")
    if record["val_acc"] < 2 / NUM_CLASSES:
        reasons.append(f"validation accuracy {100 * record['val_acc']:.1f} % (chance {100 / NUM_CLASSES:.0f} %)")
    return reasons


def summarize_sweep(runs: list[dict], methods: dict) -> list[dict]:
    """Per (backbone, method, setting): validation and test accuracy over seeds, and the diverged runs."""
    rows = []
    for backbone, table in methods.items():
        for method, meta in table.items():
            mine = [r for r in runs if r["backbone"] == backbone and r["method"] == method and "test_acc" in r]
            settings = []
            for r in mine:
                if r["hparams"] not in settings:
                    settings.append(r["hparams"])
            for hp in settings:
                cell = sorted((r for r in mine if r["hparams"] == hp), key=lambda r: r["seed"])
                test = [r["test_acc"] for r in cell]
                rows.append(
                    {
                        "backbone": backbone,
                        "method": method,
                        "label": meta["label"],
                        "placement": meta["placement"],
                        "hparams": hp,
                        "seeds": [r["seed"] for r in cell],
                        "val_acc": [r["val_acc"] for r in cell],
                        "test_acc": test,
                        "test_acc_mean": float(np.mean(test)),
                        "test_acc_std": float(np.std(test, ddof=1)) if len(test) > 1 else None,
                        "diverged_seeds": [r["seed"] for r in cell if r["diverged"]],
                        "trainable_params": cell[0]["trainable_params"],
                    }
                )
    return rows


def resume_sweep(result: dict, out_file: Path, args: argparse.Namespace) -> float:
    """``--resume``: take the finished runs of ``out_file`` into ``result``; return the time they took.

    Refuses a file written with another image size, epoch count, batch, device or
    method list, whose runs would not compare with the new ones.
    """
    if not args.sweep:
        raise ValueError("--resume continues a --sweep (the study's later seeds depend on its selection); add --sweep.")
    if not out_file.is_file():
        raise ValueError(f"--resume: {out_file} does not exist; run without --resume to start the sweep.")
    earlier = json.loads(out_file.read_text())
    wanted = {
        "image_size": args.image_size,
        "epochs": int(args.epochs) if args.epochs != "auto" else None,
        "batch": args.batch,
        "device": torch.device(args.device).type,
        "methods": {b: list(t) for b, t in result["methods"].items()},
    }
    found = {
        "image_size": earlier["config"]["image_size"],
        "epochs": earlier["config"]["epochs"],
        "batch": earlier["config"]["batch"],
        "device": torch.device(earlier["environment"]["device"]).type,
        "methods": {b: list(t) for b, t in earlier["methods"].items()},
    }
    differ = {k: (found[k], wanted[k]) for k in wanted if found[k] != wanted[k]}
    if differ:
        raise ValueError(
            f"--resume: {out_file} was written with {', '.join(f'{k}={v[0]!r}' for k, v in differ.items())}, this "
            f"command asks for {', '.join(f'{k}={v[1]!r}' for k, v in differ.items())}. Give the same --image-size, "
            "--epochs, --batch, --device and --methods, or write to another --out."
        )
    result["runs"] = [r for r in earlier["runs"] if "test_acc" in r]
    for run in result["runs"]:  # the criterion of this version of the script
        run["divergence"] = divergence(run)
        run["diverged"] = bool(run["divergence"])
    result["resumed"] = earlier.get("resumed", []) + [
        {"command": earlier["command"], "started_utc": earlier["started_utc"], "runs": len(result["runs"])}
    ]
    return float(earlier.get("elapsed_s") or 0.0)


# --------------------------------------------------------------------------- the study


def summarize(runs: list[dict], methods: dict) -> list[dict]:
    """Per (backbone, method): the selected setting, test accuracy over seeds, parameters and epoch time."""
    rows = []
    for backbone, table in methods.items():
        for method, meta in table.items():
            mine = [r for r in runs if r["backbone"] == backbone and r["method"] == method]
            if not mine:
                continue
            tested = [r for r in mine if r.get("test_acc") is not None]
            accs = [r["test_acc"] for r in tested]
            grid = [
                {"hparams": r["hparams"], "val_acc": r["val_acc"], "val_loss": r["val_loss"]}
                for r in mine
                if r["phase"] == "grid"
            ]
            selected = next((r["hparams"] for r in mine if r.get("selected")), None)
            times = [t for r in mine for t in r["epoch_time_s"][1:] or r["epoch_time_s"]]
            rows.append(
                {
                    "backbone": backbone,
                    "method": method,
                    "label": meta["label"],
                    "placement": meta["placement"],
                    "selected_hparams": selected,
                    "grid": grid,
                    "seeds": [r["seed"] for r in tested],
                    "test_acc": accs,
                    "test_acc_mean": float(np.mean(accs)) if accs else None,
                    "test_acc_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else None,
                    "val_acc_selected": [r["val_acc"] for r in tested],
                    "trainable_params": mine[0]["trainable_params"],
                    "analytic_trainable_params": mine[0]["analytic_trainable_params"],
                    "head_params": mine[0]["head_params"],
                    "epoch_time_median_s": float(np.median(times)) if times else None,
                    "feature_extraction_s": mine[0].get("feature_extraction_s"),
                }
            )
    return rows


def _select(records: list[dict]) -> dict:
    """Best validation accuracy; ties go to the lower validation loss."""
    return max(records, key=lambda r: (r["val_acc"], -r["val_loss"]))


def run_study(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    amp = device.type == "cuda" and not args.fp32
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    if args.ablation:
        methods_all = {
            "dinov2": {k: {"label": v["label"], "placement": PLACEMENTS[v["placement"]]} for k, v in ABLATIONS.items()}
        }
    else:
        methods_all = METHODS
    if args.methods:
        selection = _parse_methods(args.methods, methods_all)
    else:
        selection = {b: list(t) for b, t in methods_all.items()}
    methods = {b: {m: methods_all[b][m] for m in ms} for b, ms in selection.items()}
    if args.sweep:
        not_adapters = [f"{b}:{m}" for b, ms in methods.items() for m in ms if m in GRIDS]
        if not_adapters:
            raise ValueError(
                f"--sweep varies an adapter's lr and scale; {', '.join(not_adapters)} has no scale to sweep. "
                "Name adapter methods only, e.g. --methods dinov2:lora,alore_par,alore_seq."
            )
        if args.ablation or args.setting:
            raise ValueError("--sweep sets its own lr x scale cells; drop --ablation and --setting.")
    seeds = args.seeds
    cfg = {
        "batch": args.batch,
        "eval_batch": args.eval_batch,
        "warmup_frac": 0.1,
        "weight_decay": 1e-4,
        "max_steps": args.max_steps,
        "epochs": None,
        "full_head_lr": FULL_HEAD_LR,
        "image_size": None,
        "amp": "bfloat16 autocast" if amp else "float32",
        "seeds": seeds,
        "grids": {},
        "quick": quick,
        "grid_mode": "sweep" if args.sweep else "first" if quick else (
            "setting" if args.setting or args.full_lr is not None else args.grid
        ),
        "ablation": bool(args.ablation),
    }
    manifest = read_manifest(args.bundle)
    result = {
        "schema": SCHEMA,
        "kind": "quick" if quick else ("ablation" if args.ablation else "sweep" if args.sweep else "study"),
        "command": args.command,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment(device),
        "bundle": {
            "path": str(args.bundle),
            "total_stored_bytes": manifest.get("total_stored_bytes"),
            "data": manifest.get("data"),
            "backbones": manifest.get("backbones"),
            "sources": manifest.get("sources"),
            "weights_dtype": manifest.get("weights_dtype"),
        },
        "config": cfg,
        "methods": methods,
        "runs": [],
        "skipped": [],
        "summary": [],
    }
    out_file = out_dir / ("ablation.json" if args.ablation else "sweep.json" if args.sweep else "results.json")
    earlier_s = resume_sweep(result, out_file, args) if args.resume else 0.0

    def save() -> None:
        result["summary"] = (summarize_sweep if args.sweep else summarize)(result["runs"], methods)
        result["elapsed_s"] = earlier_s + time.perf_counter() - t0
        tmp = out_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(out_file)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="evidence-study-"))
    try:
        paths = materialize(args.bundle, work)
        arrays = load_split_arrays(paths["data"])
        if quick:
            arrays = {s: (im[: args.quick_images[s]], lb[: args.quick_images[s]]) for s, (im, lb) in arrays.items()}
        cfg["images"] = {s: len(labels) for s, (_, labels) in arrays.items()}
        log(f"bundle decoded: {', '.join(f'{s} {n}' for s, n in cfg['images'].items())} images; device {device}")
        save()
        tasks: dict[str, Task] = {}
        for backbone in methods:
            folder = paths[backbone]
            proc = json.loads((folder / "preprocessor_config.json").read_text())
            size = args.image_size or proc["crop_size"]["height"]
            cfg["image_size"] = size
            base = load_backbone(folder, device)
            channels_last = backbone == "mobilenet_v2"
            if channels_last:
                base = base.to(memory_format=torch.channels_last)
            data = {
                s: (
                    device_images(im, size, proc["image_mean"], proc["image_std"], device, channels_last),
                    torch.from_numpy(lb).to(device),
                )
                for s, (im, lb) in arrays.items()
            }
            tasks[backbone] = Task(backbone, base, data, device, amp)
            if "linear" in methods[backbone]:
                tasks[backbone].compute_features(args.eval_batch)
            counts = ", ".join(f"{k} {len(v)}" for k, v in tasks[backbone].targets.items())
            log(f"{backbone}: loaded, {size} px, targets {counts}")

        grids = {}
        for backbone, table in methods.items():
            for method in table:
                base_method = "alore_seq" if method.startswith("alore_seq") else method
                grid = GRIDS.get(base_method, ADAPTER_GRID)
                if args.setting and "scale" in grid[0]:
                    grid = [args.setting]
                if args.full_lr is not None and base_method == "full":
                    grid = [{"lr": args.full_lr}]
                grids[f"{backbone}/{method}"] = grid[:1] if quick or args.grid == "first" else grid
                if args.sweep:
                    grids[f"{backbone}/{method}"] = sweep_cells(first_seed=True)[: 1 if quick else None]
        cfg["grids"] = grids
        if args.sweep:
            cfg["sweep"] = {"lrs": list(SWEEP_LRS), "scales": list(SWEEP_SCALES), "later_seeds": sweep_cells(False)}

        # Epochs: fixed, or chosen once from timed steps (no accuracy is looked at).
        if args.epochs == "auto":
            probe = {}
            for backbone, table in methods.items():
                for method in table:
                    ab = ABLATIONS.get(method) if args.ablation else None
                    hp = grids[f"{backbone}/{method}"][0]
                    probe[f"{backbone}/{method}"] = probe_step_time(tasks[backbone], _real(method), hp, cfg, 3, ab)
            spent = time.perf_counter() - t0
            cfg["timing_probe_s_per_step"] = {k: v[0] for k, v in probe.items()}
            cfg["timing_probe_setup_s"] = {k: v[1] for k, v in probe.items()}
            epochs = _choose_epochs(probe, grids, tasks, seeds, cfg, args.budget_s - spent)
            log(
                "timing probe: "
                + ", ".join(f"{k} {v[0] * 1000:.1f} ms/step + {v[1]:.2f} s/run" for k, v in probe.items())
                + f"; {spent:.0f} s spent so far"
            )
        else:
            epochs = int(args.epochs)
        cfg["epochs"] = epochs
        log(f"epochs per run: {epochs}; budget {args.budget_s:.0f} s")
        save()

        def fit_and_test(task: Task, method: str, seed: int, settings: list[dict], phase: str) -> dict | None:
            """Train every setting, keep the best on validation, test it once; return its setting."""
            key = f"{task.backbone}/{method}"
            ablation = ABLATIONS.get(method) if args.ablation else None
            best = None
            for hp in settings:
                if args.stop_after_s and time.perf_counter() - t0 > args.stop_after_s:
                    result["skipped"].append({"backbone": task.backbone, "method": method, "seed": seed, "hparams": hp})
                    log(f"skip {key} seed {seed} {_fmt(hp)}: past --stop-after-s")
                    save()
                    continue
                record, trained = train_run(task, _real(method), hp, seed, cfg, ablation)
                record.update(method=method, phase=phase)
                result["runs"].append(record)
                log(
                    f"{key} seed {seed} {_fmt(hp)}: val {record['val_acc']:.3f}, train loss "
                    f"{record['train_loss_last_epoch']:.3f}, {record['epoch_time_median_s']:.2f} s/epoch, trainable "
                    f"{record['trainable_params']:,} (+head {record['head_params']:,})"
                )
                if best is None or _select([best[0], record]) is record:
                    best = (record, trained)
                del trained
                save()
            if best is None:
                return None
            record, (model, forward) = best
            del best
            record["selected"] = True
            test = evaluate(task, forward, model, _real(method), "test", cfg["eval_batch"])
            record.update(test_acc=test["acc"], test_loss=test["loss"], test_images=test["n"])
            log(f"{key} seed {seed}: selected {_fmt(record['hparams'])} -> test {test['acc']:.4f}")
            del model, forward
            if device.type == "cuda":
                torch.cuda.empty_cache()
            save()
            return record["hparams"]

        def sweep_cell(task: Task, method: str, seed: int, hp: dict) -> None:
            """Train one cell, validate and test it, and record whether it diverged."""
            key = f"{task.backbone}/{method}"
            if any((r["backbone"], r["method"], r["seed"], r["hparams"]) == (task.backbone, method, seed, hp)
                   for r in result["runs"]):  # fmt: skip
                return  # finished before --resume
            if args.stop_after_s and time.perf_counter() - t0 > args.stop_after_s:
                result["skipped"].append({"backbone": task.backbone, "method": method, "seed": seed, "hparams": hp})
                log(f"skip {key} seed {seed} {_fmt(hp)}: past --stop-after-s")
                save()
                return
            record, (model, forward) = train_run(task, method, hp, seed, cfg)
            test = evaluate(task, forward, model, method, "test", cfg["eval_batch"])
            record.update(phase="sweep", test_acc=test["acc"], test_loss=test["loss"], test_images=test["n"])
            record["divergence"] = divergence(record)
            record["diverged"] = bool(record["divergence"])
            result["runs"].append(record)
            log(
                f"{key} seed {seed} {_fmt(hp)}: val {record['val_acc']:.3f}, test {test['acc']:.4f}, train loss "
                f"{record['train_loss_last_epoch']:.3f}, {record['wall_s']:.0f} s"
                + (f", DIVERGED ({'; '.join(record['divergence'])})" if record["diverged"] else "")
            )
            del model, forward
            save()

        if args.sweep:  # seed-major, then cell, then method: a cut-off run has every method at the same cells
            for seed in seeds:
                for hp in sweep_cells(first_seed=seed == seeds[0])[: 1 if quick else None]:
                    for backbone, table in methods.items():
                        for method in table:
                            sweep_cell(tasks[backbone], method, seed, hp)
        # The grid on the first seed for every method (its selected model is tested), then the other seeds.
        chosen: dict[str, dict] = {}
        for phase, phase_seeds in (("grid", seeds[:1]), ("seed", seeds[1:])) if not args.sweep else ():
            for backbone, table in methods.items():
                for method in table:
                    key = f"{backbone}/{method}"
                    settings = grids[key] if phase == "grid" else [chosen[key]] if key in chosen else []
                    for seed in phase_seeds:
                        if settings:
                            selected = fit_and_test(tasks[backbone], method, seed, settings, phase)
                            if phase == "grid" and selected is not None:
                                chosen[key] = selected
        result["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        save()
        log(f"done: {out_file}")
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _real(method: str) -> str:
    """Ablation variants of the sequential ALoRE train like it."""
    return "alore_seq" if method.startswith("alore_seq") else method


def _fmt(hp: dict) -> str:
    return " ".join(f"{k}={v:g}" for k, v in hp.items())


def _choose_epochs(probe: dict, grids: dict, tasks: dict, seeds: list, cfg: dict, budget: float) -> int:
    """Largest epoch count in EPOCH_MENU whose projected time fits ``budget`` seconds.

    Projection per method: runs x (setup + epochs x steps per epoch x seconds per step
    + evaluation), the evaluation images costed at a third of a training image each, all
    times 1.15 for margin.
    """

    def projected(epochs: int) -> float:
        total = 0.0
        for key, (s_step, setup) in probe.items():
            task = tasks[key.split("/")[0]]
            n_train = len(task.data["train"][1])
            per_image = s_step / min(cfg["batch"], n_train)
            runs = len(grids[key]) + len(seeds) - 1
            eval_images = len(task.data["validation"][1]) * runs + len(task.data["test"][1]) * len(seeds)
            evaluation = per_image / 3 * eval_images
            total += runs * (setup + epochs * math.ceil(n_train / cfg["batch"]) * s_step) + evaluation
        return 1.15 * total

    for epochs in EPOCH_MENU:
        if projected(epochs) <= budget:
            cfg["projected_training_s"] = projected(epochs)
            return epochs
    cfg["projected_training_s"] = projected(EPOCH_MENU[-1])
    return EPOCH_MENU[-1]


def _parse_methods(spec: list[str], methods_all: dict) -> dict[str, list[str]]:
    """``["dinov2:linear,lora", "mobilenet_v2:lora"]`` -> {backbone: [methods]}, validated."""
    out = {}
    for item in spec:
        backbone, _, names = item.partition(":")
        if backbone not in methods_all:
            raise ValueError(f"--methods {item!r}: backbone {backbone!r} is not one of {sorted(methods_all)}.")
        names = [m for m in names.split(",") if m] or list(methods_all[backbone])
        unknown = [m for m in names if m not in methods_all[backbone]]
        if unknown:
            raise ValueError(
                f"--methods {item!r}: {unknown} not among {backbone}'s methods {sorted(methods_all[backbone])}."
            )
        out[backbone] = names
    return out


def _parse_setting(text: str) -> dict:
    """``"lr=3e-3,scale=4"`` -> ``{"lr": 0.003, "scale": 4.0}``."""
    setting = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in ("lr", "scale"):
            raise argparse.ArgumentTypeError(f"--setting {text!r}: expected lr=VALUE,scale=VALUE, got {item!r}.")
        setting[key] = float(value)
    if set(setting) != {"lr", "scale"}:
        raise argparse.ArgumentTypeError(f"--setting {text!r} must give both lr and scale, e.g. lr=3e-3,scale=4.")
    return setting


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, help="folder written by examples/evidence/bundle.py")
    parser.add_argument("--out", required=True, help="output folder for results.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a few steps on a few images (CI smoke)")
    parser.add_argument("--ablation", action="store_true", help="ALoRE ablations on DINOv2 instead of the study")
    parser.add_argument(
        "--sweep", action="store_true", help="adapters' lr x scale past the grid, every cell tested (sweep.json)"
    )
    parser.add_argument("--resume", action="store_true", help="with --sweep: keep OUT's finished runs, run the rest")
    parser.add_argument("--methods", nargs="+", default=None, help="e.g. dinov2:linear,lora mobilenet_v2:lora")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--grid", choices=("full", "first"), default="full", help="'first': each method's first setting only"
    )
    parser.add_argument("--epochs", default="auto", help="an integer, or 'auto' (timing probe + --budget-s)")
    parser.add_argument(
        "--budget-s", type=float, default=200.0, help="seconds the whole study may take, for --epochs auto"
    )
    parser.add_argument("--stop-after-s", type=float, default=None, help="start no run after this many seconds")
    parser.add_argument(
        "--setting",
        type=_parse_setting,
        default=None,
        help="e.g. lr=3e-3,scale=4: the only setting of every adapter method (replaces its grid)",
    )
    parser.add_argument(
        "--full-lr",
        type=float,
        default=None,
        help="e.g. 3e-5: the only backbone lr of full fine-tuning (replaces its grid)",
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--eval-batch", type=int, default=256)
    parser.add_argument("--max-steps", type=int, default=None, help="cap on optimiser steps per run")
    parser.add_argument("--image-size", type=int, default=None, help="default: the bundle's image processor size")
    parser.add_argument("--fp32", action="store_true", help="no bfloat16 autocast on CUDA")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command = "python examples/evidence/study.py " + shlex.join(argv)
    if args.quick:
        # Seconds on 2 CPU cores: small images, few steps, one setting, one seed.
        args.image_size = args.image_size or 28
        args.batch = min(args.batch, 8)
        args.eval_batch = min(args.eval_batch, 64)
        args.max_steps = args.max_steps or 2
        args.seeds = args.seeds[:1]
        if args.epochs == "auto":
            args.epochs = "1"
        if args.methods is None and not args.ablation:
            args.methods = ["dinov2:linear,lora,alore_seq", "mobilenet_v2:alore_seq"]
    args.quick_images = {"train": 16, "validation": 8, "test": 16}
    if args.threads:
        torch.set_num_threads(args.threads)
    return run_study(args)


if __name__ == "__main__":
    main()
