"""Convolutions: ALoRE in both modes against PEFT's LoRA, on pointwise and on k x k convolutions.

Two randomly initialised backbones from transformers (nothing is downloaded),
adapters on one family of convolutions each, the classifier head trained too:

- ``mobilenet_v2``: ``MobileNetV2ForImageClassification(MobileNetV2Config())``
  with adapters on its pointwise (1x1, ``groups=1``) convolutions, as the
  evidence study places them;
- ``resnet``: a ResNet-18 (``ResNetConfig(layer_type="basic", depths=[2, 2, 2,
  2])``) with adapters on the 3x3 convolutions of its residual blocks.

Methods: ``frozen`` (the head alone), ``lora`` (PEFT LoRA, r=8), ``alore_par``
and ``alore_seq`` (ALoRE r=8, n=4; a sequential adapter acts on the
convolution's input channels, a parallel one has the kernel's shape). A train
step is forward, cross-entropy, backward, AdamW step and ``zero_grad``; the
batch-norm layers stay in eval mode (as when fine-tuning from pretrained
statistics). Steps are interleaved and repeated; a ratio is the median over
repetitions of the per-repetition ratio, from wall-clock and from CPU time.

    python benchmarks/bench_conv.py                        # both backbones, batch 32, 56 and 112 px
    python benchmarks/bench_conv.py --quick                # a smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_adapters.py

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_adapters import Runner, add_cpu_run_flags, device_name, start_cpu_run, summary  # noqa: E402
from bench_adapters import time_interleaved  # noqa: E402
from opcount import count_ops  # noqa: E402

METHODS = ("frozen", "lora", "alore_par", "alore_seq")
R, N = 8, 4


def build_backbone(name: str, quick: bool) -> tuple[nn.Module, list[str]]:
    """A random backbone and the names of the convolutions that get adapters."""
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification, ResNetConfig
    from transformers import ResNetForImageClassification

    torch.manual_seed(0)
    if name == "mobilenet_v2":
        # tf_padding=False: PEFT's LoRA layers hide the convolution's stride that TF-style padding reads
        # (ALoRE's expose it; tests/test_conv.py runs the default config).
        cfg = MobileNetV2Config(num_labels=10, depth_multiplier=0.35 if quick else 1.0, tf_padding=False)
        model = MobileNetV2ForImageClassification(cfg)
        pick = lambda m: m.kernel_size == (1, 1)  # noqa: E731
    elif name == "resnet":
        sizes = [16, 32, 32, 64] if quick else [64, 128, 256, 512]
        cfg = ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=sizes, num_labels=10)
        model = ResNetForImageClassification(cfg)
        pick = lambda m: m.kernel_size == (3, 3) and m.in_channels % N == 0  # noqa: E731  (not the 3-channel stem)
    else:
        raise ValueError(f"unknown backbone {name!r}; choose mobilenet_v2 or resnet")
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1 and pick(m)]
    return model.eval(), targets


def build_method(name: str, base: nn.Module, targets: list[str]) -> nn.Module:
    import peft

    from alore_peft import AloreConfig

    model = copy.deepcopy(base).requires_grad_(False)
    if name == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=R, target_modules=targets))
    elif name in ("alore_par", "alore_seq"):
        mode = "parallel" if name == "alore_par" else "sequential"
        model = peft.get_peft_model(model, AloreConfig(r=R, num_experts=N, alpha=R, mode=mode, target_modules=targets))
    elif name != "frozen":
        raise ValueError(f"unknown method {name!r}; choose from {METHODS}")
    model.get_submodule("base_model.model.classifier" if name != "frozen" else "classifier").requires_grad_(True)
    return model


def train_step(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()

    def step() -> None:
        loss = nn.functional.cross_entropy(model(pixel_values=pixels).logits, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _ratio(stats: dict, a: str, b: str, key: str) -> float:
    pairs = [x / y for x, y in zip(stats[a][key], stats[b][key]) if y > 0]
    return statistics.median(pairs)


def run(args, backbone: str, size: int, log) -> dict:
    base, targets = build_backbone(backbone, args.quick)
    gen = torch.Generator().manual_seed(size)
    pixels = torch.randn(args.batch, 3, size, size, generator=gen)
    labels = torch.randint(0, 10, (args.batch,), generator=gen)
    models = {name: build_method(name, base, targets) for name in METHODS}
    runners = {name: Runner(train_step(m, pixels, labels)) for name, m in models.items()}
    ops = {name: count_ops(r.fn) for name, r in runners.items()}
    time_interleaved(runners, args.reps, 1, torch.device("cpu"))
    stats = {name: summary(r) for name, r in runners.items()}
    ratios = {
        name: {
            "vs_lora": _ratio(stats, name, "lora", "samples_ms"),
            "vs_lora_cpu": _ratio(stats, name, "lora", "cpu_samples_ms"),
        }
        for name in METHODS
    }
    log(f"{backbone} {size} px: " + ", ".join(f"{n} {stats[n]['median_ms']:.0f} ms ({ratios[n]['vs_lora']:.2f}x LoRA)"
                                                for n in METHODS))
    return {
        "backbone": backbone,
        "image_size": size,
        "batch": args.batch,
        "adapted_convs": len(targets),
        "kernels": sorted({str(base.get_submodule(t).kernel_size) for t in targets}),
        "train": stats,
        "ratios": ratios,
        "ops": {n: {"aten_ops": o.aten, "kernel_ops": o.kernels} for n, o in ops.items()},
    }


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [
        "# bench_conv",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"- {meta['device_name']}, torch {meta['torch']}, {meta['threads']} threads; load average at start "
        f"{meta['loadavg_start']}, at end {meta['loadavg_end']}"
        + ("; subnormal floats flushed to zero." if meta.get("flush_denormal") else "."),
        f"- r={R}, n={N}; {meta['reps']} interleaved repetitions of a train step. Times: wall-clock median ms "
        "[quartiles] / CPU-time median; `x LoRA`: median of per-repetition ratios, wall / CPU.",
        "",
        "| backbone | px | convs | method | train step ms | x LoRA | ATen ops (kernels) per step |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for res in report["results"]:
        for name in METHODS:
            s, r, o = res["train"][name], res["ratios"][name], res["ops"][name]
            lines.append(
                f"| {res['backbone']} | {res['image_size']} | {res['adapted_convs']} {'/'.join(res['kernels'])} "
                f"| {name} | {s['median_ms']:.1f} [{s['q1_ms']:.1f}-{s['q3_ms']:.1f}] / {s['cpu_median_ms']:.1f} "
                f"| {r['vs_lora']:.2f} / {r['vs_lora_cpu']:.2f} | {o['aten_ops']} ({o['kernel_ops']}) |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", nargs="+", choices=["mobilenet_v2", "resnet"], default=["mobilenet_v2", "resnet"])
    p.add_argument("--sizes", nargs="+", type=int, default=None, help="image sizes (default 56 112; quick 32)")
    p.add_argument("--batch", type=int, default=None, help="default 32 (quick 2)")
    p.add_argument("--reps", type=int, default=None, help="default 7 (quick 1)")
    add_cpu_run_flags(p, "narrow backbones, small images: a smoke test")
    args = p.parse_args(argv)
    args.sizes = args.sizes or ([32] if args.quick else [56, 112])
    args.batch = args.batch or (2 if args.quick else 32)
    args.reps = args.reps or (1 if args.quick else 7)
    flush = start_cpu_run(args)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    report = {
        "meta": {
            "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
            "device_name": device_name(torch.device("cpu")),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "loadavg_start": [round(v, 2) for v in os.getloadavg()],
            "reps": args.reps,
            "flush_denormal": flush,
        },
        "results": [],
    }
    for backbone in args.backbones:
        for size in args.sizes:
            report["results"].append(run(args, backbone, size, log))
    report["meta"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "bench_conv.json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    (args.out_dir / "bench_conv.md").write_text(md)
    print(md)
    return report


if __name__ == "__main__":
    main()
