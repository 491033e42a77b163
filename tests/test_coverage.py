"""The traced placement on every model type of transformers' image-classification mapping.

Each type is built small (:mod:`alore_peft.tiny_models`), its placement is
traced (:func:`alore_peft.placement.find_placement`), ALoRE is applied there
with a random (non-identity) adapter, and the merged model must compute what
the adapted one does. Types that are not adapted must fail for their
documented reason, so a change in transformers or in the tracer shows up here.

``python -m tests.test_coverage`` prints the coverage table of
docs/coverage.md; ``test_docs_coverage_table_is_current`` fails when the two
differ.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from alore_peft import AloreConfig
from alore_peft.layer import AloreLayer
from alore_peft.placement import PlacementError, example_inputs, find_placement
from alore_peft.tiny_models import TinyModelUnavailable, image_classification_types, tiny_model

from .test_presets import TINY as PRESET_MODELS
from .test_presets import _inputs as preset_inputs
from .tolerances import TOLERANCES

RTOL, ATOL = TOLERANCES[torch.float32]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "coverage.md"
TYPES = image_classification_types()
MIN_ADAPTED = 37  # of the types that build small and run on an image

# model_type -> (status, text its reason must contain). Every other type must be "adapted".
EXPECTED = {
    "dinat": ("not built", "natten"),
    "timm_wrapper": ("not built", "timm"),
    "imagegpt": ("no image input", "'input_ids'"),
    "shieldgemma2": ("no image input", "'input_ids'"),
    "bit": ("no placement", "weight standardisation"),
}
# Packages whose absence is the reason a type is not built: with the package, the type must build.
NEEDS_PACKAGE = {"dinat": "natten", "timm_wrapper": "timm"}


@dataclass
class Row:
    """What happened to one model type."""

    model_type: str
    status: str  # adapted | not built | no image input | no placement | failed
    reason: str = ""
    kinds: dict[str, int] = field(default_factory=dict)
    blocks: int = 0
    layers: int = 0
    ran: int = 0  # adapted modules called by the forward pass
    wrapped: int = 0  # adapted modules in the model
    effect: float = 0.0  # max |adapted - base| / max |base|
    merge_error: float = 0.0  # max |merged - adapted| / max |adapted|


def _output(out) -> torch.Tensor:
    """Every floating-point tensor the model returns, flattened into one (logits, boxes, masks, depth...)."""
    values = out.to_tuple() if hasattr(out, "to_tuple") else (out if isinstance(out, tuple) else (out,))
    tensors = [t.flatten() for t in values if isinstance(t, torch.Tensor) and t.is_floating_point()]
    assert tensors, f"no tensor output in {type(out).__name__}"
    return torch.cat(tensors)


def adapt_and_merge(model: nn.Module, targets, inputs: dict, row: Row) -> Row:
    """Apply a random ALoRE adapter at ``targets``, run it, merge it; record the numbers in ``row``."""
    with torch.no_grad():
        base = _output(model(**inputs))
    adapted = get_peft_model(copy.deepcopy(model), AloreConfig(target_modules=targets, init_weights=False))
    wrapped = {name: m for name, m in adapted.named_modules() if isinstance(m, AloreLayer)}
    ran: set[str] = set()
    hooks = [m.register_forward_hook(lambda *_, n=name: ran.add(n)) for name, m in wrapped.items()]
    with torch.no_grad():
        out = _output(adapted(**inputs))
    for h in hooks:
        h.remove()
    merged = adapted.merge_and_unload()
    assert not any(isinstance(m, AloreLayer) for m in merged.modules())
    with torch.no_grad():
        out_merged = _output(merged(**inputs))
    scale = out.abs().max().clamp_min(1e-30)
    row.wrapped, row.ran = len(wrapped), len(ran)
    row.effect = ((out - base).abs().max() / base.abs().max().clamp_min(1e-30)).item()
    row.merge_error = ((out_merged - out).abs().max() / scale).item()
    torch.testing.assert_close(out_merged / scale, out / scale, rtol=RTOL, atol=ATOL)
    return row


@functools.lru_cache(maxsize=None)
def survey(model_type: str) -> Row:
    """Build, trace, adapt and merge one type; the row says how far it got and why it stopped."""
    torch.manual_seed(0)
    try:
        model = tiny_model(model_type)
    except TinyModelUnavailable as exc:
        return Row(model_type, "not built", str(exc).split(": ", 1)[-1])
    try:
        placement = find_placement(model)
    except PlacementError as exc:
        return Row(model_type, "no image input", str(exc))
    if not placement.sites:
        # Why the blocks' layers were passed over (stems, heads and contractions are passed over everywhere).
        generic = ("reads the model input", "a projection with no activation", "not inside a repeated block")
        reasons = sorted({s.reason for s in placement.skipped if not s.reason.startswith(generic)})
        return Row(model_type, "no placement", "; ".join(reasons))
    row = Row(
        model_type,
        "adapted",
        kinds=placement.counts(),
        blocks=sum(s.placement == "block" for s in placement.sites),
        layers=sum(s.placement == "layer" for s in placement.sites),
    )
    try:
        return adapt_and_merge(model, placement.targets, example_inputs(model, batch_size=2, seed=1), row)
    except Exception as exc:  # recorded for the table; the test below fails on it
        row.status, row.reason = "failed", f"{type(exc).__name__}: {exc}"
        return row


def _expected(model_type: str) -> tuple[str, str]:
    if model_type in NEEDS_PACKAGE and importlib.util.find_spec(NEEDS_PACKAGE[model_type]) is not None:
        return "adapted", ""
    return EXPECTED.get(model_type, ("adapted", ""))


@pytest.mark.parametrize("model_type", TYPES)
def test_traced_placement_adapts_and_merges_exactly(model_type):
    row = survey(model_type)
    status, reason = _expected(model_type)
    assert row.status == status, row
    assert reason in row.reason, row
    if status == "adapted":
        assert row.ran == row.wrapped == row.blocks + row.layers > 0, row  # every adapter sits on the forward path
        assert row.effect > 1e-3, row  # the adapters change the output; the merge check is not vacuous


def test_coverage_reaches_the_target():
    rows = [survey(t) for t in TYPES]
    runs = [r for r in rows if r.status not in ("not built", "no image input")]
    adapted = [r for r in runs if r.status == "adapted"]
    assert len(adapted) >= MIN_ADAPTED, [(r.model_type, r.status, r.reason[:80]) for r in runs if r.status != "adapted"]


# -- the presets are the traced placement, written down ----------------------------------------


@pytest.mark.parametrize("key", sorted(PRESET_MODELS))
def test_presets_agree_with_the_traced_placement(key):
    from alore_peft.presets import default_targets

    torch.manual_seed(0)
    model = PRESET_MODELS[key][0]().eval()
    traced = find_placement(model, example_inputs=preset_inputs(model)).target_names
    config = AloreConfig(target_modules=default_targets(model.config.model_type, model))
    preset = [name for name, _ in model.named_modules() if name and check_target_module_exists(config, name)]
    assert sorted(traced) == sorted(preset)


# -- the docs table ---------------------------------------------------------------------------


def _kinds_text(kinds: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in kinds.items())


def coverage_table() -> str:
    rows = [survey(t) for t in TYPES]
    runs = [r for r in rows if r.status not in ("not built", "no image input")]
    adapted = sum(r.status == "adapted" for r in runs)
    lines = [
        f"{len(rows)} model types in transformers' image-classification mapping; {len(runs)} build small and run on "
        f"an image; {adapted} of them are adapted and merge exactly.",
        "",
        "| model_type | result | adapted inputs | block / layer | merged vs adapted | why not |",
        "|---|---|---|---|---:|---|",
    ]
    for r in rows:
        if r.status == "adapted":
            lines.append(
                f"| {r.model_type} | adapted | {_kinds_text(r.kinds)} | {r.blocks} / {r.layers} | "
                f"{r.merge_error:.0e} | |"
            )
        else:
            reason = r.reason.splitlines()[0] if r.reason else ""
            reason = re.sub(r"\s+", " ", reason)[:160].replace("|", "\\|")
            lines.append(f"| {r.model_type} | {r.status} | | | | {reason} |")
    return "\n".join(lines)


def test_docs_coverage_table_is_current():
    text = DOCS.read_text()
    match = re.search(r"<!-- coverage-table:begin -->\n(.*?)\n<!-- coverage-table:end -->", text, re.S)
    assert match, "docs/coverage.md has no coverage-table block"
    # The relative merge errors are measured, not fixed: compare everything but their digits.
    def strip(t: str) -> str:
        return re.sub(r"\d\.?\d*e[-+]\d+", "<err>", t)

    assert strip(match.group(1).strip()) == strip(coverage_table()), "regenerate with: python -m tests.test_coverage"


def test_docs_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert blocks
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOCS), "exec"), namespace)
    assert "pointwise" in capsys.readouterr().out  # the printed placement of the ResNet
    assert any(isinstance(m, AloreLayer) for m in namespace["model"].modules())


# -- the rules on toy models -----------------------------------------------------------------


class _MLP(nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2, self.inplace = nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8), inplace

    def forward(self, h):
        if self.inplace:
            h.add_(1.0)  # writes into the container's input: the adapted input would be shifted too
        return self.fc2(self.act(self.fc1(h)))


class _Block(nn.Module):
    """A pre-norm MLP block, with a constant table read by a layer, and optionally fc1's weight used elsewhere."""

    def __init__(self, inplace: bool = False, tied: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.mlp = _MLP(inplace)
        self.tied = tied
        self.table = nn.Parameter(torch.randn(4, 8))  # like a position-bias table
        self.bias_mlp = nn.Linear(8, 32)

    def forward(self, x):
        out = x + self.mlp(self.norm(x))
        if self.tied:
            out = out + nn.functional.linear(out, self.mlp.fc1.weight).mean(-1, keepdim=True)
        return out + torch.relu(self.bias_mlp(self.table)).mean()


class _Toy(nn.Module):
    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(**kwargs), _Block(**kwargs)])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _toy_placement(**kwargs):
    torch.manual_seed(0)
    model = _Toy(**kwargs).eval()
    return model, find_placement(model, example_inputs={"x": torch.randn(2, 5, 8)})


def test_rule_container_whose_input_feeds_only_the_expansion():
    model, placement = _toy_placement()
    assert [(s.target, s.kind, s.placement) for s in placement.sites] == [
        ("blocks.0.mlp", "mlp", "block"), ("blocks.1.mlp", "mlp", "block")
    ]
    assert placement.targets == r"blocks\.\d+\.mlp"
    reasons = {k.consumers[0]: k.reason for k in placement.skipped}
    assert reasons["blocks.0.bias_mlp"].startswith("does not depend on the image")  # a constant table
    assert reasons["head"].startswith("a projection with no activation")
    assert reasons["blocks.0.mlp.fc2"].startswith("a projection with no activation")
    row = adapt_and_merge(model, placement.targets, {"x": torch.randn(2, 5, 8)}, Row("toy", "adapted"))
    assert row.ran == row.wrapped == 2


def test_rule_in_place_write_on_the_input_rules_the_container_out():
    model, placement = _toy_placement(inplace=True)
    site = placement.sites[0]
    assert (site.target, site.placement) == ("blocks.0.mlp.fc1", "layer")
    assert "add_ reads it" in site.why
    adapt_and_merge(model, placement.targets, {"x": torch.randn(2, 5, 8)}, Row("toy", "adapted"))


def test_rule_a_weight_used_on_two_tensors_is_not_adapted():
    _, placement = _toy_placement(tied=True)
    assert not placement.sites
    assert any("also used by linear" in k.reason for k in placement.skipped), placement.table()


def test_no_example_input_is_a_clear_error():
    with pytest.raises(PlacementError, match="example_inputs="):
        find_placement(_Toy())


if __name__ == "__main__":  # python -m tests.test_coverage: rewrite the table in docs/coverage.md
    table = coverage_table()
    text = DOCS.read_text()
    block = "<!-- coverage-table:begin -->\n" + table + "\n<!-- coverage-table:end -->"
    DOCS.write_text(re.sub(r"<!-- coverage-table:begin -->\n.*?\n<!-- coverage-table:end -->", lambda _: block, text,
                           flags=re.S))
    print(table)


def test_the_model_explains_its_placement(capsys):
    from peft import get_peft_model

    from alore_peft import AloreConfig

    from .models import tiny_mlp, tiny_vit

    traced = get_peft_model(tiny_vit(), AloreConfig())  # no targets: traced
    traced.print_placement()
    text = capsys.readouterr().out
    for layer in (0, 1):
        for container in ("attention", "mlp"):
            assert f"vit.layers.{layer}.{container}" in text, text
    assert "block" in text and "q_proj" in text  # where each adapter sits and what it folds into
    named = get_peft_model(tiny_mlp(), AloreConfig(target_modules=["lin0"]))
    named.print_placement()
    assert "lin0 | layer | sequential | 16" in capsys.readouterr().out
