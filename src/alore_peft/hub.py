"""The model card (``README.md``) of an ALoRE adapter folder, as the Hugging Face Hub shows it.

``PeftModel.save_pretrained`` (and so ``push_to_hub`` and the ``Trainer``)
writes PEFT's model card template, "[More Information Needed]" throughout.
For ALoRE adapters this package writes a real one instead (the hook is in
:mod:`alore_peft._registration`): what ALoRE is, how to load the adapter, its
configuration and size, and, when ``alore-train`` wrote it, the data, the
metrics and the training curve. Its YAML header carries the Hub metadata:
``library_name: peft``, ``base_model`` (when the base is a Hub model),
``pipeline_tag`` and tags including ``alore``.

A card someone wrote by hand (one this package did not write) keeps its text;
only its metadata gains the ``alore`` tag. Saving again into a folder whose
card came from ``alore-train`` keeps the card's training section.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["CARD_MARKER", "PAPER_URL", "card_text", "hub_base_model", "write_model_card"]

PAPER_URL = "https://arxiv.org/abs/2412.08341"
CARD_MARKER = "<!-- written by alore-peft -->"
_TRAINING_START = "<!-- alore-peft training -->"
_TRAINING_END = "<!-- /alore-peft training -->"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_base_model(name: Optional[str]) -> Optional[str]:
    """``name`` if it reads as a Hub id (``owner/name``, not an existing local folder), else ``None``."""
    if not name or not _HUB_ID.match(name) or os.path.exists(name):
        return None
    return name


def _alore_adapters(model: Any) -> dict[str, Any]:
    return {name: cfg for name, cfg in model.peft_config.items() if cfg.peft_type == "ALORE"}


def _counts(model: Any, adapter: str) -> dict[str, int]:
    """Parameters of one adapter: expert factors, rule matrices, ``modules_to_save`` copies."""
    counts = {"experts": 0, "rules": 0, "saved": 0, "layers": 0}
    for name, param in model.named_parameters():
        parts = name.split(".")
        if adapter not in parts:
            continue
        if "alore_rules" in parts or parts[-2:] == ["alore_A", adapter]:
            counts["rules"] += param.numel()
        elif parts[-2:] in (["alore_B", adapter], ["alore_C", adapter]):
            counts["experts"] += param.numel()
            counts["layers"] += parts[-2] == "alore_B"
        elif "modules_to_save" in parts:
            counts["saved"] += param.numel()
    return counts


def _targets(config: Any) -> str:
    targets = config.target_modules
    if targets is None:
        return "the paper's placement, traced from the base model"
    if isinstance(targets, str):
        return f"regex `{targets}`"
    return ", ".join(f"`{t}`" for t in sorted(targets))


def _base_section(base: Optional[str], num_labels: Optional[int]) -> tuple[str, str]:
    """``(how to load the base, extra note)`` for the card."""
    from .offline import backbones

    if backbones.is_portable_name(base):
        note = (
            f"The base model is an offline backbone, recorded as `{base}`: {backbones.describe(base)}. "
            "`AutoPeftModelForImageClassification` and the `alore` command prepare it from that name in "
            "`~/.cache/alore_peft` (or `$ALORE_PEFT_CACHE`); to rebuild it by hand:\n\n"
            f"```bash\n{backbones.rebuild_instructions(base)}\n```\n"
        )
        return "./base", note
    if base is None:
        return "path/to/base-model", "The adapter does not record its base model.\n"
    return base, ""


def card_text(
    model: Any,
    repo_id: Optional[str] = None,
    training: Optional[str] = None,
    peft_tags: Sequence[str] = (),
) -> str:
    """The whole ``README.md`` of an adapter folder: YAML metadata, then the card.

    Args:
        model: The ``PeftModel`` holding one or more ALoRE adapters.
        repo_id: Where the adapter lives (Hub id or folder), for the loading snippet.
        training: The training section (markdown), written by ``alore-train``.
        peft_tags: Tags already in the card (PEFT's), kept unless they name a non-Hub base.
    """
    import peft
    import torch
    import transformers
    from huggingface_hub import ModelCardData

    from . import __version__

    adapters = _alore_adapters(model)
    first = next(iter(adapters.values()))
    base = first.base_model_name_or_path
    base_hub = hub_base_model(base)
    base_model = model.get_base_model()
    is_classifier = type(base_model).__name__.endswith("ForImageClassification")
    num_labels = getattr(getattr(base_model, "config", None), "num_labels", None) if is_classifier else None
    tags = {t for t in peft_tags if not t.startswith("base_model:")} | {"alore", "peft"}
    if base_hub:
        tags.add(f"base_model:adapter:{base_hub}")
    if is_classifier:
        tags |= {"image-classification", "vision"}
    data = ModelCardData(
        library_name="peft",
        base_model=base_hub,
        pipeline_tag="image-classification" if is_classifier else None,
        tags=sorted(tags),
    )

    where = repo_id or "path/to/this/adapter"
    base_load, base_note = _base_section(base, num_labels)
    auto = "AutoPeftModelForImageClassification" if is_classifier else None
    head = f", num_labels={num_labels}" if num_labels else ""
    model_class = "AutoModelForImageClassification" if is_classifier else "AutoModel"
    lines = [
        CARD_MARKER,
        f"# ALoRE adapter{f' for {base}' if base else ''}",
        "",
        f"An adapter trained with [ALoRE]({PAPER_URL}) (Aggregating Low Rank Experts, Du et al., arXiv 2412.08341), "
        "a parameter-efficient fine-tuning method for vision backbones. Each adapted layer's update is a sum of `n` "
        "low-rank experts in Kronecker form, `dW = s * sum_i A_i (x) (B_i @ C_i)`, with small `n x n` rule matrices "
        "`A_i` shared by all layers and rank-`r` expert factors `B_i @ C_i`; the update is linear, so it folds into "
        "the frozen weights after training (`merge_and_unload()`): no extra inference cost. It is implemented as a "
        "Hugging Face PEFT method by [alore-peft](https://pypi.org/project/alore-peft/).",
        "",
        "## How to load it",
        "",
        "```bash",
        "pip install alore-peft",
        "```",
        "",
        "```python",
        "import alore_peft  # registers ALoRE with PEFT; without it PEFT fails with KeyError: 'ALORE'",
    ]
    if auto:
        lines += [
            "from alore_peft import AutoPeftModelForImageClassification",
            "",
            f'model = AutoPeftModelForImageClassification.from_pretrained("{where}")  # base model + adapter',
            "",
            "# or, step by step:",
        ]
    lines += [
        "from peft import PeftModel",
        f"from transformers import {model_class}",
        "",
        f'base = {model_class}.from_pretrained("{base_load}"{head})',
        f'model = PeftModel.from_pretrained(base, "{where}")',
        "merged = model.merge_and_unload()  # a plain transformers model, as fast as the base",
        "```",
        "",
    ]
    if base_note:
        lines += [base_note]
    lines += [
        "## Configuration",
        "",
        "| adapter | r | num_experts (n) | alpha | scale s = alpha / r | mode | shared rules | targets | adapted "
        "layers | trainable parameters |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, cfg in adapters.items():
        c = _counts(model, name)
        total = c["experts"] + c["rules"] + c["saved"]
        saved = f" + {c['saved']:,} in `modules_to_save`" if c["saved"] else ""
        lines.append(
            f"| `{name}` | {cfg.r} | {cfg.num_experts} | {cfg.alpha:g} | {cfg.alpha / cfg.r:g} | {cfg.mode} | "
            f"{'yes' if cfg.share_rules else 'no'} | {_targets(cfg)} | {c['layers']} | {total:,} "
            f"({c['experts']:,} expert factors + {c['rules']:,} rules{saved}) |"
        )
    modules = sorted({m for cfg in adapters.values() for m in (cfg.modules_to_save or [])})
    if modules:
        lines += ["", f"Trained in full and saved with the adapter: {', '.join(f'`{m}`' for m in modules)}."]
    lines.append("")
    if training:
        lines += [_TRAINING_START, training.strip(), _TRAINING_END, ""]
    lines += [
        "## Framework versions",
        "",
        f"- alore-peft {__version__}",
        f"- PEFT {peft.__version__}",
        f"- Transformers {transformers.__version__}",
        f"- PyTorch {torch.__version__}",
        "",
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)


def _existing(path: Path) -> tuple[Optional[str], Sequence[str], Optional[str]]:
    """``(text, tags, training section)`` of an existing card, or ``(None, (), None)``."""
    if not path.is_file():
        return None, (), None
    from huggingface_hub import ModelCard

    card = ModelCard.load(path)
    text = card.content
    tags = list(card.data.tags or [])
    training = None
    if _TRAINING_START in text and _TRAINING_END in text:
        training = text.split(_TRAINING_START, 1)[1].split(_TRAINING_END, 1)[0]
    return text, tags, training


def write_model_card(
    folder: str | os.PathLike, model: Any, training: Optional[str] = None, repo_id: Optional[str] = None
) -> Path:
    """Write (or update) ``folder/README.md`` for the ALoRE adapters of ``model``.

    Args:
        folder: The adapter folder.
        model: The ``PeftModel``.
        training: A training section (markdown); ``None`` keeps the one an
            earlier card by this package had.
        repo_id: Hub id or folder named in the loading snippet.

    Returns:
        The README path. A card written by hand (not by this package, not
        PEFT's empty template) keeps its text; only the ``alore`` tag is added
        to its metadata.
    """
    from huggingface_hub import ModelCard

    path = Path(folder) / "README.md"
    text, tags, old_training = _existing(path)
    handwritten = text is not None and CARD_MARKER not in text and "[More Information Needed]" not in text
    if handwritten:
        card = ModelCard.load(path)
        card.data.tags = sorted(set(tags) | {"alore"})
        card.save(path)
        return path
    content = card_text(model, repo_id=repo_id, training=training or old_training, peft_tags=tags)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content, encoding="utf-8")
    return path
