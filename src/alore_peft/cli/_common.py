"""Helpers shared by the ``alore`` commands: tables, argument types, probe batches, images."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any, Optional, Sequence

from ..adapter_files import CliError

__all__ = [
    "IMAGE_SUFFIXES",
    "collect_images",
    "load_images",
    "markdown",
    "output_tensor",
    "parse_count",
    "plots_module",
    "positive_int",
    "probe_batch",
    "processor_size",
    "write_csv",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def markdown(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A markdown table of ``rows`` (dicts) with these ``columns``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_csv(path: Path, records: Sequence[dict]) -> None:
    """Write dict records as a CSV file with a header row."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def parse_count(text: str) -> int:
    """``150000``, ``150_000``, ``150k`` or ``1.5M`` as an int (an argparse type)."""
    raw = text.strip().replace("_", "").replace(",", "")
    factor = 1
    if raw[-1:].lower() in ("k", "m"):
        factor = 1_000 if raw[-1].lower() == "k" else 1_000_000
        raw = raw[:-1]
    try:
        value = float(raw) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a parameter count; write e.g. 150000, 150k or 1.5M"
        ) from None
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive whole number of parameters")
    return int(value)


def positive_int(text: str) -> int:
    """A positive integer (an argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def plots_module() -> Any:
    """:mod:`alore_peft.plots`, or a :class:`CliError` saying how to get matplotlib."""
    from .. import plots

    try:
        plots.require_matplotlib()
    except ImportError as exc:
        raise CliError(f"{exc} Or pass --no-plots to write only the tables.") from exc
    return plots


def processor_size(base: str) -> Optional[int]:
    """The square size the base's image processor produces, if it says so."""
    path = Path(base) / "preprocessor_config.json"
    if not path.is_file():
        return None
    try:
        processor = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    crop, size = processor.get("crop_size") or {}, processor.get("size") or {}
    if processor.get("do_center_crop") and isinstance(crop, dict) and crop.get("height"):
        return int(crop["height"])
    if isinstance(size, dict):
        return size.get("height") or size.get("shortest_edge")
    return None


def probe_batch(model: Any, size: Optional[int], batch: int = 2) -> Any:
    """A fixed random batch ``(batch, channels, size, size)``; ``size`` defaults to ``config.image_size``."""
    import torch

    config = model.config
    image_size = size or getattr(config, "image_size", None)
    if isinstance(image_size, (list, tuple)):
        image_size = image_size[0]
    if not image_size:
        raise CliError("the base config has no image_size; pass --probe-size with the input resolution in pixels.")
    channels = getattr(config, "num_channels", 3)
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, channels, image_size, image_size, generator=generator)


def output_tensor(output: Any) -> Any:
    """The main tensor of a model output: logits, else the last hidden state, else the first element."""
    for name in ("logits", "last_hidden_state", "pooler_output"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def collect_images(paths: Sequence[str], flag: str = "--images") -> list[Path]:
    """Image files named directly or found (sorted) in the named folders."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise CliError(f"{flag} {raw!r} is neither an image file nor a folder; pass existing image paths.")
    if paths and not found:
        raise CliError(f"{flag} {list(paths)} holds no image files ({', '.join(IMAGE_SUFFIXES)}).")
    return found


def load_images(paths: list[Path], base: str, model: Any, image_size: Optional[int]) -> Any:
    """``pixel_values`` of the images, ``(batch, 3, H, W)``: the base's image processor when it has one."""
    import numpy as np
    import torch

    try:
        from PIL import Image
    except ImportError as exc:
        raise CliError("--images needs Pillow to read image files; install it with: pip install pillow") from exc
    pictures = []
    for path in paths:
        try:
            pictures.append(Image.open(path).convert("RGB"))
        except OSError as exc:
            raise CliError(f"cannot read image {str(path)!r} ({exc}); pass image files Pillow can open.") from exc
    if (Path(base) / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(base, local_files_only=True)
        if image_size is not None:  # resize first, then the processor's rescale and normalisation only
            pictures = [p.resize((image_size, image_size), Image.BICUBIC) for p in pictures]
            pixel_values = processor(
                images=pictures, return_tensors="pt", do_resize=False, do_center_crop=False
            )["pixel_values"]
        else:
            pixel_values = processor(images=pictures, return_tensors="pt")["pixel_values"]
    else:
        size = image_size or getattr(model.config, "image_size", None)
        if not size:
            raise CliError("the base has no preprocessor_config.json and no config.image_size; pass --image-size.")
        # No processor: resize and map [0, 1] to [-1, 1] (mean = std = 0.5, the ViT default).
        arrays = [
            torch.from_numpy(np.asarray(p.resize((size, size), Image.BICUBIC), dtype=np.float32)) for p in pictures
        ]
        pixel_values = (torch.stack(arrays).permute(0, 3, 1, 2) / 255.0 - 0.5) / 0.5  # (batch, 3, size, size)
    return pixel_values
