"""One adapted layer: ALoRE's paths against PEFT's LoRA at the same budget, timed and counted.

The unit is a ViT-B/16 block's compute on one normalised input,
``LayerNorm -> container``, where the container holds q, k and v (768 -> 768)
and an MLP (``fc1`` 768 -> 3072, GELU, ``fc2``) whose ``fc1`` reads the same
tokens, so every placement of one adapter can be compared on one module:

- ``base``: the frozen module (the floor);
- ``lora``: PEFT LoRA, r=4, on ``q_proj`` (the same parameter count as ALoRE r=4);
- ``lora_fc1``: PEFT LoRA, r=4, on ``fc1``;
- ``alore_par``: ALoRE r=4, n=4, parallel on ``q_proj``;
- ``alore_par_fc1``: the same on ``fc1`` (a 3072 x 768 update);
- ``alore_seq``: ALoRE sequential on ``q_proj``'s input;
- ``alore_block``: ALoRE sequential on the attention container's input, shared by q, k and v (the paper's
  placement; one adapter, like ``lora``).

Two regimes: ``train`` (forward and backward; the input needs a gradient, as
inside a backbone; ``zero_grad`` as an optimiser leaves it) and ``infer``
(eval mode under ``torch.inference_mode``: ALoRE serves from its cached
folded weights). Everything is interleaved and repeated; reported are
wall-clock medians (with quartiles), CPU-time medians, and the operators of one
call (``benchmarks/opcount.py``) in float32 and under bfloat16 autocast, with
the adapter's share (the frozen module's own subtracted) beside LoRA's.

    python benchmarks/bench_layer.py                 # 197 x 8 tokens per call
    python benchmarks/bench_layer.py --quick         # small and fast (smoke test)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_adapters.py

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_adapters import Runner, add_cpu_run_flags, device_name, start_cpu_run, summary  # noqa: E402
from bench_adapters import time_interleaved  # noqa: E402
from opcount import count_ops  # noqa: E402

R, N = 4, 4


class Attention(nn.Module):
    """A container whose input q, k, v and an MLP's fc1 read (ViT-B/16 widths by default)."""

    def __init__(self, d: int = 768, mlp: int = 3072) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, mlp), nn.Linear(mlp, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return q * k + v + self.fc2(nn.functional.gelu(self.fc1(x)))


class HalfBlock(nn.Module):
    """``LayerNorm -> container``: the tokens reach the adapted layers as a norm's output, as in a ViT."""

    def __init__(self, d: int = 768, mlp: int = 3072) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attention = Attention(d, mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(self.norm(x))


def configs() -> dict:
    """Every variant's PEFT config (``None``: the frozen module), one adapter each, r = 4."""
    from peft import LoraConfig

    from alore_peft import AloreConfig

    def alore(targets, mode="sequential"):
        return AloreConfig(r=R, num_experts=N, alpha=2 * R, mode=mode, target_modules=targets)

    return {
        "base": None,
        "lora": LoraConfig(r=R, lora_alpha=2 * R, target_modules=["q_proj"]),
        "lora_fc1": LoraConfig(r=R, lora_alpha=2 * R, target_modules=["fc1"]),
        "alore_par": alore(["q_proj"], "parallel"),
        "alore_par_fc1": alore(["fc1"], "parallel"),
        "alore_seq": alore(["q_proj"]),
        "alore_block": alore(["attention"]),
    }


# Each ALoRE variant is compared with the LoRA that adapts the same layer.
LORA_OF = {"alore_par": "lora", "alore_par_fc1": "lora_fc1", "alore_seq": "lora", "alore_block": "lora"}


def build(name: str, d: int, mlp: int, seed: int = 0, blocks: int = 1) -> nn.Module:
    """``HalfBlock`` (``blocks`` of them in a row) with variant ``name``'s adapter (the same random weights for every variant)."""
    from peft import get_peft_model

    import alore_peft  # noqa: F401  (registers ALoRE with PEFT)

    torch.manual_seed(seed)
    model = HalfBlock(d, mlp) if blocks == 1 else nn.Sequential(*(HalfBlock(d, mlp) for _ in range(blocks)))
    cfg = configs()[name]
    if cfg is None:
        return model.requires_grad_(False)
    return get_peft_model(model, copy.deepcopy(cfg))


def train_call(model: nn.Module, x: torch.Tensor, autocast: bool = False) -> Callable[[], None]:
    """Forward and backward of one call; gradients set to ``None`` after it, as ``optimizer.zero_grad`` does."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        out.float().sum().backward()
        x.grad = None
        for p in params:
            p.grad = None

    return step


def infer_call(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    model.eval()

    def infer() -> None:
        with torch.inference_mode():
            model(x)

    return infer


def adapter_ops(name: str, d: int = 64, mlp: int = 128, tokens: int = 8, autocast: bool = False) -> dict:
    """Operators variant ``name``'s adapter adds to one training call, per adapted layer and for one layer alone.

    ``aten_ops``/``kernel_ops``: what each further adapted layer adds (a
    model with three adapted blocks minus one with two; the frozen modules'
    own subtracted). ``alone``: the same for a model with one adapted layer,
    which also holds what an adapter runs once per step whatever its number of
    layers (ALoRE's shared rules: their mixing matrix, and their gradient from
    every layer's products in one matmul, joined from the second layer on).
    """

    def share(blocks: int) -> tuple[int, int]:
        x = torch.randn(1, tokens, d, requires_grad=True)
        base = count_ops(train_call(build("base", d, mlp, blocks=blocks), x, autocast))
        adapted = count_ops(train_call(build(name, d, mlp, blocks=blocks), x, autocast))
        return adapted.aten - base.aten, adapted.kernels - base.kernels

    one, two, three = share(1), share(2), share(3)
    return {
        "aten_ops": three[0] - two[0],
        "kernel_ops": three[1] - two[1],
        "alone": {"aten_ops": one[0], "kernel_ops": one[1]},
    }


def check_equal(d: int, mlp: int) -> float:
    """Largest difference between each variant's unmerged and merged outputs (the adapters made non-zero)."""
    worst = 0.0
    x = torch.randn(2, 5, d)
    for name in configs():
        if not name.startswith("alore"):
            continue
        model = build(name, d, mlp)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.02)
            model.eval()
            unmerged = model(x)
            merged = model.merge_and_unload()(x)
        worst = max(worst, (unmerged - merged).abs().max().item())
    return worst


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=197 * 8, help="tokens per call (default 197 x 8)")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 10, quick 3)")
    add_cpu_run_flags(p, "a 64-wide module, few tokens and repetitions")
    args = p.parse_args(argv)
    flush = start_cpu_run(args)
    reps = args.reps or (3 if args.quick else 10)
    d, mlp = (64, 256) if args.quick else (768, 3072)
    tokens = 64 if args.quick else args.tokens
    names = list(configs())

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    report = {
        "meta": {
            "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
            "device_name": device_name(torch.device("cpu")),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "flush_denormal": flush,
            "loadavg_start": [round(v, 2) for v in os.getloadavg()],
            "width": d,
            "mlp": mlp,
            "tokens": tokens,
            "reps": reps,
            "n": N,
            "r": R,
        },
        "max_abs_diff_merged": check_equal(d, mlp),
        "ops": {},
    }
    # Operators: deterministic, so counted once per variant and precision, on the measured widths.
    for autocast in (False, True):
        key = "bfloat16_autocast" if autocast else "float32"
        report["ops"][key] = {n: adapter_ops(n, d, mlp, tokens=8, autocast=autocast) for n in names if n != "base"}
        log(f"ops ({key}): " + ", ".join(f"{n} {o['aten_ops']} ({o['kernel_ops']})" for n, o in
                                         report["ops"][key].items()))
    x = torch.randn(1, tokens, d, requires_grad=True)  # (batch, tokens, features)
    models = {n: build(n, d, mlp) for n in names}
    for regime in ("train", "infer"):
        make = train_call if regime == "train" else infer_call
        runners = {n: Runner(make(m, x if regime == "train" else x.detach())) for n, m in models.items()}
        time_interleaved(runners, reps, 1, torch.device("cpu"))
        report[regime] = {n: summary(r) for n, r in runners.items()}
        log(f"{regime}: " + ", ".join(f"{n} {s['median_ms']:.2f}/{s['cpu_median_ms']:.2f}" for n, s in
                                       report[regime].items()) + " ms (wall/cpu)")
    report["meta"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "bench_layer.json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    (args.out_dir / "bench_layer.md").write_text(md)
    print(md)
    return report


def _ratio(stats: dict, a: str, b: str) -> str:
    """Median of the per-repetition ratios, wall / CPU."""
    wall = sorted(x / y for x, y in zip(stats[a]["samples_ms"], stats[b]["samples_ms"]))
    cpu = sorted(x / y for x, y in zip(stats[a]["cpu_samples_ms"], stats[b]["cpu_samples_ms"]) if y > 0)
    med = lambda v: v[len(v) // 2] if v else float("nan")  # noqa: E731
    return f"{med(wall):.2f} / {med(cpu):.2f}"


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [
        "# bench_layer",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"- {meta['device_name']}, torch {meta['torch']}, {meta['threads']} threads, "
        f"OMP_WAIT_POLICY={meta['omp_wait_policy']}; load average at start {meta['loadavg_start']}, "
        f"at end {meta['loadavg_end']}" + ("; subnormal floats flushed to zero." if meta.get("flush_denormal") else "."),
        f"- `LayerNorm -> attention` (q, k, v {meta['width']} -> {meta['width']}, fc1 {meta['width']} -> "
        f"{meta['mlp']}); r={meta['r']}, n={meta['n']}; {meta['tokens']} tokens per call; {meta['reps']} "
        "interleaved repetitions.",
        "- Times in ms: wall-clock median [quartiles] / CPU-time median; ratios are medians of per-repetition "
        "ratios, wall / CPU. Operators: what each adapted layer adds to one training call, ATen operators with "
        "the kernel-launching ones in brackets (`benchmarks/opcount.py`), beside the LoRA on the same layer.",
        "",
        "| variant | train (fwd+bwd) | x LoRA | infer | x base | ops, float32 | LoRA's | ops, bf16 autocast | LoRA's |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    tr, inf = report["train"], report["infer"]
    f32, amp = report["ops"]["float32"], report["ops"]["bfloat16_autocast"]

    def cell(s: dict) -> str:
        return f"{s['median_ms']:.2f} [{s['q1_ms']:.2f}-{s['q3_ms']:.2f}] / {s['cpu_median_ms']:.2f}"

    def ops(o: Optional[dict]) -> str:
        return "-" if o is None else f"{o['aten_ops']} ({o['kernel_ops']})"

    for n in tr:
        lora = LORA_OF.get(n)
        lines.append(
            f"| {n} | {cell(tr[n])} | {_ratio(tr, n, lora) if lora else '-'} | {cell(inf[n])} "
            f"| {_ratio(inf, n, 'base')} | {ops(f32.get(n))} | {ops(f32.get(lora)) if lora else '-'} "
            f"| {ops(amp.get(n))} | {ops(amp.get(lora)) if lora else '-'} |"
        )
    alone = ", ".join(
        f"{n} {ops(f32[n].get('alone'))} / {ops(amp[n].get('alone'))}" for n in f32 if "alone" in f32[n]
    )
    lines += [
        "",
        "Operators are per adapted layer: what a third adapted block adds to two. With one adapted layer only "
        f"(float32 / bf16 autocast), which also holds what an adapter runs once per model forward: {alone}.",
        "",
        f"Merged vs unmerged outputs agree to {report['max_abs_diff_merged']:.1e} (max abs difference).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
