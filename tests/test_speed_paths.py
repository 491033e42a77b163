"""Every compute path of an ALoRE layer gives the naive ``torch.kron`` result, values and gradients.

Paths: ``factored`` (``functional.apply``: ``dW`` never built), ``fold`` (``dW``
built once per call and added to the weight; parallel mode) and ``auto`` (the
layer picks one per call from the flop model). Checked on ``nn.Linear`` and
``nn.Conv2d`` in both modes and several dtypes, against a reference that
builds ``dW`` as ``sum_i kron(A[i], B[i] @ C[i])`` in float64. Also: the
layer compiles with ``torch.compile(fullgraph=True)`` (no graph break) and
matches eager mode.
"""

from __future__ import annotations

import importlib
import itertools
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import alore_peft.layer as L
from alore_peft import AloreConfig
from alore_peft import functional as F

from .tolerances import TOLERANCES

MODES = ["sequential", "parallel"]
# "fold" adds s dW to the target's weight per call: parallel mode only (the config refuses it otherwise).
PATHS = {"sequential": ["factored", "auto"], "parallel": ["factored", "fold", "auto"]}
CASES = [(kind, mode, path) for kind in ("linear", "conv") for mode in MODES for path in PATHS[mode]]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _layer(
    kind: str, mode: str, path: str, dtype: torch.dtype, seed: int = 0, wide: bool = False
) -> L.AloreLayer:
    """A small layer (apply's batched rule mixing) or, with ``wide``, a 256-wide one (its dense mixing matrix)."""
    torch.manual_seed(seed)
    if kind == "linear":
        base = nn.Linear(256, 256) if wide else nn.Linear(16, 24)
    else:
        base = nn.Conv2d(8, 12, kernel_size=3, padding=1, stride=1)
    cfg = AloreConfig(
        r=4 if wide else 2, num_experts=4, alpha=3.0, mode=mode, share_rules=False, init_weights=False,
        compute_path=path,
    )
    layer = (L.Linear if kind == "linear" else L.Conv2d)(base, "default", cfg, module_name="layer")
    return layer.to(dtype)


def _input(kind: str, dtype: torch.dtype, tokens: int = 5, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (2, tokens, 16) if kind == "linear" else (2, 8, 5, 4)
    return torch.randn(shape, generator=g).to(dtype).requires_grad_(True)


def _reference(layer: L.AloreLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer's output in float64 from ``sum_i kron(A[i], B[i] @ C[i])``, differentiable in the layer's tensors."""
    # contiguous(): torch.kron cannot take the column-major rules that init_rules returns (QR output).
    A, B, C = (t.double().contiguous() for t in layer.factors("default"))
    dW = F.reference_delta_weight(A, B, C, layer.scaling["default"])
    base = layer.get_base_layer()
    w, b = base.weight.double(), base.bias.double()
    xd = x.double()
    if isinstance(base, nn.Linear):
        if layer.mode["default"] == "sequential":
            return nn.functional.linear(xd + xd @ dW.T, w, b)
        return nn.functional.linear(xd, w, b) + xd @ dW.T
    conv = lambda inp, weight, bias: nn.functional.conv2d(inp, weight, bias, base.stride, base.padding)  # noqa: E731
    if layer.mode["default"] == "sequential":
        # dW mixes the input channels of every pixel.
        return conv(xd + torch.einsum("oi,bihw->bohw", dW, xd), w, b)
    return conv(xd, w, b) + conv(xd, dW.reshape(w.shape), None)


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol = TOLERANCES[dtype]
    # Absolute tolerance relative to the result's magnitude: outputs are sums of many products.
    scale = expected.abs().max().item() + 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale)


def _grads(out: torch.Tensor, g: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, tensors, g.to(out.dtype)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,mode,path", CASES)
def test_every_path_matches_kron_values_and_gradients(kind, mode, path, dtype):
    layer = _layer(kind, mode, path, dtype)
    x = _input(kind, dtype)
    A, B, C = layer.factors("default")
    tensors = [x, A, B, C, layer.get_base_layer().bias]
    out = layer(x)
    ref = _reference(layer, x)
    assert out.shape == ref.shape and out.dtype == dtype
    _close(out, ref, dtype)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for got, want in zip(_grads(out, g, tensors), _grads(ref, g, tensors)):
        assert got is not None and got.abs().sum() > 0
        _close(got, want, dtype)


@pytest.mark.parametrize("kind,mode", list(itertools.product(["linear", "conv"], MODES)))
def test_paths_agree_without_gradients(kind, mode):
    # Inference (no_grad) is where "auto" prefers folding; all paths must give one answer.
    outs = {}
    for path in PATHS[mode]:
        layer = _layer(kind, mode, path, torch.float64)
        x = _input(kind, torch.float64, tokens=64).detach()
        with torch.no_grad():
            outs[path] = layer(x)
        ref = _reference(layer, x)
        _close(outs[path], ref, torch.float64)
    for path in PATHS[mode]:
        torch.testing.assert_close(outs[path], outs["factored"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind,mode,path", CASES)
def test_float32_adapter_under_bfloat16_autocast_matches_kron(kind, mode, path):
    # The usual mixed-precision setup: float32 adapter, bfloat16 activations, autocast on.
    layer = _layer(kind, mode, path, torch.float32)
    x = _input(kind, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    _close(out, _reference(layer, x), torch.bfloat16)
    if kind == "linear":
        # The adapter skips casting x to float32 under autocast (the matmuls cast it back to bfloat16):
        # bit for bit what casting first gives.
        A, B, C = layer.factors("default")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            skipped = layer._adapter_out("default", x.detach())
            cast_first = F.apply(x.detach().float(), A, B, C, layer.scaling["default"])
        assert torch.equal(skipped, cast_first.to(torch.bfloat16))
    (grad_x,) = torch.autograd.grad(out.float().sum(), [x])
    assert grad_x.dtype == torch.bfloat16 and torch.isfinite(grad_x).all()


@pytest.mark.parametrize("tokens,grad", [(2, False), (4096, False), (2, True), (4096, True)])
def test_auto_path_follows_the_flop_model(tokens, grad):
    layer = _layer("linear", "parallel", "auto", torch.float32)
    x = torch.randn(1, tokens, 16)
    with torch.set_grad_enabled(grad):
        chosen = layer._use_fold("default", x)
    expected = F.prefer_fold(tokens, 16, 24, 4, 2, needs_grad=grad)
    assert chosen == expected


def test_auto_path_picks_both_sides_of_the_flop_model():
    # The flop model must be able to choose either path, or "auto" is a constant in disguise.
    assert F.prefer_fold(197 * 8, 768, 768, 4, 4, needs_grad=False)
    assert not F.prefer_fold(197 * 8, 768, 768, 4, 4, needs_grad=True)
    assert not F.prefer_fold(1, 768, 768, 4, 4, needs_grad=False)


# apply() mixes the rules with a dense matrix when n**3 * r <= (d_in + d_out) / 2 and with a batched
# matmul otherwise: the first and third cases take the dense branch, the others the batched one.
@pytest.mark.parametrize(
    "d_out,d_in,n,r,batch",
    [
        (256, 256, 4, 4, (3, 7)),
        (64, 16, 4, 2, (5,)),
        (24, 48, 2, 3, (2, 1, 4)),
        (32, 32, 8, 1, (6,)),
        (48, 48, 4, 4, (9,)),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_functional_apply_gradients_match_kron(d_out, d_in, n, r, batch, dtype):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(n, n, n, generator=g).to(dtype).requires_grad_(True)
    B = torch.randn(n, d_out // n, r, generator=g).to(dtype).requires_grad_(True)
    C = torch.randn(n, r, d_in // n, generator=g).to(dtype).requires_grad_(True)
    x = torch.randn(*batch, d_in, generator=g).to(dtype).requires_grad_(True)
    out = F.apply(x, A, B, C, 0.7)
    ref = x.double() @ F.reference_delta_weight(A.double(), B.double(), C.double(), 0.7).T
    assert out.shape == (*batch, d_out) and out.dtype == dtype
    _close(out, ref, dtype)
    upstream = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    for got, want in zip(_grads(out, upstream, [x, A, B, C]), _grads(ref, upstream, [x, A, B, C])):
        _close(got, want, dtype)


@pytest.mark.parametrize(
    "mode,path,wide",
    [
        ("sequential", "auto", False),
        ("parallel", "auto", False),
        ("parallel", "fold", False),
        ("sequential", "auto", True),
    ],
)
def test_compiled_layer_has_no_graph_break_and_matches_eager(mode, path, wide):
    # backend="aot_eager": dynamo must capture the whole layer (fullgraph=True) and AOT autograd
    # must trace its backward; it skips inductor's C++ code generation, which is too slow for CI.
    # With gradients "auto" runs the factored path; the no_grad call below makes it fold (parallel).
    torch._dynamo.reset()
    layer = _layer("linear", mode, path, torch.float32, wide=wide)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    d_in, d_out = layer.in_dim, layer.out_dim
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, d_in, generator=gen).requires_grad_(True)
    g = torch.randn(2, 5, d_out, generator=gen)
    A, B, C = layer.factors("default")
    tensors = [x, A, B, C]
    out_c = compiled(x)
    grads_c = _grads(out_c, g, tensors)
    out_e = layer(x)
    grads_e = _grads(out_e, g, tensors)
    _close(out_c, out_e, torch.float32)
    for got, want in zip(grads_c, grads_e):
        _close(got, want, torch.float32)
    many = torch.randn(2, 64, d_in, generator=gen)
    with torch.no_grad():
        if mode == "parallel":
            assert layer._use_fold("default", many)  # so the compiled no-grad call below runs the fold path
        _close(compiled(many), layer(many), torch.float32)


# -- the benchmark scripts' smoke tests (they must run and write well-formed output; timings are not checked)
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load_benchmark(name: str, monkeypatch):
    # The scripts default OMP_WAIT_POLICY at import; keep that out of this process's environment.
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module(name)


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_adapters_quick_writes_json_and_table(tmp_path, monkeypatch, keep_threads):
    bench = _load_benchmark("bench_adapters", monkeypatch)
    bench.main(["--quick", "--reps", "1", "--infer-reps", "1", "--warmup", "0", "--out-dir", str(tmp_path)])
    report = json.loads((tmp_path / "bench_adapters.json").read_text())
    table = (tmp_path / "bench_adapters.md").read_text()
    assert report["meta"]["alore_placement_kind"] in ("block", "linear")
    (result,) = report["results"]
    assert set(result["train"]) == set(bench.METHODS)
    assert {"base"} | {f"{m}:{k}" for m in bench.ADAPTERS for k in ("unmerged", "merged")} == set(result["infer"])
    for stats in list(result["train"].values()) + list(result["infer"].values()):
        assert stats["n"] == 1 and stats["median_ms"] > 0 and stats["cpu_median_ms"] >= 0
    for name, mem in result["memory"].items():
        assert mem["peak_mib"] >= mem["own_mib"] > 0, name
    assert result["memory"]["full"]["increase_mib"] > result["memory"]["lora"]["increase_mib"]
    # The same budget as LoRA r=4 on q, v, plus the shared 4 x 4 x 4 rules.
    assert result["adapter_params"]["alore_seq"] == result["adapter_params"]["alore_par"]
    assert result["adapter_params"]["alore_seq"] == result["adapter_params"]["lora"] + 4**3
    for name, err in result["merge_rel_err"].items():
        assert err < 1e-4, name  # the merged model computes what the unmerged one did
    for name in bench.METHODS:
        assert f"| {name} |" in table
        assert result["ratios"][name]["train_vs_zero_cost"] > 0
    assert "Targets" in table


def test_bench_layer_quick_writes_json_and_table(tmp_path, monkeypatch, keep_threads):
    bench = _load_benchmark("bench_layer", monkeypatch)
    bench.main(["--quick", "--reps", "1", "--no-sweep", "--out-dir", str(tmp_path)])
    report = json.loads((tmp_path / "bench_layer.json").read_text())
    (entry,) = report["shapes"]
    assert entry["max_abs_diff_between_paths"] < 1e-4
    for regime in ("train", "infer"):
        assert set(entry[regime]["stats"]) >= {"base", "factored", "fold", "auto", "lora_r"}
        assert isinstance(entry[regime]["prefer_fold"], bool)
    amp = entry["train_autocast_ops"]
    for name, stats in entry["train"]["stats"].items():
        # autocast adds casts of the float32 weights: never fewer operators than in float32
        assert amp[name]["kernel_ops"] >= stats["kernel_ops"] > 0, name
    assert "| factored |" in (tmp_path / "bench_layer.md").read_text()
