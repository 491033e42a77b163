"""``alore merge ADAPTER_DIR --out DIR``: fold the adapter into its base, check it, save a plain model."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ..adapter_files import CliError, load_peft, read_adapter, resolve_base
from ._common import output_tensor, positive_int, probe_batch, processor_size

HELP = "fold the adapter into the base and save a plain model"
DESCRIPTION = (
    "Merge the adapter into a copy of its base in memory (W' = W (I + s dW) sequential, W + s dW parallel), check "
    "on a random probe batch that the merged model reproduces the adapter's outputs, and only then save it to --out "
    "with save_pretrained (safetensors), with the class names the adapter recorded. The base model's folder and "
    "the adapter's folder are never written to. On a mismatch nothing is written."
)


def add_arguments(p: argparse.ArgumentParser, base_help: str) -> None:
    p.add_argument("adapter_dir", help="adapter folder written by save_pretrained")
    p.add_argument("--base", help=base_help)
    p.add_argument("--out", required=True, help="folder for the merged model (must be new or empty)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --out folder (never the adapter's or the base model's folder, nor a folder holding "
        "either)",
    )
    p.add_argument(
        "--probe-size",
        type=positive_int,
        help="probe image size in pixels (default: the size of the base's image processor, else its config.image_size)",
    )
    p.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance of the check (default 1e-5)")
    p.add_argument(
        "--rtol", type=float, default=1e-4, help="tolerance relative to the largest output value (default 1e-4)"
    )


def _check_out(args: argparse.Namespace, base: str) -> Path:
    """Refuse an --out that is, or holds, the adapter's or the base model's folder (real paths compared)."""
    out = Path(args.out).expanduser()
    real_out = out.resolve()
    for what, folder in (("the adapter's folder", args.adapter_dir), ("the base model's folder", base)):
        real = Path(folder).expanduser().resolve()
        if real_out == real or real_out in real.parents:
            relation = "is" if real_out == real else "holds"
            raise CliError(
                f"--out {args.out!r} {relation} {what} {str(folder)!r}; writing the merged model there would "
                f"delete or mix with it. Choose a new folder for --out, e.g. {str(real.parent / (real.name + '-merged'))!r}."
            )
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise CliError(
            f"--out {args.out!r} exists and is not an empty folder; choose another folder or pass --overwrite."
        )
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    config, _ = read_adapter(args.adapter_dir)
    out = _check_out(args, resolve_base(args.adapter_dir, config, args.base))
    model, _, _, base = load_peft(args.adapter_dir, args.base)
    probe = probe_batch(model, args.probe_size or processor_size(base))
    with torch.no_grad():
        expected = output_tensor(model(pixel_values=probe)).float()
        merged = model.merge_and_unload()
        merged.eval()
        got = output_tensor(merged(pixel_values=probe)).float()
    diff = float((got - expected).abs().max())
    limit = args.atol + args.rtol * float(expected.abs().max())
    if not torch.isfinite(got).all() or not diff <= limit:
        raise CliError(
            f"the merged model does not reproduce the adapter: on a probe batch its outputs differ by up to {diff:.3g} "
            f"(allowed {limit:.3g} = atol {args.atol:g} + rtol {args.rtol:g} x max|output|). Nothing was written. "
            "Check the adapter for very large updates, or raise --atol/--rtol if the difference is acceptable."
        )
    if out.exists() and args.overwrite:
        shutil.rmtree(out)
    merged.save_pretrained(out)
    for extra in ("preprocessor_config.json",):
        if (Path(base) / extra).is_file():
            shutil.copy(Path(base) / extra, out / extra)
    labels = getattr(merged.config, "id2label", None) or {}
    names = ", ".join(str(labels[i]) for i in sorted(labels)[:5]) + (" ..." if len(labels) > 5 else "")
    print(
        f"wrote the merged model to {out}: the base {base} (left unchanged) with the adapter {args.adapter_dir} folded "
        f"in; its outputs equal the adapter model's to {diff:.3g} (max abs, probe batch {tuple(probe.shape)}); "
        f"classes: {names or 'none recorded'}"
    )
    return 0
