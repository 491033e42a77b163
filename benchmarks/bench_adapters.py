"""Training and inference cost of ALoRE against LoRA, LoKr, a frozen backbone and full fine-tuning.

Every method starts from the same randomly initialised ViT-B/16-shaped
``transformers.ViTForImageClassification`` (nothing is downloaded) and is
timed in one process, interleaved (A, B, C, A, B, C, ...; the order rotates
every repetition), so that load from other processes hits every method alike.
Reported: wall-clock medians, the interquartile range, the fastest run and
(on CPU) the median CPU time of the process; a ratio is the median over
repetitions of the per-repetition ratio.

Methods (trainable parameters in brackets for ViT-B/16, head excluded):

- ``zero_cost``: the frozen backbone with one trainable scalar gate on the
  patch embeddings, so the gradient still flows through every block. No
  adapter method can train faster than this.
- ``full``: full fine-tuning.
- ``lora``: PEFT LoRA, r=4 on q_proj and v_proj (147,456).
- ``lora_copy``: a second, identical LoRA model (its own copy of the backbone),
  timed like the others: its ratio to ``lora`` is the control, what the
  measurement reads for two methods that do the same work.
- ``lokr``: PEFT LoKr with its default r=8 / alpha=8 on q_proj and v_proj.
- ``alore_seq``: the ALoRE paper configuration, r=4, n=4, sequential; one
  adapter on each block's ``attention`` input and one on its ``mlp`` input
  (block placement, :mod:`alore_peft.block`) (147,520). ``--placement linear``
  uses the same budget on ``q_proj`` and ``fc1`` instead; ``auto`` (default)
  takes block placement when :mod:`alore_peft.block` exists. The output says
  which ran.
- ``alore_par``: ALoRE r=4, n=4, parallel on q_proj and v_proj (147,520).

The classifier head is trainable in every method (it is what a fine-tuning
run trains besides the adapter). Measurements:

- train step: forward, cross-entropy, backward, AdamW step, zero_grad;
- peak training memory: the model's weights, buffers and inputs plus the
  largest increase of allocated tensor memory during two training steps. CPU:
  the increase is the peak of the running sum of the allocation events of
  ``torch.profiler`` (``profile_memory=True``), which sees every tensor torch
  allocates and nothing else; CUDA: ``torch.cuda.max_memory_allocated``;
- unmerged inference (``torch.inference_mode``, eval mode) against the base model;
- merged inference: after ``merge_and_unload()``. The script asserts that the
  merged model holds no adapter layer and has exactly the base model's
  module types, and records how far its logits are from the unmerged model's;
- operators per train step (``benchmarks/opcount.py``): ATen operators and
  kernel-launching operators, and the adapter's share of them (the method's
  count minus the frozen backbone's, ``zero_cost``);
- ``--compile``: the same train step and unmerged inference under
  ``torch.compile`` (inductor) for the frozen backbone, LoRA and both ALoRE
  variants.

``--proxy`` is the dispatch-bound regime of a GPU, reproduced on a CPU:
ViT-B/16's width and 12 blocks at 32 px (5 tokens per image), batch 1, one
thread, so per-operator overhead dominates as it does for small kernels on a
GPU.

Examples::

    python benchmarks/bench_adapters.py --quick                    # smoke test: tiny ViT, under a minute
    python benchmarks/bench_adapters.py --batch-sizes 1 --reps 7   # ViT-B/16 on CPU
    python benchmarks/bench_adapters.py --proxy --reps 101         # the dispatch-bound regime (GPU proxy)
    python benchmarks/bench_adapters.py --device cuda --batch-sizes 8 64 --dtypes bfloat16 float32
    python benchmarks/bench_adapters.py --from-json a.json b.json --plot ratios.png   # re-render, no measuring

It writes ``<out-dir>/bench_adapters.json`` and ``<out-dir>/bench_adapters.md``
(and ``--plot PATH``: a PNG bar chart of the ratios, needs matplotlib).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

# Waiting OpenMP threads sleep instead of spinning: on a shared machine a spinning
# thread burns the core another job needs, and CPU time then counts waiting as work.
# Must be set before torch loads OpenMP; an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # opcount.py, beside this script

METHODS = ("zero_cost", "full", "lora", "lora_copy", "lokr", "alore_seq", "alore_par")
ADAPTERS = ("lora", "lokr", "alore_seq", "alore_par")
COMPILED = ("zero_cost", "lora", "alore_seq", "alore_par")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Targets from the issue, checked for both ALoRE variants on every measured shape.
TARGETS = {
    "train_vs_lora": 1.00,
    "train_vs_zero_cost": 1.10,
    "unmerged_vs_base": 1.05,
    "merged_vs_base": 1.00,
    "memory_vs_lora": 1.05,
}


# --------------------------------------------------------------------------- models
def vit_config(quick: bool, num_layers: Optional[int], image_size: Optional[int] = None):
    from transformers import ViTConfig

    if quick:
        # Tiny ViT: widths divisible by n = 4, 17 tokens per image.
        cfg = ViTConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            image_size=32,
            patch_size=8,
            num_labels=10,
        )
    else:
        cfg = ViTConfig()  # ViT-B/16: 12 blocks, width 768, MLP 3072, 224 px, 197 tokens
    if num_layers is not None:
        cfg.num_hidden_layers = num_layers
    if image_size is not None:
        cfg.image_size = image_size
    return cfg


def block_placement_available() -> bool:
    try:
        import alore_peft.block  # noqa: F401
    except ImportError:
        return False
    return True


def alore_seq_config(placement: str):
    """The paper configuration: (config, placement actually used, description)."""
    from alore_peft import AloreConfig

    if placement == "auto":
        placement = "block" if block_placement_available() else "linear"
    if placement == "block":
        targets, where = ["attention", "mlp"], "block: attention and mlp container inputs"
    else:
        targets, where = ["q_proj", "fc1"], "linear stand-in: q_proj and fc1 inputs"
    return AloreConfig(r=4, num_experts=4, alpha=4.0, mode="sequential", target_modules=targets), placement, where


class _Gate(nn.Module):
    """Multiplies the patch embeddings by one trainable scalar: gradient reaches every block, nothing else trains."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.ones(()))

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output * self.gate


def build_method(name: str, base: nn.Module, placement: str) -> tuple[nn.Module, str]:
    """A copy of ``base`` set up for ``name``; returns the model and a description of its placement."""
    import peft

    import alore_peft  # noqa: F401  (registers ALoRE with PEFT)
    from alore_peft import AloreConfig

    model = copy.deepcopy(base)
    where = ""
    if name == "full":
        model.requires_grad_(True)
        return model, "all weights"
    model.requires_grad_(False)
    if name == "zero_cost":
        gate = _Gate()
        model.add_module("zero_cost_gate", gate)
        model.vit.embeddings.patch_embeddings.register_forward_hook(gate.hook)
        where = "scalar gate on the patch embeddings"
    elif name in ("lora", "lora_copy"):
        cfg = peft.LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
        model, where = peft.get_peft_model(model, cfg), "q_proj, v_proj"
    elif name == "lokr":
        cfg = peft.LoKrConfig(target_modules=["q_proj", "v_proj"])  # PEFT's defaults: r=8, alpha=8
        model, where = peft.get_peft_model(model, cfg), "q_proj, v_proj"
    elif name == "alore_seq":
        cfg, _, where = alore_seq_config(placement)
        model = peft.get_peft_model(model, cfg)
    elif name == "alore_par":
        cfg = AloreConfig(r=4, num_experts=4, alpha=4.0, mode="parallel", target_modules=["q_proj", "v_proj"])
        model, where = peft.get_peft_model(model, cfg), "q_proj, v_proj (parallel)"
    else:
        raise ValueError(f"unknown method {name!r}; choose from {METHODS}")
    head = "base_model.model.classifier" if isinstance(model, peft.PeftModel) else "classifier"
    classifier = model.get_submodule(head)
    classifier.requires_grad_(True)
    return model, where


def adapter_params(model: nn.Module) -> int:
    """Trainable parameters outside the classifier head."""
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)


def merged_copy(model: nn.Module, base: nn.Module) -> nn.Module:
    """``merge_and_unload`` on a copy, checked to be the base architecture again."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from alore_peft import AloreLayer

    merged = copy.deepcopy(model).merge_and_unload()
    leftover = [n for n, m in merged.named_modules() if isinstance(m, (AloreLayer, BaseTunerLayer))]
    assert not leftover, f"merged model still holds adapter layers: {leftover[:3]}"
    types = sorted(type(m).__name__ for m in merged.modules())
    base_types = sorted(type(m).__name__ for m in base.modules())
    assert types == base_types, "merged model's module types differ from the base model's"
    return merged


# --------------------------------------------------------------------------- timing
@dataclass
class Runner:
    """One measured callable, the model behind it, and its samples."""

    fn: Callable[[], object]
    samples: list[float] = field(default_factory=list)  # wall-clock seconds
    cpu: list[float] = field(default_factory=list)  # CPU seconds of this process (all its threads)


def add_denormal_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keep-denormals", action="store_true",
        help="do not flush subnormal floats to zero on the CPU (default: flush them; see set_cpu_denormals)",
    )


def add_cpu_run_flags(parser: argparse.ArgumentParser, quick_help: str) -> None:
    """The flags the one-layer, convolution and mix-size benchmarks share (:func:`start_cpu_run` applies them)."""
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    add_denormal_flag(parser)


def start_cpu_run(args: argparse.Namespace) -> bool:
    """Apply ``--threads`` and ``--keep-denormals``; return whether subnormal floats are flushed."""
    torch.set_num_threads(args.threads)
    return set_cpu_denormals(args.keep_denormals)


def set_cpu_denormals(keep: bool) -> bool:
    """Flush subnormal floats to zero on the CPU unless ``keep``; return whether they are flushed.

    Randomly initialised backbones (every benchmark here) produce gradients
    small enough to be subnormal. An x86 CPU computes with a subnormal operand
    through a microcode assist, tens of times slower than a normal one, so a
    step's time depended on how many of its values happened to be subnormal:
    the same MobileNetV2 train step of sequential ALoRE took 200 ms or 490 ms,
    and its all-factored variant 2.8 s or 0.3 s, with and without flushing. A
    GPU computes subnormals at full speed, and a pretrained backbone's
    gradients are rarely that small, so flushing measures what the methods
    cost rather than where their values fall.
    """
    return bool(torch.set_flush_denormal(not keep)) and not keep


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    runners: dict[str, Runner], reps: int, warmup: int, device: torch.device, progress: Optional[Callable] = None
) -> None:
    """Time every runner ``reps`` times, interleaved, rotating the order each repetition.

    The garbage collector is paused while timing (as ``timeit`` does): one
    collection costs about a second after transformers is imported, and would
    land on whichever method happened to trigger it.
    """
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name].fn()
    gc.collect()
    gc.disable()
    try:
        for rep in range(reps):
            k = rep % len(names)
            for name in names[k:] + names[:k]:
                _sync(device)
                start, cpu_start = time.perf_counter(), time.process_time()
                runners[name].fn()
                _sync(device)
                runners[name].samples.append(time.perf_counter() - start)
                runners[name].cpu.append(time.process_time() - cpu_start)
            if progress is not None:
                progress(rep)
    finally:
        gc.enable()


def summary(runner: Runner) -> dict:
    """Wall-clock median, quartiles and minimum, and the CPU-time median, in milliseconds, plus the raw samples."""
    ms = sorted(s * 1e3 for s in runner.samples)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    cpu = [c * 1e3 for c in runner.cpu]
    return {
        "median_ms": statistics.median(ms),
        "q1_ms": q1,
        "q3_ms": q3,
        "min_ms": ms[0],
        "cpu_median_ms": statistics.median(cpu),
        "n": len(ms),
        "samples_ms": [s * 1e3 for s in runner.samples],
        "cpu_samples_ms": cpu,
    }


def make_train_step(
    model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, amp: Optional[torch.dtype]
) -> tuple[Callable, torch.optim.Optimizer]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    device_type = pixels.device.type

    def step() -> None:
        ctx = torch.autocast(device_type, dtype=amp) if amp is not None else contextlib.nullcontext()
        with ctx:
            logits = model(pixel_values=pixels).logits
        loss = nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, opt


def make_infer(model: nn.Module, pixels, amp: Optional[torch.dtype]) -> Callable:
    device_type = pixels.device.type

    def infer() -> torch.Tensor:
        ctx = torch.autocast(device_type, dtype=amp) if amp is not None else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            return model(pixel_values=pixels).logits

    return infer


# --------------------------------------------------------------------------- memory
def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def peak_step_memory(step: Callable, model: nn.Module, inputs: list[torch.Tensor], device: torch.device) -> dict:
    """Peak tensor memory of two training steps, in MiB.

    The first step also allocates the optimiser state, so two steps see the
    steady state (gradients and optimiser state alive while activations are).
    ``peak_mib`` counts what a process holding only this model would have
    allocated at the peak: its weights, buffers and inputs plus the largest
    increase during the steps (``increase_mib``). Other models living in the
    same process are not counted.
    """
    gc.collect()
    own = _tensor_bytes(list(model.parameters()) + list(model.buffers()) + inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        for _ in range(2):
            step()
        torch.cuda.synchronize(device)
        increase = torch.cuda.max_memory_allocated(device) - before
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for _ in range(2):
                step()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events = [e for e in events if e.device_type() == torch.autograd.DeviceType.CPU]
        events.sort(key=lambda e: e.start_ns())
        running = increase = 0
        for e in events:
            running += e.nbytes()
            increase = max(increase, running)
    return {"peak_mib": (own + increase) / 2**20, "increase_mib": increase / 2**20, "own_mib": own / 2**20}


# --------------------------------------------------------------------------- one shape
def run_shape(args, base: nn.Module, batch: int, dtype_name: str, device: torch.device, log) -> dict:
    cfg = base.config
    amp = None if dtype_name == "float32" else DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(batch)
    pixels = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=gen).to(device)
    labels = torch.randint(0, cfg.num_labels, (batch,), generator=gen).to(device)
    methods = list(args.methods)

    models, where, params = {}, {}, {}
    for name in methods:
        models[name], where[name] = build_method(name, base, args.placement)
        models[name].to(device)
        params[name] = adapter_params(models[name])
    log(f"  built {', '.join(methods)}")

    def progress(what: str, total: int) -> Callable[[int], None]:
        return lambda rep: log(f"  {what}: repetition {rep + 1}/{total} done")

    # Training: peak memory during the first two steps, then timing.
    train, memory = {}, {}
    for name in methods:
        models[name].train()
        step, _ = make_train_step(models[name], pixels, labels, amp)
        if not args.no_memory:
            memory[name] = peak_step_memory(step, models[name], [pixels, labels], device)
        train[name] = Runner(step)
    if memory:
        log("  peak memory: " + ", ".join(f"{n} {m['peak_mib']:.0f} MiB" for n, m in memory.items()))
    ops = {}
    if device.type == "cpu" and not args.no_ops:
        from opcount import count_ops

        ops = {name: count_ops(runner.fn) for name, runner in train.items()}
        for counted in ops.values():
            counted["kernels"] = dict(counted["kernels"])
        log("  ops per train step: " + ", ".join(f"{n} {o['aten_ops']} ({o['kernel_ops']})" for n, o in ops.items()))
    time_interleaved(train, args.reps, args.warmup, device, progress("train", args.reps))
    log("  train: " + ", ".join(f"{n} {summary(r)['median_ms']:.1f} ms" for n, r in train.items()))

    # Inference: the base model and every adapter unmerged and merged, interleaved.
    infer = {}
    base_dev = copy.deepcopy(base).to(device).eval()
    infer["base"] = Runner(make_infer(base_dev, pixels, amp))
    merge_check = {}
    for name in methods:
        if name not in ADAPTERS:
            continue
        model = models[name].eval()
        infer[f"{name}:unmerged"] = Runner(make_infer(model, pixels, amp))
        merged = merged_copy(model, base).to(device).eval()
        infer[f"{name}:merged"] = Runner(make_infer(merged, pixels, amp))
        out_u = infer[f"{name}:unmerged"].fn().float()
        out_m = infer[f"{name}:merged"].fn().float()
        merge_check[name] = (out_u - out_m).abs().max().item() / (out_u.abs().max().item() + 1e-12)
    time_interleaved(infer, args.infer_reps, args.warmup, device, progress("inference", args.infer_reps))
    log("  infer: " + ", ".join(f"{n} {summary(r)['median_ms']:.1f} ms" for n, r in infer.items()))

    compiled = run_compiled(args, models, pixels, labels, amp, device, log) if args.compile else {}
    result = {
        "device": device.type,
        "batch": batch,
        "dtype": dtype_name,
        "placement": {n: where[n] for n in methods},
        "adapter_params": params,
        "train": {n: summary(r) for n, r in train.items()},
        "infer": {n: summary(r) for n, r in infer.items()},
        "memory": memory,
        "merge_rel_err": merge_check,
        "compiled": compiled,
        "ops": ops,
    }
    result["ratios"] = ratios(result)
    del models, base_dev, infer, train
    gc.collect()
    return result


def run_compiled(args, models, pixels, labels, amp, device, log) -> dict:
    """Train step and unmerged inference under ``torch.compile`` (inductor), interleaved."""
    train, infer, compile_s = {}, {}, {}
    for name in [m for m in COMPILED if m in models]:
        model = models[name]
        start = time.perf_counter()
        compiled = torch.compile(model, mode=args.compile_mode)
        model.train()
        step, _ = make_train_step(compiled, pixels, labels, amp)
        step()  # compiles forward and backward
        model.eval()
        run_infer = make_infer(compiled, pixels, amp)
        run_infer()  # compiles the inference graph
        compile_s[name] = time.perf_counter() - start
        log(f"  compiled {name} in {compile_s[name]:.0f} s")

        def train_step(model=model, step=step):
            model.train()
            step()

        def infer_step(model=model, run_infer=run_infer):
            model.eval()
            run_infer()

        train[name], infer[name] = Runner(train_step), Runner(infer_step)
    time_interleaved(train, args.reps, args.warmup, device)
    time_interleaved(infer, args.infer_reps, args.warmup, device)
    log("  compiled train: " + ", ".join(f"{n} {summary(r)['median_ms']:.1f} ms" for n, r in train.items()))
    log("  compiled infer: " + ", ".join(f"{n} {summary(r)['median_ms']:.1f} ms" for n, r in infer.items()))
    return {
        "compile_s": compile_s,
        "mode": args.compile_mode,
        "train": {n: summary(r) for n, r in train.items()},
        "infer": {n: summary(r) for n, r in infer.items()},
    }


SAMPLES = {"median_ms": "samples_ms", "cpu_median_ms": "cpu_samples_ms"}


def _ratio(a: Optional[dict], b: Optional[dict], key: str) -> Optional[float]:
    """Timings: the median over repetitions of ``a / b`` within each repetition. Memory: ``a / b``.

    Pairing by repetition cancels load that drifts over minutes (both runs of
    a pair are seconds apart), which a ratio of two medians would not.
    """
    if not a or not b or not b[key]:
        return None
    if key in SAMPLES:
        pairs = [x / y for x, y in zip(a[SAMPLES[key]], b[SAMPLES[key]]) if y > 0]
        return statistics.median(pairs) if pairs else None
    return a[key] / b[key]


def ratios(result: dict) -> dict:
    """Ratios against the frozen backbone, LoRA and the base model (see :func:`_ratio`); ``*_cpu``: of CPU time."""
    tr, inf, mem = result["train"], result["infer"], result["memory"]
    # On a GPU the host's CPU time measures launching and waiting, not the work: wall-clock only.
    clocks = [("", "median_ms")] + ([("_cpu", "cpu_median_ms")] if result["device"] == "cpu" else [])
    out: dict[str, dict] = {}
    for name in tr:
        row = {}
        for suffix, key in clocks:
            row["train_vs_zero_cost" + suffix] = _ratio(tr[name], tr.get("zero_cost"), key)
            row["train_vs_lora" + suffix] = _ratio(tr[name], tr.get("lora"), key)
            row["unmerged_vs_base" + suffix] = _ratio(inf.get(f"{name}:unmerged"), inf.get("base"), key)
            row["merged_vs_base" + suffix] = _ratio(inf.get(f"{name}:merged"), inf.get("base"), key)
        row["memory_vs_lora"] = _ratio(mem.get(name), mem.get("lora"), "peak_mib")
        row["memory_increase_vs_lora"] = _ratio(mem.get(name), mem.get("lora"), "increase_mib")
        if result.get("compiled"):
            ctr, cinf = result["compiled"]["train"], result["compiled"]["infer"]
            for suffix, key in clocks:
                row["compiled_train_vs_zero_cost" + suffix] = _ratio(ctr.get(name), ctr.get("zero_cost"), key)
                row["compiled_train_vs_lora" + suffix] = _ratio(ctr.get(name), ctr.get("lora"), key)
                # The compiled frozen backbone in eval mode is the compiled base model.
                row["compiled_infer_vs_base" + suffix] = _ratio(cinf.get(name), cinf.get("zero_cost"), key)
        out[name] = row
    return out


# --------------------------------------------------------------------------- reports
def target_checks(result: dict) -> list[dict]:
    """Each issue target for both ALoRE variants: the wall-clock and CPU-time ratio, met or not.

    ``merged_vs_base`` is met by construction (``merged_copy`` asserts that the
    merged model has exactly the base model's modules); its measured ratio only
    shows the timing noise between two identical models.
    """
    rows = []
    for name in ("alore_seq", "alore_par"):
        r = result["ratios"].get(name)
        if not r:
            continue
        for key, limit in TARGETS.items():
            wall = r.get(key)
            if wall is None:
                continue
            cpu = r.get(key + "_cpu")
            rows.append({"method": name, "target": key, "limit": limit, "wall": wall, "cpu": cpu})
    return rows


def _fmt(x: Optional[float], spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _pair(r: dict, key: str) -> str:
    """``wall / cpu`` ratio pair (``wall`` alone where CPU time was not measured)."""
    if r.get(key) is None:
        return "-"
    cpu = r.get(key + "_cpu")
    return f"{r[key]:.2f}" + ("" if cpu is None else f" / {cpu:.2f}")


def _ms(s: Optional[dict]) -> str:
    if not s:
        return "-"
    return f"{s['median_ms']:.1f} [{s['q1_ms']:.1f}-{s['q3_ms']:.1f}]"


def _met(value: Optional[float], limit: float, target: str = "", quick: bool = False) -> str:
    if quick:
        return "n/a (smoke model)"
    if target == "merged_vs_base":
        return "yes (same modules as base, asserted)"
    return "-" if value is None else ("yes" if value <= limit + 1e-9 else "NO")


def markdown(report: dict) -> str:
    meta = report["meta"]
    quick = bool(meta.get("quick"))
    lines = [
        "# bench_adapters",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"- Device: {meta['device_name']}; torch {meta['torch']}, transformers {meta['transformers']}, "
        f"peft {meta['peft']}; torch threads {meta['threads']}, OMP_WAIT_POLICY={meta['omp_wait_policy']}"
        + ("; subnormal floats flushed to zero." if meta.get("flush_denormal") else "."),
        f"- Load average (1, 5, 15 min) at start {meta['loadavg_start']}, at end {meta['loadavg_end']}.",
        f"- Model: {meta['model']}.",
        f"- Repetitions: {meta['reps']} per method for training, {meta.get('infer_reps', meta['reps'])} for "
        f"inference, after {meta['warmup']} warm-up; interleaved, order rotated every repetition.",
        f"- ALoRE sequential placement: {meta['alore_placement']}.",
        f"- Peak memory: {meta['memory_method']}.",
        "",
    ]
    if meta.get("quick"):
        lines += [
            "> Smoke run (`--quick`): a tiny ViT, a small batch, few repetitions. The ratios and the verdicts "
            "below are not meaningful for a model this small; run without `--quick` to measure.",
            "",
        ]
    lines += [
        "Times: wall-clock medians in ms, interquartile range in brackets. A ratio is the median over "
        "repetitions of the ratio of the two runs in that repetition (seconds apart). "
        + (
            "Ratios read `wall / CPU`: from wall-clock time, then from this process's CPU time, which other "
            "jobs on a shared machine disturb far less."
            if meta["device"] == "cpu"
            else "Wall-clock only (the GPU is synchronised around every timed call)."
        ),
        "",
    ]
    for res in report["results"]:
        tr, inf, mem, rat = res["train"], res["infer"], res["memory"], res["ratios"]
        lines += [
            f"## batch {res['batch']}, {res['dtype']}",
            "",
            "| method | adapter params | train step ms | x zero-cost | x LoRA | peak train MiB | x LoRA "
            "| unmerged infer ms | x base | merged infer ms | x base |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| base model | 0 | - | - | - | - | - | {_ms(inf.get('base'))} | 1.00 | - | - |",
        ]
        for name in tr:
            m, r = mem.get(name), rat[name]
            lines.append(
                f"| {name} | {res['adapter_params'][name]:,} | {_ms(tr[name])} | {_pair(r, 'train_vs_zero_cost')} "
                f"| {_pair(r, 'train_vs_lora')} | {_fmt(m['peak_mib'] if m else None, '.0f')} "
                f"| {_fmt(r['memory_vs_lora'])} | {_ms(inf.get(f'{name}:unmerged'))} | {_pair(r, 'unmerged_vs_base')} "
                f"| {_ms(inf.get(f'{name}:merged'))} | {_pair(r, 'merged_vs_base')} |"
            )
        control = rat.get("lora_copy", {}).get("train_vs_lora")
        if control is not None:
            lines += [
                "",
                "Control: `lora_copy`, the same LoRA on its own copy of the backbone, reads "
                f"{_pair(rat['lora_copy'], 'train_vs_lora')} x LoRA; a train-step ratio no further from 1.00 than that "
                "is within this run's noise.",
            ]
        ops = res.get("ops") or {}
        if ops and "zero_cost" in ops:
            frozen = ops["zero_cost"]
            lines += [
                "",
                "Operators per train step (`benchmarks/opcount.py`): ATen operators, kernel-launching operators in "
                "brackets; the adapter's share is the count minus the frozen backbone's (`zero_cost`).",
                "",
                "| method | ATen ops (kernels) | adapter share | x LoRA's share |",
                "|---|---:|---:|---:|",
            ]
            lora = ops.get("lora")
            for name, o in ops.items():
                share = (o["aten_ops"] - frozen["aten_ops"], o["kernel_ops"] - frozen["kernel_ops"])
                ratio = "-"
                if lora is not None and name != "zero_cost":
                    lora_share = (lora["aten_ops"] - frozen["aten_ops"], lora["kernel_ops"] - frozen["kernel_ops"])
                    if lora_share[0] > 0 and lora_share[1] > 0:
                        ratio = f"{share[0] / lora_share[0]:.2f} ({share[1] / lora_share[1]:.2f})"
                lines.append(f"| {name} | {o['aten_ops']} ({o['kernel_ops']}) | {share[0]} ({share[1]}) | {ratio} |")
        if mem:
            lines += [
                "",
                "Peak training memory, increase over the model's weights and inputs (activations, gradients, "
                "optimiser state): "
                + ", ".join(
                    f"{n} {m['increase_mib']:.1f} MiB ({_fmt(rat[n]['memory_increase_vs_lora'])}x LoRA)"
                    for n, m in mem.items()
                )
                + ".",
            ]
        if res["compiled"]:
            c = res["compiled"]
            lines += [
                "",
                "Compiled (`torch.compile`, inductor; the compiled frozen backbone in eval mode is the base model):",
                "",
                "| method | compile s | train step ms | x zero-cost | x LoRA | infer ms | x base |",
                "|---|---:|---:|---:|---:|---:|---:|",
            ]
            for name in c["train"]:
                r = rat[name]
                lines.append(
                    f"| {name} | {c['compile_s'][name]:.0f} | {_ms(c['train'][name])} "
                    f"| {_pair(r, 'compiled_train_vs_zero_cost')} | {_pair(r, 'compiled_train_vs_lora')} "
                    f"| {_ms(c['infer'][name])} | {_pair(r, 'compiled_infer_vs_base')} |"
                )
        checks = target_checks(res)
        if checks:
            lines += [
                "",
                "Targets (memory: peak as defined above, no CPU-time variant):",
                "",
                "| ALoRE | target | limit | wall | met | CPU time | met |",
                "|---|---|---:|---:|---|---:|---|",
            ]
            for c in checks:
                lines.append(
                    f"| {c['method']} | {c['target']} | {c['limit']:.2f} | {c['wall']:.3f} "
                    f"| {_met(c['wall'], c['limit'], c['target'], quick)} | {_fmt(c['cpu'], '.3f')} "
                    f"| {_met(c['cpu'], c['limit'], c['target'], quick) if c['cpu'] is not None else '-'} |"
                )
        errs = ", ".join(f"{n} {e:.1e}" for n, e in res["merge_rel_err"].items())
        lines += ["", f"Merged vs unmerged logits, max difference relative to the largest logit: {errs}.", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Bar chart of the ratios (bars: wall-clock; black ticks: CPU time), one panel per measured shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    fig, axes = plt.subplots(len(results), 1, figsize=(9, 3.4 * len(results) + 0.6), squeeze=False)
    series = [
        ("train_vs_zero_cost", "train step / frozen backbone"),
        ("train_vs_lora", "train step / LoRA"),
        ("unmerged_vs_base", "unmerged inference / base"),
        ("merged_vs_base", "merged inference / base"),
        ("memory_vs_lora", "peak train memory / LoRA"),
    ]
    top = 2.0
    for ax, res in zip(axes[:, 0], results):
        names = [n for n in res["ratios"] if n != "zero_cost"]
        width = 0.84 / len(series)
        for k, (key, label) in enumerate(series):
            xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(names))]
            wall = [res["ratios"][n].get(key) for n in names]
            cpu = [res["ratios"][n].get(key + "_cpu") for n in names]
            ax.bar(xs, [min(v, top) if v else 0.0 for v in wall], width=width, label=label)
            ax.scatter(
                [x for x, v in zip(xs, cpu) if v],
                [min(v, top) for v in cpu if v],
                marker="_", s=60, color="black", zorder=3, label="CPU-time ratio" if k == 0 else None,
            )
            for x, v in zip(xs, wall):
                if v:
                    ax.text(x, min(v, top) + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=5.5, rotation=90)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylim(0.7, top + 0.25)
        label = f" ({res['label']})" if res.get("label") else ""
        ax.set_title(f"batch {res['batch']}, {res['dtype']}{label}", fontsize=9)
        ax.set_ylabel("ratio (bars above 2 are cut)", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncols=3, fontsize=7, frameon=False)
    blocks = sorted({res.get("label") or report["meta"]["model"].split(",")[1].strip() for res in results})
    fig.suptitle(
        f"ViT, width 768 ({', '.join(blocks)}); {report['meta']['device_name']}\n"
        "bars: ratio from wall-clock time, black ticks: from CPU time",
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------- main
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"CPU ({cpu}, {os.cpu_count()} cores visible)"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None,
                   help="float32 and/or bfloat16 (autocast). Default: float32 on CPU, both on CUDA")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default: 1 8 (quick: 2)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per method (default 7, quick 3)")
    p.add_argument("--infer-reps", type=int, default=None,
                   help="timed repetitions of inference (default: twice --reps; a forward pass is cheap)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions after the two memory steps")
    add_denormal_flag(p)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--placement", choices=["auto", "block", "linear"], default="auto",
                   help="alore_seq placement: block (attention/mlp inputs), linear (q_proj/fc1), auto: block if "
                        "alore_peft.block exists")
    p.add_argument("--num-layers", type=int, default=None, help="override the number of blocks (default 12)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (inductor)")
    p.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile mode with --compile (reduce-overhead: CUDA graphs, on a GPU)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak memory measurement")
    p.add_argument("--quick", action="store_true", help="tiny ViT, batch 2, 3 reps: a smoke test")
    p.add_argument("--image-size", type=int, default=None, help="override the image size (default 224)")
    p.add_argument("--no-ops", action="store_true", help="skip counting operators per train step (CPU)")
    p.add_argument("--proxy", action="store_true",
                   help="the dispatch-bound regime: ViT-B/16 width, 12 blocks, 32 px (5 tokens), batch 1, one thread, "
                        "LoRA (and its control copy) and both ALoRE variants")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--plot", type=Path, default=None, help="also write a PNG bar chart of the ratios here")
    p.add_argument("--from-json", type=Path, nargs="+", default=None, metavar="JSON",
                   help="measure nothing: rewrite the table (and --plot) from earlier bench_adapters.json files")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.proxy:
        args.image_size = args.image_size or 32
        args.batch_sizes = args.batch_sizes or [1]
        args.threads = 1
        if args.methods == list(METHODS):
            args.methods = ["zero_cost", "lora", "lora_copy", "alore_seq", "alore_par"]
        args.no_memory = True
    if args.dtypes is None:
        args.dtypes = ["bfloat16", "float32"] if cuda else ["float32"]
    if args.batch_sizes is None:
        args.batch_sizes = [2] if args.quick else [1, 8]
    if args.reps is None:
        args.reps = 2 if args.quick else 7
    if args.infer_reps is None:
        args.infer_reps = 2 * args.reps
    if "zero_cost" not in args.methods:
        args.methods.insert(0, "zero_cost")
    return args


def load_reports(paths: list[Path]) -> list[dict]:
    """Earlier ``bench_adapters.json`` files, their ratios recomputed from the stored samples."""
    reports = [json.loads(p.read_text()) for p in paths]
    for rep in reports:
        for res in rep["results"]:
            res.setdefault("device", "cpu" if rep["meta"]["device"] == "cpu" else "cuda")
            res["ratios"] = ratios(res)
            res["label"] = rep["meta"]["model"].split(",")[1].strip()  # e.g. "12 blocks", for the chart
    return reports


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    if args.from_json:
        # Re-render earlier runs (tables and one chart) without measuring anything.
        reports = load_reports(args.from_json)
        md = "\n".join(markdown(rep) for rep in reports)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "bench_adapters.md").write_text(md)
        if args.plot is not None:
            meta = dict(reports[0]["meta"], model="; ".join(sorted({r["meta"]["model"] for r in reports})))
            plot({"meta": meta, "results": [res for rep in reports for res in rep["results"]]}, args.plot)
        print(md)
        return {"reports": reports}
    device = torch.device(args.device)
    flush = False
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        flush = set_cpu_denormals(args.keep_denormals)
    import peft
    import transformers
    from transformers import ViTForImageClassification

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    torch.manual_seed(0)
    cfg = vit_config(args.quick, args.num_layers, args.image_size)
    base = ViTForImageClassification(cfg).eval()
    _, placement, where = alore_seq_config(args.placement)
    model_desc = (
        f"ViTForImageClassification, {cfg.num_hidden_layers} blocks, width {cfg.hidden_size}, "
        f"MLP {cfg.intermediate_size}, {cfg.image_size} px / patch {cfg.patch_size} "
        f"({(cfg.image_size // cfg.patch_size) ** 2 + 1} tokens), {cfg.num_labels} labels, random init"
    )
    meta = {
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "model": model_desc,
        "reps": args.reps,
        "infer_reps": args.infer_reps,
        "warmup": args.warmup,
        "alore_placement": where,
        "alore_placement_kind": placement,
        "quick": args.quick,
        "proxy": args.proxy,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "flush_denormal": flush,
        "memory_method": "skipped" if args.no_memory else (
            "the model's own weights, buffers and inputs plus the largest increase of allocated memory during "
            "two training steps, the increase from "
            + ("torch.cuda.max_memory_allocated after torch.cuda.reset_peak_memory_stats" if device.type == "cuda"
               else "torch.profiler(profile_memory=True): the peak of the running sum of every tensor allocation "
                    "and free")
        ),
    }
    log(f"{model_desc}; ALoRE placement: {where}")
    results = []
    start = time.perf_counter()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = {"meta": meta, "results": results}

    def write() -> str:
        # After every shape, so a run stopped by a time limit keeps what it measured.
        meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        meta["wall_s"] = time.perf_counter() - start
        (args.out_dir / "bench_adapters.json").write_text(json.dumps(report, indent=1))
        md = markdown(report)
        (args.out_dir / "bench_adapters.md").write_text(md)
        return md

    for dtype_name in args.dtypes:
        for batch in args.batch_sizes:
            log(f"batch {batch}, {dtype_name}")
            results.append(run_shape(args, base, batch, dtype_name, device, log))
            md = write()
    if args.plot is not None:
        try:
            plot(report, args.plot)
        except ImportError:
            log("matplotlib is not installed: no chart written (pip install matplotlib)")
    print(md)
    log(f"wrote {args.out_dir / 'bench_adapters.json'} and bench_adapters.md in {meta['wall_s']:.0f} s")
    return report


if __name__ == "__main__":
    main()
