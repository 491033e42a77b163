"""``alore inspect ADAPTER_DIR --out DIR``: per-expert contribution norms, ranks and image maps."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import experts as experts_api  # per-expert records and maps
from ..adapter_files import CliError, load_peft, training_images
from ._common import collect_images, load_images, markdown, plots_module, positive_int, write_csv

HELP = "per-expert contribution norms, ranks and image maps"
DESCRIPTION = (
    "Load the adapter onto its base and write experts.csv, layers.csv, rules.json and summary.md (per-layer norm "
    "and effective rank of dW, per-expert contribution norms, the rule matrices), a layers x experts heat map and "
    "each expert's contribution map over images: those given with --images, else the evaluation images alore-train "
    "kept next to the adapter (RUN/eval_images)."
)


def add_arguments(p: argparse.ArgumentParser, base_help: str) -> None:
    p.add_argument("adapter_dir", help="adapter folder written by save_pretrained")
    p.add_argument("--base", help=base_help)
    p.add_argument(
        "--images",
        nargs="+",
        metavar="IMAGE",
        help="image files or folders to map the experts on (default: the images alore-train kept, if any)",
    )
    p.add_argument("--out", required=True, help="folder for the tables and pictures (created if missing)")
    p.add_argument("--layers", nargs="+", metavar="NAME", help="map only these ALoRE layers (default: all)")
    p.add_argument("--per-layer", action="store_true", help="also write map and share pictures per layer")
    p.add_argument(
        "--image-size",
        type=positive_int,
        help="resize images to this square size before the base's image processor rescales and normalises them "
        "(default: the processor's own size; for alore-train's images, the size it trained at)",
    )
    p.add_argument("--format", choices=("png", "svg", "pdf"), default="png", help="picture format (default png)")
    p.add_argument("--no-plots", action="store_true", help="write the tables only (no matplotlib needed)")


def _summary(args: argparse.Namespace, base: str, experts: list[dict], layers: list[dict]) -> str:
    n = max(rec["expert"] for rec in experts) + 1
    norms = {(rec["layer"], rec["expert"]): rec["norm"] for rec in experts}
    table = []
    for rec in layers:
        row = {
            "layer": rec["layer"],
            "dW": f"{rec['d_out']}x{rec['d_in']}",
            "norm(dW)": f"{rec['delta_norm']:.4g}",
            "eff. rank": f"{rec['effective_rank']:.1f}",
            "num. rank": rec["numerical_rank"],
            "bound": rec["rank_bound"],
        }
        for i in range(n):
            value = norms.get((rec["layer"], i))
            row[f"E{i}"] = "" if value is None else f"{value:.3g}"
        table.append(row)
    return (
        f"# ALoRE adapter {args.adapter_dir}\n\nbase: {base}\n\n"
        "Per layer: Frobenius norm of s*dW, its effective rank (Roy & Vetterli entropy rank), numerical rank "
        "(singular values above max(d)*eps*sigma_max in float64), the bound min(d_out, d_in, n^2 r), and each "
        "expert's contribution norm s*||A_i||_F*||B_i C_i||_F.\n\n" + markdown(table, list(table[0])) + "\n"
    )


def _images(args: argparse.Namespace) -> tuple[list[Path], object]:
    """The images to map and the size to resize them to (``None``: the processor's)."""
    if args.images:
        return collect_images(args.images), args.image_size
    kept = training_images(args.adapter_dir)
    if kept is None:
        return [], args.image_size
    images, trained_size = kept
    print(f"no --images: mapping the {len(images)} evaluation images alore-train kept in {images[0].parent}")
    return images, args.image_size or trained_size


def _map_pictures(args, model, base: str, images: list[Path], image_size, plots, out: Path) -> list[str]:
    pixel_values = load_images(images, base, model, image_size)
    try:
        maps = experts_api.expert_maps(model, pixel_values, layers=args.layers)
    except ValueError as exc:
        raise CliError(f"cannot map the experts on the images: {exc}") from exc
    labels = [p.stem for p in images]
    combined = experts_api.combine_maps(maps)
    written = []
    for relative, stem, title in (
        (False, "expert_maps", "norm of each expert's output per patch, mean over {k} layer(s) (each scaled to mean 1)"),
        (True, "expert_shares", "each expert's share of the experts' total per patch, mean over {k} layer(s)"),
    ):
        name = f"{stem}.{args.format}"
        plots.plot_expert_maps(
            pixel_values, combined, out / name, titles=labels, relative=relative, title=title.format(k=len(maps))
        )
        written.append(name)
    if args.per_layer:
        for layer_name, layer_maps in maps.items():
            suffix = layer_name.replace(".", "_")
            for relative, stem in ((False, "expert_maps"), (True, "expert_shares")):
                name = f"{stem}_{suffix}.{args.format}"
                plots.plot_expert_maps(
                    pixel_values, layer_maps, out / name, titles=labels, relative=relative, title=layer_name
                )
                written.append(name)
    return written


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    images, image_size = _images(args)
    plots = None if args.no_plots else plots_module()  # fail before the slow loading if matplotlib is missing
    model, _, _, base = load_peft(args.adapter_dir, args.base)
    experts = experts_api.expert_records(model)
    layers = experts_api.layer_records(model)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "experts.csv", experts)
    write_csv(out / "layers.csv", layers)
    rules = {name: a.tolist() for name, a in experts_api.rule_matrices(model).items()}  # name -> (n, n, n) lists
    (out / "rules.json").write_text(json.dumps(rules, indent=1))
    summary = _summary(args, base, experts, layers)
    (out / "summary.md").write_text(summary)
    print(summary)
    written = ["experts.csv", "layers.csv", "rules.json", "summary.md"]
    if plots is not None:
        name = f"contributions.{args.format}"
        plots.plot_contribution_heatmap(
            experts, out / name, title=f"ALoRE expert contributions ({Path(args.adapter_dir).name})"
        )
        written.append(name)
        if images:
            written += _map_pictures(args, model, base, images, image_size, plots, out)
    print(f"wrote {', '.join(written)} to {out}")
    return 0
