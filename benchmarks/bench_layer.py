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
A third measurement, ``host_cost``, is the host time each adapted layer adds
to a call where the arithmetic is negligible (5 tokens, width 64): what an
adapter costs to dispatch, forward alone and forward plus backward.

    python benchmarks/bench_layer.py                 # 197 x 8 tokens per call
    python benchmarks/bench_layer.py --quick         # small and fast (smoke test)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
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
HOST_WIDTH, HOST_TOKENS = 64, 5  # host_cost: arithmetic of a few microseconds per operator


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


def build(name: str, d: int, mlp: int, seed: int = 0, blocks: int = 1, compute_path: Optional[str] = None) -> nn.Module:
    """``HalfBlock`` (``blocks`` of them in a row) with variant ``name``'s adapter (the same random weights for every variant).

    ``compute_path`` overrides an ALoRE variant's (``AloreConfig.compute_path``).
    """
    from peft import get_peft_model

    import alore_peft  # noqa: F401  (registers ALoRE with PEFT)

    torch.manual_seed(seed)
    model = HalfBlock(d, mlp) if blocks == 1 else nn.Sequential(*(HalfBlock(d, mlp) for _ in range(blocks)))
    cfg = copy.deepcopy(configs()[name])
    if cfg is None:
        return model.requires_grad_(False)
    if compute_path is not None and name.startswith("alore"):
        cfg.compute_path = compute_path
    return get_peft_model(model, cfg)


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


def forward_call(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """A training-mode forward alone: the autograd graph is built and dropped, no backward."""
    model.train()

    def forward() -> None:
        model(x)

    return forward


def host_cost(reps: int, calls: int, names: list[str], d: int = 64, tokens: int = 5, chain: int = 5) -> dict:
    """Host time each adapted layer adds to a call, in microseconds: ``{variant: {"forward": ..., "train": ...}}``.

    With 5 tokens at width 64 an adapter's arithmetic is a few microseconds,
    so a call costs what its operators cost to issue: Python, the ATen
    dispatcher, autograd; what a GPU's host pays per layer at small batch.
    ALoRE runs its factored path, as at ViT-B's widths (at width 64 the fold
    gate would fold instead). Each variant's chain of ``chain`` half-blocks is
    timed with its adapters enabled and disabled in turn (the same model, so
    the same memory), ``calls`` calls per sample, ``reps`` samples, the order
    alternating; the median difference per block is what an adapted layer
    adds: its training forward alone (``forward``: the graph built, no
    backward) and forward plus backward (``train``), the once-per-forward work
    of ALoRE's shared rules spread over the chain.
    """
    x = torch.randn(1, tokens, d, requires_grad=True)
    cases = {}
    for name in names:
        if name == "base":
            continue
        model = build(name, d, 2 * d, blocks=chain, compute_path="factored")
        cases[name] = (model, {"forward": forward_call(model, x), "train": train_call(model, x)})
    diffs = {(n, regime): [] for n in cases for regime in ("forward", "train")}
    gc.collect()
    gc.disable()
    try:
        for rep in range(reps + 1):  # the first round warms up
            for name, (model, regimes) in cases.items():
                for regime, call in regimes.items():
                    seconds = {}
                    for enabled in (True, False) if rep % 2 else (False, True):
                        tuner = model.base_model
                        tuner.enable_adapter_layers() if enabled else tuner.disable_adapter_layers()
                        call()
                        start = time.perf_counter()
                        for _ in range(calls):
                            call()
                        seconds[enabled] = time.perf_counter() - start
                    model.base_model.enable_adapter_layers()
                    if rep:
                        diffs[(name, regime)].append((seconds[True] - seconds[False]) / calls / chain * 1e6)
    finally:
        gc.enable()
    return {n: {regime: statistics.median(diffs[(n, regime)]) for regime in ("forward", "train")} for n in cases}


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
    p.add_argument("--host-reps", type=int, default=None,
                   help="samples of the host-time measurement (5 tokens, width 64; default 21, quick 3)")
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
    # Host time: one thread, as the dispatch-bound proxy of bench_adapters.py runs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    host_reps = args.host_reps or (3 if args.quick else 21)
    report["host_us"] = host_cost(host_reps, 5 if args.quick else 50, names, d=HOST_WIDTH, tokens=HOST_TOKENS)
    report["meta"].update(host_reps=host_reps, host_width=HOST_WIDTH, host_tokens=HOST_TOKENS)
    torch.set_num_threads(threads)
    log("host us per layer (forward / train): " + ", ".join(
        f"{n} {h['forward']:.1f} / {h['train']:.1f}" for n, h in report["host_us"].items()))
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
    host = report.get("host_us")
    if host:
        lines += [
            f"Host time each adapted layer adds to a call (microseconds; {meta['host_tokens']} tokens, width "
            f"{meta['host_width']}, one thread, {meta['host_reps']} samples, adapters on minus off on the same "
            "model; `host_cost`): the training forward alone, then forward plus backward, beside the LoRA on the "
            "same layer.",
            "",
            "| variant | forward us | LoRA's | train us | LoRA's | train x LoRA |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for n, h in host.items():
            lora = host.get(LORA_OF.get(n, ""))
            ratio = f"{h['train'] / lora['train']:.2f}" if lora else "-"
            theirs = (f"{lora['forward']:.1f}", f"{lora['train']:.1f}") if lora else ("-", "-")
            lines.append(f"| {n} | {h['forward']:.1f} | {theirs[0]} | {h['train']:.1f} | {theirs[1]} | {ratio} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
