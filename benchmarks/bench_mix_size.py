"""Large ``n^2 r``: training one adapted layer on the factored path against the automatic choice.

The factored path mixes ``n^2 r`` values per token with the rules' ``(n^2 r)^2``
matrix; for large ``n`` and ``r`` that costs more per token than the layer's
own weight, and ``compute_path="auto"`` lets the cost model
(:func:`alore_peft.functional.prefer_fold`) fold the adapter into the weight
for the call instead. For each ``(n, r, mode)`` this times a training call
(forward and backward, the input needing a gradient as inside a backbone) of a
``Linear(width, width)`` with ``compute_path="factored"`` and with ``"auto"``,
interleaved, and prints which path ``auto`` took, the medians and the ratio.

    python benchmarks/bench_mix_size.py                      # 768 wide, 1,576 and 197 tokens
    python benchmarks/bench_mix_size.py --quick              # small and fast (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_adapters.py

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_adapters import Runner, add_cpu_run_flags, device_name, start_cpu_run, summary  # noqa: E402
from bench_adapters import time_interleaved  # noqa: E402
from bench_layer import train_call  # noqa: E402

# (n, r, mode): the paper's size first, then mixes that outgrow a 768-wide layer.
CONFIGS = [(4, 4, "sequential"), (8, 8, "sequential"), (16, 4, "sequential"), (8, 8, "parallel"), (16, 8, "parallel")]
QUICK_CONFIGS = [(4, 2, "sequential"), (4, 8, "parallel")]


def build(width: int, n: int, r: int, mode: str, path: str) -> nn.Module:
    from peft import get_peft_model

    from alore_peft import AloreConfig

    torch.manual_seed(0)
    config = AloreConfig(r=r, num_experts=n, mode=mode, target_modules=["0"], compute_path=path, init_weights=False)
    return get_peft_model(nn.Sequential(nn.Linear(width, width)), config).train()


def auto_folds(model: nn.Module, x: torch.Tensor) -> bool:
    layer = model.base_model.model[0]
    return layer._use_fold(layer._active(), x)


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--tokens", type=int, nargs="+", default=[197 * 8, 197])
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 7, quick 2)")
    add_cpu_run_flags(p, "a 32-wide layer, few tokens and repetitions")
    args = p.parse_args(argv)
    flush = start_cpu_run(args)
    width, tokens_list = (32, [64]) if args.quick else (args.width, args.tokens)
    reps = args.reps or (2 if args.quick else 7)
    rows = []
    for tokens in tokens_list:
        for n, r, mode in QUICK_CONFIGS if args.quick else CONFIGS:
            x = torch.randn(tokens, width, requires_grad=True)
            models = {path: build(width, n, r, mode, path) for path in ("factored", "auto")}
            runners = {path: Runner(train_call(m, x)) for path, m in models.items()}
            time_interleaved(runners, reps, 1, torch.device("cpu"))
            stats = {path: summary(run) for path, run in runners.items()}
            ratio = sorted(a / b for a, b in zip(stats["auto"]["samples_ms"], stats["factored"]["samples_ms"]))
            rows.append({
                "tokens": tokens, "n": n, "r": r, "mode": mode, "mix": n * n * r,
                "auto_folds": auto_folds(models["auto"], x),
                "factored_ms": stats["factored"]["median_ms"], "auto_ms": stats["auto"]["median_ms"],
                "auto_vs_factored": ratio[len(ratio) // 2],
            })
            print(f"{tokens} tokens, n={n} r={r} {mode}: auto {'folds' if rows[-1]['auto_folds'] else 'factored'}, "
                  f"{rows[-1]['auto_ms']:.1f} ms against {rows[-1]['factored_ms']:.1f} ms", file=sys.stderr)
    report = {
        "meta": {
            "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
            "device_name": device_name(torch.device("cpu")),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "flush_denormal": flush,
            "width": width,
            "reps": reps,
        },
        "rows": rows,
    }
    lines = [
        "# bench_mix_size",
        "",
        f"Command: `{report['meta']['command']}`",
        "",
        f"- {report['meta']['device_name']}, torch {torch.__version__}, {report['meta']['threads']} threads; "
        f"`Linear({width}, {width})`, one training call (forward and backward); {reps} interleaved repetitions, "
        "medians; `auto / factored` is the median of the per-repetition ratios.",
        "",
        "| tokens | n | r | mode | n^2 r | auto takes | factored ms | auto ms | auto / factored |",
        "|---:|---:|---:|---|---:|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['tokens']} | {row['n']} | {row['r']} | {row['mode']} | {row['mix']} "
            f"| {'fold' if row['auto_folds'] else 'factored'} | {row['factored_ms']:.1f} | {row['auto_ms']:.1f} "
            f"| {row['auto_vs_factored']:.2f} |"
        )
    md = "\n".join(lines) + "\n"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "bench_mix_size.json").write_text(json.dumps(report, indent=1))
    (args.out_dir / "bench_mix_size.md").write_text(md)
    print(md)
    return report


if __name__ == "__main__":
    main()
