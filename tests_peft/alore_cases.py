"""ALoRE's rows in PEFT's own tuner suite (``tests/test_custom_models.py`` of the installed peft release).

A pytest plugin, loaded with ``-p alore_cases`` by ``.ci/peft``. PEFT's test file is
used as released: once pytest has imported it, and before its tests are
parametrized, this plugin adds ALoRE rows to the case tables that LoKr is in
(the shared checks are crossed with them as with every other method). Then it
keeps only the ALoRE and LoKr tests and prints one summary line per method.
Nothing of PEFT's is copied here; if a table this plugin extends is missing or
changed shape, collection stops with an error that says which.

PEFT's tiny models fix the expert counts: ``num_experts`` must divide the
adapted dimensions, which are the input width in sequential mode (``W (I + s dW)``)
and both widths (times the kernel size) in parallel mode.

- ``MLP``: ``lin0`` 10 -> 20, ``lin1`` 20 -> 2: ``n = 2`` in both modes.
- ``Conv2d``: ``conv2d`` 5 -> 10 channels, 3x3: ``n = 5`` (sequential 5 x 5, parallel
  10 x 45). With ``lin0`` (10 -> 2) too, only sequential mode has a common ``n`` (5).
- ``Conv2d1x1``: ``conv2d`` 1 -> 10 channels: only ``n = 1`` divides one input channel.
"""

from __future__ import annotations

import functools
from collections import Counter

import pytest
from peft import LoKrConfig

import alore_peft  # noqa: F401  (registers ALoRE with PEFT)
from alore_peft import AloreConfig

TEST_MODULE = "test_custom_models.py"
METHODS = ("alore", "lokr")
SUMMARY = pytest.StashKey[list]()

MLP_N = {"num_experts": 2}
MODES = ("sequential", "parallel")


def _row(name: str, model_id: str, **kwargs) -> tuple:
    return (name, model_id, AloreConfig, kwargs)


def _mlp(mode: str) -> list[tuple]:
    """ALoRE's ``MLP`` rows in ``mode``, numbered as the LoKr rows they mirror."""
    kw = {**MLP_N, "mode": mode}
    own_rules_rank_1 = {"share_rules": False, "r": 1, "alpha": 1}  # in place of LoKr's decompose_both, r=1
    return [
        _row(f"Vanilla MLP 1 ALORE {mode}", "MLP", **kw, target_modules="lin0"),
        _row(f"Vanilla MLP 2 ALORE {mode}", "MLP", **kw, target_modules=["lin0"]),
        _row(f"Vanilla MLP 3 ALORE {mode}", "MLP", **kw, target_modules=["lin1"]),
        _row(f"Vanilla MLP 4 ALORE {mode}", "MLP", **kw, target_modules=["lin0", "lin1"]),
        _row(f"Vanilla MLP 5 ALORE {mode}", "MLP", **kw, target_modules=["lin0"], modules_to_save=["lin1"]),
        _row(f"Vanilla MLP 6 ALORE {mode}", "MLP", **kw, target_modules=["lin0"], alpha=8, dropout=0.1),
        _row(f"Vanilla MLP 7 ALORE {mode}", "MLP", **kw, target_modules="lin0", dropout=0.5),
        _row(f"Vanilla MLP 8 ALORE {mode}", "MLP", **kw, target_modules=["lin0", "lin1"], **own_rules_rank_1),
    ]


def _conv(mode: str) -> list[tuple]:
    kw = {"mode": mode}
    rows = [
        _row(f"Conv2d 1 ALORE {mode}", "Conv2d", **kw, num_experts=5, target_modules=["conv2d"]),
        _row(f"Conv2d 3 ALORE {mode}", "Conv2d", **kw, num_experts=5, target_modules=["conv2d"], share_rules=False),
        _row(f"Conv2d 1x1 ALORE {mode}", "Conv2d1x1", **kw, num_experts=1, target_modules=["conv2d"]),
    ]
    if mode == "sequential":  # with lin0 (10 -> 2), parallel mode would need n | 2 there and n | 5 on the conv
        conv_and_lin = _row(f"Conv2d 2 ALORE {mode}", "Conv2d", **kw, num_experts=5, target_modules=["conv2d", "lin0"])
        rows.insert(1, conv_and_lin)
    return rows


TEST_CASES = [row for mode in MODES for row in _mlp(mode) + _conv(mode)]


def _multi(mode1: str, mode2: str) -> list[tuple]:
    """Two adapters on ``MLP``: both on ``lin0`` ("Same"), or on ``lin0`` and ``lin1`` ("Different")."""
    name = f"ALoRE {mode1}" if mode1 == mode2 else f"ALoRE {mode1}+{mode2}"
    first = {**MLP_N, "mode": mode1, "init_weights": False, "target_modules": ["lin0"]}
    rows = []
    for label, target in (("Same", "lin0"), ("Different", "lin1")):
        second = {**MLP_N, "mode": mode2, "init_weights": False, "target_modules": [target]}
        rows.append((f"{name} {label}", "alore", AloreConfig, dict(first), second))
    return rows


# Mixed modes in both orders: merging one adapter, then the other, must not depend on which comes first.
MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [row for m1 in MODES for m2 in MODES for row in _multi(m1, m2)]


def _named_partial(name: str, **kwargs):
    """``AloreConfig`` with fixed keywords, shown as ``name`` in test ids (pytest uses ``__name__``)."""
    factory = functools.partial(AloreConfig, **kwargs)
    factory.__name__ = name
    return factory


# Inline parametrize lists that hold LoKr: test function -> (argument name, ALoRE values).
INLINE = {
    ("TestPeftCustomModel", "test_multiple_adapters_mixed_modules_to_save"): (
        "config_cls",
        [_named_partial(f"AloreConfig_{mode}", mode=mode, **MLP_N) for mode in MODES],
    ),
    ("TestPeftCustomModel", "test_multiple_adapters_mixed_modules_to_save_order_switched"): (
        "config_cls",
        [_named_partial(f"AloreConfig_{mode}", mode=mode, **MLP_N) for mode in MODES],
    ),
    ("TestPeftCustomModel", "test_adapter_name_makes_no_difference"): (
        "config0",
        [AloreConfig(target_modules=["lin0"], init_weights=False, mode=mode, **MLP_N) for mode in MODES],
    ),
}


class SuiteLayoutError(pytest.UsageError):
    """PEFT's test file no longer has the shape this plugin extends."""


def _layout_error(what: str) -> SuiteLayoutError:
    return SuiteLayoutError(
        f"PEFT's {TEST_MODULE} changed: {what}. The ALoRE rows could not be added; update "
        "tests_peft/alore_cases.py for this peft release (docs/peft-suite.md)."
    )


def _is_lokr(value) -> bool:
    if isinstance(value, functools.partial):
        value = value.func
    return value is LoKrConfig or isinstance(value, LoKrConfig)


def _insert_after_lokr(table: list, rows: list, name: str, width: int) -> None:
    """Put ``rows`` right after the last LoKr row of ``table`` (in place: pytest holds the list)."""
    if not isinstance(table, list) or not table:
        raise _layout_error(f"{name} is not a non-empty list")
    if any(not isinstance(row, tuple) or len(row) != width for row in table):
        raise _layout_error(f"the rows of {name} are no longer {width}-tuples")
    lokr = [i for i, row in enumerate(table) if _is_lokr(row[2])]
    if not lokr:
        raise _layout_error(f"{name} has no LoKr row")
    at = lokr[-1] + 1
    table[at:at] = rows


def _extend_inline(module, cls_name: str, func_name: str, argname: str, values: list) -> None:
    cls = getattr(module, cls_name, None)
    func = getattr(cls, func_name, None)
    marks = [
        m for m in getattr(func, "pytestmark", []) if m.name == "parametrize" and m.args and m.args[0] == argname
    ]
    if len(marks) != 1 or not isinstance(marks[0].args[1], list) or not any(map(_is_lokr, marks[0].args[1])):
        raise _layout_error(f"{cls_name}.{func_name} has no '{argname}' parametrize list holding LoKr")
    marks[0].args[1].extend(values)


def add_alore_rows(module) -> None:
    """Add the ALoRE rows to the imported ``test_custom_models`` module (once)."""
    if getattr(module, "_alore_rows_added", False):
        return
    for name in ("TEST_CASES", "MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES", "ALL_PEFT_CONFIG_CLASSES"):
        if not hasattr(module, name):
            raise _layout_error(f"it has no {name}")
    _insert_after_lokr(module.TEST_CASES, TEST_CASES, "TEST_CASES", 4)
    _insert_after_lokr(
        module.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES,
        MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES,
        "MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES",
        5,
    )
    # PEFT derives this one from TEST_CASES at import time: derive it again, in place.
    classes = module.ALL_PEFT_CONFIG_CLASSES
    classes[:] = sorted({row[2] for row in module.TEST_CASES}, key=lambda cls: cls.__name__)
    for (cls_name, func_name), (argname, values) in INLINE.items():
        _extend_inline(module, cls_name, func_name, argname, values)
    module._alore_rows_added = True


# -- pytest hooks -------------------------------------------------------------------


def pytest_addoption(parser):
    parser.addoption(
        "--peft-methods",
        default=",".join(METHODS),
        help="Comma-separated methods whose tests run (default: alore,lokr); 'all' keeps every test.",
    )


def pytest_configure(config):
    wanted = config.getoption("--peft-methods")
    unknown = set(wanted.split(",")) - set(METHODS) if wanted != "all" else set()
    if unknown:
        raise pytest.UsageError(
            f"--peft-methods={wanted!r}: unknown method(s) {sorted(unknown)}; use a comma-separated list of "
            f"{', '.join(METHODS)}, or 'all'."
        )


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector, name, obj):
    # The first member pytest looks at in the module: it is imported, nothing is parametrized yet.
    if isinstance(collector, pytest.Module) and collector.path.name == TEST_MODULE:
        add_alore_rows(collector.obj)


def _method_of(item) -> str | None:
    """``"alore"``, ``"lokr"`` or ``None``: the method whose configuration a test runs."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    for value in params.values():
        if isinstance(value, functools.partial):
            value = value.func
        if value is AloreConfig or isinstance(value, AloreConfig):
            return "alore"
        if _is_lokr(value):
            return "lokr"
    if "lokr" in item.originalname.lower():  # PEFT's own LoKr tests outside the tables
        return "lokr"
    return None


@pytest.hookimpl(tryfirst=True)  # before -k / -m: sees every ALoRE test
def pytest_collection_modifyitems(session, config, items):
    if not any(item.path.name == TEST_MODULE for item in items):
        return
    wanted = config.getoption("--peft-methods")
    keep, drop, found = [], [], set()
    for item in items:
        method = _method_of(item) or "other"
        found.add(method)
        item.user_properties.append(("peft_method", method))
        (keep if wanted == "all" or method in wanted.split(",") else drop).append(item)
    if "alore" not in found:
        raise _layout_error("no test was parametrized with an ALoRE row")
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # One outcome per test: a failed phase wins over a skip, a skip over a pass.
    rank = {"passed": 0, "skipped": 1, "xfailed": 1, "xpassed": 2, "failed": 3, "error": 3}
    outcome: dict[str, tuple[str, str]] = {}
    for key, reports in terminalreporter.stats.items():
        if key not in rank:
            continue
        for report in reports:
            method = dict(getattr(report, "user_properties", ())).get("peft_method")
            if method is None:
                continue
            status = "failed" if key == "error" else key
            if status == "passed" and report.when != "call":
                continue
            old = outcome.get(report.nodeid)
            if old is None or rank[status] > rank[old[1]]:
                outcome[report.nodeid] = (method, status)
    counts = Counter(outcome.values())
    lines = []
    for method in sorted({m for m, _ in outcome.values()}):
        parts = ", ".join(
            f"{counts[(method, s)]} {s}"
            for s in ("passed", "failed", "skipped", "xfailed", "xpassed")
            if counts[(method, s)]
        )
        lines.append(f"PEFT suite {method}: {parts}")
    config.stash[SUMMARY] = lines


def pytest_unconfigure(config):
    # After pytest's own summary, so these are the last lines of the log.
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    for line in config.stash.get(SUMMARY, []):
        reporter.write_line(line)
