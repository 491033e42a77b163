"""One adapted layer: factored ALoRE vs building dW once per call vs LoRA, and the auto path's choice.

Layers of ViT-B/16 (768 -> 768 like q/k/v, 768 -> 3072 like fc1) on 197 tokens
x batch 8, ALoRE r=4, n=4 in parallel mode (``y = W x + b + s dW x``). Each
variant runs the frozen base layer too, so the numbers are what a layer of a
backbone costs:

- ``base``: the frozen layer alone (the floor);
- ``factored``: ``functional.apply`` (``dW`` never built);
- ``factored_v0``: the previous ``apply`` (einsum rule mixing and a scale pass
  over the output), kept here to show what the rewrite changed;
- ``fold``: ``dW`` built once per call and added to the weight, one matmul;
- ``auto``: the real ``alore_peft.Linear`` layer with ``compute_path="auto"``;
- ``seq``: the real layer in sequential mode (``W (x + s dW x) + b``, dW square);
- ``lora_nr``: LoRA of rank ``n * r`` (the factored path's matmul sizes);
- ``lora_r``: LoRA of rank ``r`` (the same parameter count as ALoRE).

Two regimes: ``train`` (forward and backward; the input needs a gradient, as
inside a backbone; the base weight is frozen) and ``infer`` (forward under
``torch.no_grad``). Everything is interleaved and repeated; reported are
wall-clock medians (with quartiles) and CPU-time medians.

The flop model check: for every shape and regime, ``functional.prefer_fold``
must pick the faster of ``factored`` and ``fold``; ``--sweep`` also measures
both (and the frozen layer alone, and LoRA of rank r) over a range of token
counts without gradients and compares the measured crossover with the
predicted one.

    python benchmarks/bench_layer.py                 # 1576 tokens, both shapes, sweep
    python benchmarks/bench_layer.py --quick         # small and fast (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_adapters.py

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_adapters import Runner, device_name, summary, time_interleaved  # noqa: E402

from alore_peft import AloreConfig  # noqa: E402
from alore_peft import functional as F  # noqa: E402
from alore_peft.layer import Linear as AloreLinear  # noqa: E402

SHAPES = [(768, 768), (768, 3072)]  # (d_in, d_out)
N, R, SCALE = 4, 4, 1.0


def apply_v0(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, scale: float) -> torch.Tensor:
    """The first ``functional.apply``: einsum rule mixing (two permuted copies) and a scale pass."""
    n, r, q_in = C.shape
    q_out = B.shape[1]
    lead = x.shape[:-1]
    z = x.reshape(*lead, n, q_in) @ C.reshape(n * r, q_in).T  # (..., n_j, n_i * r)
    u = torch.einsum("ipj,...jir->...pir", A, z.reshape(*lead, n, n, r))  # (..., n_p, n_i, r)
    b_cat = B.permute(1, 0, 2).reshape(q_out, n * r)  # (q_out, n_i * r)
    y = u.reshape(*lead, n, n * r) @ b_cat.T  # (..., n_p, q_out)
    return y.reshape(*lead, n * q_out) * scale


def make_variants(d_in: int, d_out: int, seed: int = 0) -> tuple[dict[str, Callable], dict[str, list]]:
    """Closures ``f(x) -> y`` for every variant, and the trainable tensors of each."""
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out).requires_grad_(False)
    W, b = base.weight, base.bias
    A = F.init_rules(N).requires_grad_(True)
    B = (torch.randn(N, d_out // N, R) * 0.02).requires_grad_(True)
    C = (torch.randn(N, R, d_in // N) * 0.02).requires_grad_(True)
    lora = {}
    for rank in (R, N * R):
        lora[rank] = (
            (torch.randn(rank, d_in) * 0.02).requires_grad_(True),
            (torch.randn(d_out, rank) * 0.02).requires_grad_(True),
        )

    def layer(mode: str, path: str) -> AloreLinear:
        cfg = AloreConfig(r=R, num_experts=N, alpha=SCALE * R, mode=mode, share_rules=False, compute_path=path)
        m = AloreLinear(base, "default", cfg)
        with torch.no_grad():  # same factors as the functional variants (sequential: square ones)
            m.alore_A["default"].copy_(A)
            if mode == "parallel":
                m.alore_B["default"].copy_(B)
                m.alore_C["default"].copy_(C)
        return m

    auto, seq = layer("parallel", "auto"), layer("sequential", "factored")

    def lora_fn(rank: int) -> Callable:
        a, bb = lora[rank]
        return lambda x: nn.functional.linear(x, W, b) + nn.functional.linear(nn.functional.linear(x, a), bb) * SCALE

    variants = {
        "base": lambda x: nn.functional.linear(x, W, b),
        "factored": lambda x: nn.functional.linear(x, W, b) + F.apply(x, A, B, C, SCALE),
        "factored_v0": lambda x: nn.functional.linear(x, W, b) + apply_v0(x, A, B, C, SCALE),
        "fold": lambda x: F.linear_with_delta(x, W, b, A, B, C, SCALE),
        "auto": auto,
        "seq": seq,
        "lora_nr": lora_fn(N * R),
        "lora_r": lora_fn(R),
    }
    params = {
        "base": [],
        "factored": [A, B, C],
        "factored_v0": [A, B, C],
        "fold": [A, B, C],
        "auto": list(auto.factors("default")),
        "seq": list(seq.factors("default")),
        "lora_nr": list(lora[N * R]),
        "lora_r": list(lora[R]),
    }
    return variants, params


def runners_for(
    variants: dict[str, Callable], names: list[str], tokens: int, d_in: int, d_out: int, train: bool,
    autocast: bool = False,
):
    """One runner per variant; ``autocast``: bfloat16 activations under CPU bfloat16 autocast (float32 weights)."""
    dtype = torch.bfloat16 if autocast else torch.float32
    x = torch.randn(1, tokens, d_in, dtype=dtype)  # (batch, tokens, features); the layers flatten the leading axes
    g = torch.randn(1, tokens, d_out, dtype=dtype)
    if train:
        x.requires_grad_(True)

    def run(f: Callable) -> Callable:
        if train:

            def step() -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    y = f(x)
                y.backward(g.to(y.dtype))
                x.grad = None

            return step

        def infer() -> None:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                f(x)

        return infer

    return {name: Runner(run(variants[name])) for name in names}


# Operators that launch a kernel (on a GPU) rather than only making a view.
KERNEL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::mul", "aten::add", "aten::add_", "aten::copy_",
              "aten::eye", "aten::sum", "aten::fill_", "aten::zero_", "aten::clone", "aten::cat"}


def count_ops(runner: Runner) -> dict:
    """ATen operators and kernel-launching operators in one call (forward, plus backward in ``train``).

    Where the arithmetic is small, as an adapter's is, a GPU pays per operator
    (launch and dispatch) rather than per multiply-add: this is that bill.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.fn()
    events = prof.key_averages()
    aten = sum(e.count for e in events if e.key.startswith("aten::"))
    kernels = sum(e.count for e in events if e.key in KERNEL_OPS)
    return {"aten_ops": aten, "kernel_ops": kernels}


def check_equal(variants: dict[str, Callable], d_in: int) -> float:
    """Largest difference between the parallel ALoRE variants' outputs (they compute the same function)."""
    x = torch.randn(2, 5, d_in)
    with torch.no_grad():
        outs = [variants[k](x) for k in ("factored", "factored_v0", "fold", "auto")]
    return max((o - outs[0]).abs().max().item() for o in outs[1:])


def crossover(tokens: list[int], fold_faster: list[bool]) -> Optional[int]:
    """The smallest token count from which fold stays faster, or None."""
    for i, t in enumerate(tokens):
        if all(fold_faster[i:]):
            return t
    return None


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=197 * 8, help="tokens per call (default 197 x 8)")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 10, quick 3)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-sweep", action="store_true", help="skip the token sweep of fold vs factored")
    p.add_argument("--quick", action="store_true", help="one small shape, few repetitions")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    reps = args.reps or (3 if args.quick else 10)
    shapes = [(64, 256)] if args.quick else SHAPES
    tokens = 197 * 2 if args.quick else args.tokens
    sweep_tokens = [8, 32, 128] if args.quick else [8, 32, 64, 128, 256, 512, 1024, 1576, 3152]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    names = ["base", "factored", "factored_v0", "fold", "auto", "seq", "lora_nr", "lora_r"]
    report = {
        "meta": {
            "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
            "device_name": device_name(torch.device("cpu")),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "loadavg_start": [round(v, 2) for v in os.getloadavg()],
            "tokens": tokens,
            "reps": reps,
            "n": N,
            "r": R,
        },
        "shapes": [],
    }
    for d_in, d_out in shapes:
        variants, _ = make_variants(d_in, d_out)
        entry = {"d_in": d_in, "d_out": d_out, "max_abs_diff_between_paths": check_equal(variants, d_in)}
        for regime in ("train", "infer"):
            train = regime == "train"
            runners = runners_for(variants, names, tokens, d_in, d_out, train)
            time_interleaved(runners, reps, 1, torch.device("cpu"))
            stats = {n: summary(r) | count_ops(r) for n, r in runners.items()}
            predicted = F.prefer_fold(tokens, d_in, d_out, N, R, needs_grad=train)
            entry[regime] = {
                "stats": stats,
                "flops": {
                    "factored": F.factored_flops(tokens, d_in, d_out, N, R, needs_grad=train),
                    "fold": F.fold_flops(tokens, d_in, d_out, N, R, needs_grad=train),
                },
                "prefer_fold": predicted,
                "fold_faster_wall": stats["fold"]["median_ms"] < stats["factored"]["median_ms"],
                "fold_faster_cpu": stats["fold"]["cpu_median_ms"] < stats["factored"]["cpu_median_ms"],
            }
            if train:
                # Operators only: what a mixed-precision GPU step runs (CPU bfloat16 timings would say nothing).
                amp = runners_for(variants, names, tokens, d_in, d_out, train=True, autocast=True)
                entry["train_autocast_ops"] = {n: count_ops(r) for n, r in amp.items()}
            log(
                f"{d_in}->{d_out} {regime}: "
                + ", ".join(f"{n} {s['median_ms']:.2f}/{s['cpu_median_ms']:.2f}" for n, s in stats.items())
                + f" ms (wall/cpu); prefer_fold={predicted}"
            )
        if not args.no_sweep:
            rows = []
            for t in sweep_tokens:
                # Small calls are quick: more repetitions where they cost little.
                sweep_reps = max(reps, min(100, reps * 1576 // t))
                runners = runners_for(variants, ["base", "factored", "fold", "lora_r"], t, d_in, d_out, train=False)
                time_interleaved(runners, sweep_reps, 1, torch.device("cpu"))
                s = {n: summary(r) for n, r in runners.items()}
                row = {"tokens": t, "reps": sweep_reps, "prefer_fold": F.prefer_fold(t, d_in, d_out, N, R, needs_grad=False)}
                for n in ("base", "factored", "fold", "lora_r"):
                    row[f"{n}_ms"] = s[n]["median_ms"]
                    row[f"{n}_cpu_ms"] = s[n]["cpu_median_ms"]
                rows.append(row)
            entry["sweep_infer"] = {
                "rows": rows,
                "crossover_predicted": crossover(sweep_tokens, [r["prefer_fold"] for r in rows]),
                "crossover_measured_wall": crossover(sweep_tokens, [r["fold_ms"] < r["factored_ms"] for r in rows]),
                "crossover_measured_cpu": crossover(
                    sweep_tokens, [r["fold_cpu_ms"] < r["factored_cpu_ms"] for r in rows]
                ),
            }
            log(f"{d_in}->{d_out} sweep: {entry['sweep_infer']}")
        report["shapes"].append(entry)
    report["meta"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]

    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "bench_layer.json").write_text(json.dumps(report, indent=1))
    md = markdown(report, names)
    (args.out_dir / "bench_layer.md").write_text(md)
    print(md)
    return report


def markdown(report: dict, names: list[str]) -> str:
    meta = report["meta"]
    lines = [
        "# bench_layer",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"- {meta['device_name']}, torch {meta['torch']}, {meta['threads']} threads, "
        f"OMP_WAIT_POLICY={meta['omp_wait_policy']}; load average at start {meta['loadavg_start']}, "
        f"at end {meta['loadavg_end']}.",
        f"- ALoRE n={meta['n']}, r={meta['r']}; {meta['tokens']} tokens per call; {meta['reps']} interleaved "
        "repetitions. Times in ms: wall-clock median [quartiles] / CPU-time median. ops: ATen operators per "
        "call (those that launch a kernel, not views, in brackets), from torch.profiler.",
        "",
    ]
    for e in report["shapes"]:
        lines += [f"## {e['d_in']} -> {e['d_out']}", ""]
        lines += [
            "| variant | train (fwd+bwd) | x base | ops | infer (no grad) | x base | ops | ops, train, bf16 autocast |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        tr, inf, amp = e["train"]["stats"], e["infer"]["stats"], e["train_autocast_ops"]
        for n in names:

            def cell(s: dict) -> str:
                return f"{s['median_ms']:.2f} [{s['q1_ms']:.2f}-{s['q3_ms']:.2f}] / {s['cpu_median_ms']:.2f}"

            def rel(stats: dict) -> str:
                return (
                    f"{stats[n]['median_ms'] / stats['base']['median_ms']:.2f} / "
                    f"{stats[n]['cpu_median_ms'] / stats['base']['cpu_median_ms']:.2f}"
                )

            def ops(s: dict) -> str:
                return f"{s['aten_ops']} ({s['kernel_ops']})"

            lines.append(
                f"| {n} | {cell(tr[n])} | {rel(tr)} | {ops(tr[n])} | {cell(inf[n])} | {rel(inf)} | {ops(inf[n])} "
                f"| {ops(amp[n])} |"
            )
        lines.append("")
        for regime in ("train", "infer"):
            r = e[regime]
            agree = r["prefer_fold"] == r["fold_faster_cpu"]
            lines.append(
                f"- {regime}: prefer_fold={r['prefer_fold']} (flops factored {r['flops']['factored']:,}, fold "
                f"{r['flops']['fold']:,}); measured fold faster: wall {r['fold_faster_wall']}, CPU "
                f"{r['fold_faster_cpu']} -> flop model {'agrees' if agree else 'DISAGREES'} (CPU time)."
            )
        if "sweep_infer" in e:
            sw = e["sweep_infer"]
            lines += [
                "",
                "Token sweep without gradients (ms, wall / CPU; the frozen layer alone, then each adapted variant):",
                "",
                "| tokens | reps | base | factored | fold | LoRA r | prefer_fold |",
                "|---:|---:|---:|---:|---:|---:|---|",
            ]
            for row in sw["rows"]:
                cells = " | ".join(
                    f"{row[f'{n}_ms']:.2f} / {row[f'{n}_cpu_ms']:.2f}" for n in ("base", "factored", "fold", "lora_r")
                )
                lines.append(f"| {row['tokens']} | {row['reps']} | {cells} | {row['prefer_fold']} |")
            lines += [
                "",
                f"Crossover (fold faster from here on): predicted {sw['crossover_predicted']}, measured "
                f"{sw['crossover_measured_wall']} (wall) / {sw['crossover_measured_cpu']} (CPU) tokens.",
            ]
        lines += ["", f"Paths agree to {e['max_abs_diff_between_paths']:.1e} (max abs difference).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
