"""The ``alore`` command line: inspect, merge, size and describe ALoRE adapters.

    alore info ADAPTER_DIR
    alore inspect ADAPTER_DIR [--base BASE] [--images IMG ...] --out DIR
    alore merge ADAPTER_DIR [--base BASE] --out DIR
    alore budget (--base BASE | --model-type T) --budget N [--targets ...] [--mode ...]

BASE is a local Hugging Face model folder; it defaults to the adapter's
``base_model_name_or_path``. Nothing is downloaded. Every user error ends with
a one-paragraph message and exit status 2, as argparse does for bad arguments.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

__all__ = ["main", "build_parser", "CliError"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class CliError(Exception):
    """A user error: printed as ``alore CMD: error: MESSAGE`` with exit status 2."""


# -- reading an adapter folder --------------------------------------------------
def _read_adapter(adapter_dir: str) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """The adapter's config dict and ``{tensor name: shape}`` from its files alone."""
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise CliError(
            f"adapter directory {adapter_dir!r} does not exist. Pass the folder written by "
            "model.save_pretrained(...) (it holds adapter_config.json and adapter_model.safetensors)."
        )
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        raise CliError(
            f"{adapter_dir!r} has no {ADAPTER_CONFIG}, so it is not a PEFT adapter folder. Pass the folder written "
            "by model.save_pretrained(...)."
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CliError(f"{config_path} is not valid JSON ({exc}); save the adapter again.") from exc
    if config.get("peft_type") != "ALORE":
        raise CliError(
            f"{config_path} describes a {config.get('peft_type')!r} adapter, not an ALoRE one (peft_type 'ALORE'); "
            "this command only reads ALoRE adapters."
        )
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CliError(
            f"{adapter_dir!r} has no {ADAPTER_WEIGHTS}. Save the adapter with model.save_pretrained(...) (safetensors "
            "is the default)."
        )
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as exc:  # safetensors raises several types for damaged files
        raise CliError(f"{weights} cannot be read ({type(exc).__name__}: {exc}); save the adapter again.") from exc
    return config, shapes


def _natural_key(name: str) -> list:
    """Sort key that orders ``layer.2`` before ``layer.10``."""
    return [int(part) if part.isdigit() else part for part in name.split(".")]


def _adapter_layers(config: dict, shapes: dict[str, tuple[int, ...]]) -> list[dict]:
    """One record per adapted module, from the tensor shapes: ``B (n, q_out, r)``, ``C (n, r, q_in)``."""
    prefix = "base_model.model."
    layers = []
    for key, b_shape in shapes.items():
        if not key.endswith(".alore_B"):
            continue
        path = key[: -len(".alore_B")]
        c_shape = shapes.get(path + ".alore_C")
        if c_shape is None or len(b_shape) != 3 or len(c_shape) != 3:
            raise CliError(
                f"adapter tensor {key} has no matching {path}.alore_C of shape (n, r, d_in/n); the file is damaged."
            )
        n, q_out, r = b_shape
        own_rules = shapes.get(path + ".alore_A")
        d_out, d_in = n * q_out, n * c_shape[2]
        layers.append(
            {
                "module": path[len(prefix) :] if path.startswith(prefix) else path,
                "num_experts": n,
                "r": r,
                "d_out": d_out,
                "d_in": d_in,
                "params": n * q_out * r + n * r * c_shape[2] + (n**3 if own_rules else 0),
                "rank_bound": min(d_out, d_in, n * n * r),
            }
        )
    return sorted(layers, key=lambda layer: _natural_key(layer["module"]))


def _adapter_counts(shapes: dict[str, tuple[int, ...]], layers: list[dict]) -> dict[str, int]:
    def numel(shape: tuple[int, ...]) -> int:
        out = 1
        for s in shape:
            out *= s
        return out

    alore = {k: v for k, v in shapes.items() if k.rsplit(".", 1)[-1] in ("alore_A", "alore_B", "alore_C")}
    shared = {k: v for k, v in shapes.items() if ".alore_rules" in k}
    other = {k: v for k, v in shapes.items() if k not in alore and k not in shared}
    counts = {
        "alore_params": sum(numel(v) for v in alore.values()) + sum(numel(v) for v in shared.values()),
        "expert_params": sum(numel(v) for k, v in alore.items() if not k.endswith(".alore_A")),
        "rule_params": sum(numel(v) for k, v in alore.items() if k.endswith(".alore_A"))
        + sum(numel(v) for v in shared.values()),
        "modules_to_save_params": sum(numel(v) for v in other.values()),
        "layers": len(layers),
    }
    counts["total_params"] = counts["alore_params"] + counts["modules_to_save_params"]
    return counts


# -- loading a base model --------------------------------------------------------
def _base_path(args: argparse.Namespace, config: dict) -> str:
    base = args.base or config.get("base_model_name_or_path")
    if not base:
        raise CliError(
            f"no base model: {args.adapter_dir}/{ADAPTER_CONFIG} has no base_model_name_or_path. Pass --base with "
            "the local model folder the adapter was trained on."
        )
    folder = Path(base)
    if not (folder.is_dir() and (folder / "config.json").is_file()):
        source = "--base" if args.base else f"base_model_name_or_path in {ADAPTER_CONFIG}"
        raise CliError(
            f"base model {base!r} (from {source}) is not a local model folder with a config.json; this command never "
            "downloads. Pass --base with the folder the adapter was trained on (one written by save_pretrained)."
        )
    return base


def _load_base(base: str, config: dict, shapes: dict[str, tuple[int, ...]]) -> Any:
    """Load the base with the class the adapter was trained on, and check every adapted module's size."""
    import transformers

    kwargs: dict[str, Any] = {"local_files_only": True}
    class_name = (config.get("auto_mapping") or {}).get("base_model_class")
    model_cls = getattr(transformers, class_name, None) if class_name else None
    heads = [v for k, v in shapes.items() if k.endswith("classifier.weight") and len(v) == 2]
    if model_cls is None:
        model_cls = transformers.AutoModelForImageClassification if heads else transformers.AutoModel
    if heads:
        kwargs["num_labels"] = heads[0][0]  # the trained head replaces the base's one
    # transformers reports weights missing from the base (e.g. a new head) as a warning; the
    # adapter usually brings them, so report only the ones it does not.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model, info = model_cls.from_pretrained(base, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise CliError(
            f"cannot load base model {base!r} as {model_cls.__name__} ({type(exc).__name__}: {exc}). Pass --base "
            "with the model folder the adapter was trained on."
        ) from exc
    finally:
        transformers.logging.set_verbosity(verbosity)
    uncovered = sorted(k for k in info.get("missing_keys", ()) if f"base_model.model.{k}" not in shapes)
    if uncovered:
        print(
            f"note: {len(uncovered)} weight(s) of {model_cls.__name__} are neither in {base} nor in the adapter and "
            f"were initialised at random: {uncovered[:4]}{' ...' if len(uncovered) > 4 else ''}",
            file=sys.stderr,
        )
    _check_base_fits(base, model, config, shapes)
    return model


def _check_base_fits(base: str, model: Any, config: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    from torch import nn

    modules = dict(model.named_modules())
    mode = config.get("mode", "sequential")
    trained_on = config.get("base_model_name_or_path")
    hint = f" (the adapter records base_model_name_or_path={trained_on!r})" if trained_on else ""
    for layer in _adapter_layers(config, shapes):
        name = layer["module"]
        module = modules.get(name)
        if module is None:
            raise CliError(
                f"base model {base!r} has no module {name!r}, which the adapter adapts: it is another architecture "
                f"than the one the adapter was trained on{hint}. Pass --base with that model's folder."
            )
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            # Block placement: the adapter's width is that of the container's first linear/conv.
            module = next((m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
            if module is None:
                continue
        if isinstance(module, nn.Linear):
            d_in, d_out, taps = module.in_features, module.out_features, 1
        else:
            d_in, d_out = module.in_channels, module.out_channels
            taps = module.kernel_size[0] * module.kernel_size[1]
        want = (d_in, d_in) if mode == "sequential" else (d_out, d_in * taps)
        have = (layer["d_out"], layer["d_in"])
        if want != have:
            raise CliError(
                f"base model {base!r} does not fit the adapter: module {name!r} has {d_in} input and {d_out} output "
                f"features, but the adapter's {mode} update there is {have[0]} x {have[1]} (it needs "
                f"{want[0]} x {want[1]}). The base is a model of another width than the one the adapter was "
                f"trained on{hint}; pass --base with that model's folder."
            )


def _load_peft(args: argparse.Namespace) -> tuple[Any, dict, dict, str]:
    config, shapes = _read_adapter(args.adapter_dir)
    base = _base_path(args, config)
    model = _load_base(base, config, shapes)
    from peft import PeftModel

    import alore_peft  # noqa: F401  (registers ALoRE with PEFT)

    try:
        peft_model = PeftModel.from_pretrained(model, args.adapter_dir)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CliError(f"cannot load adapter {args.adapter_dir!r} onto base {base!r}: {exc}") from exc
    peft_model.eval()
    return peft_model, config, shapes, base


def _processor_size(base: str) -> Optional[int]:
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


def _probe_batch(model: Any, size: Optional[int], batch: int = 2) -> Any:
    """A fixed random batch at ``size`` px (default: the processor's size, else ``config.image_size``)."""
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


def _output_tensor(output: Any) -> Any:
    for name in ("logits", "last_hidden_state", "pooler_output"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


# -- commands ------------------------------------------------------------------
def _cmd_info(args: argparse.Namespace) -> int:
    config, shapes = _read_adapter(args.adapter_dir)
    layers = _adapter_layers(config, shapes)
    counts = _adapter_counts(shapes, layers)
    if args.json:
        print(json.dumps({"config": config, "counts": counts, "layers": layers}, indent=2))
        return 0
    keys = ("r", "num_experts", "alpha", "mode", "share_rules", "dropout", "rule_init", "compute_path")
    print(f"ALoRE adapter: {args.adapter_dir}")
    print(f"  base_model_name_or_path: {config.get('base_model_name_or_path')}")
    base_class = (config.get("auto_mapping") or {}).get("base_model_class")
    if base_class:
        print(f"  base model class: {base_class}")
    for key in keys:
        if key in config:
            print(f"  {key}: {config[key]}")
    if config.get("r"):
        print(f"  scale s = alpha / r: {config.get('alpha', 0) / config['r']:g}")
    print(f"  target_modules: {config.get('target_modules')}")
    print(f"  modules_to_save: {config.get('modules_to_save')}")
    print(
        f"parameters: {counts['alore_params']:,} ALoRE ({counts['expert_params']:,} expert factors + "
        f"{counts['rule_params']:,} rules) + {counts['modules_to_save_params']:,} in modules_to_save = "
        f"{counts['total_params']:,}"
    )
    print(f"adapted layers ({counts['layers']}):")
    print(_markdown(layers, ("module", "d_out", "d_in", "num_experts", "r", "params", "rank_bound")))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from . import experts as insp

    out = Path(args.out)
    images = _collect_images(args.images or [])
    if not args.no_plots:
        _plots_module()  # fail before the slow loading if matplotlib is missing
    model, config, _, base = _load_peft(args)
    experts = insp.expert_records(model)
    layers = insp.layer_records(model)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "experts.csv", experts)
    _write_csv(out / "layers.csv", layers)
    rules = {name: a.tolist() for name, a in insp.rule_matrices(model).items()}  # name -> (n, n, n) nested lists
    (out / "rules.json").write_text(json.dumps(rules, indent=1))
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
    summary = (
        f"# ALoRE adapter {args.adapter_dir}\n\nbase: {base}\n\n"
        "Per layer: Frobenius norm of s*dW, its effective rank (Roy & Vetterli entropy rank), numerical rank "
        "(singular values above max(d)*eps*sigma_max in float64), the bound min(d_out, d_in, n^2 r), and each "
        "expert's contribution norm s*||A_i||_F*||B_i C_i||_F.\n\n" + _markdown(table, list(table[0])) + "\n"
    )
    (out / "summary.md").write_text(summary)
    print(summary)
    written = ["experts.csv", "layers.csv", "rules.json", "summary.md"]
    if not args.no_plots:
        plots = _plots_module()
        name = f"contributions.{args.format}"
        plots.plot_contribution_heatmap(
            experts, out / name, title=f"ALoRE expert contributions ({Path(args.adapter_dir).name})"
        )
        written.append(name)
        if images:
            pixel_values = _load_images(images, base, model, args.image_size)
            try:
                maps = insp.expert_maps(model, pixel_values, layers=args.layers)
            except ValueError as exc:
                raise CliError(f"cannot map the experts on --images: {exc}") from exc
            labels = [p.stem for p in images]
            combined = insp.combine_maps(maps)
            name = f"expert_maps.{args.format}"
            plots.plot_expert_maps(
                pixel_values,
                combined,
                out / name,
                titles=labels,
                title=f"norm of each expert's output per patch, mean over {len(maps)} layer(s) (each scaled to mean 1)",
            )
            written.append(name)
            name = f"expert_shares.{args.format}"
            plots.plot_expert_maps(
                pixel_values,
                combined,
                out / name,
                titles=labels,
                relative=True,
                title=f"each expert's share of the experts' total per patch, mean over {len(maps)} layer(s)",
            )
            written.append(name)
            if args.per_layer:
                for layer_name, layer_maps in maps.items():
                    stem = layer_name.replace(".", "_")
                    name = f"expert_maps_{stem}.{args.format}"
                    plots.plot_expert_maps(pixel_values, layer_maps, out / name, titles=labels, title=layer_name)
                    written.append(name)
                    name = f"expert_shares_{stem}.{args.format}"
                    plots.plot_expert_maps(
                        pixel_values, layer_maps, out / name, titles=labels, relative=True, title=layer_name
                    )
                    written.append(name)
    print(f"wrote {', '.join(written)} to {out}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    import torch

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise CliError(
            f"--out {args.out!r} exists and is not an empty folder; choose another folder or pass --overwrite."
        )
    model, _, _, base = _load_peft(args)
    probe = _probe_batch(model, args.probe_size or _processor_size(base))
    with torch.no_grad():
        expected = _output_tensor(model(pixel_values=probe)).float()
        merged = model.merge_and_unload()
        merged.eval()
        got = _output_tensor(merged(pixel_values=probe)).float()
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
    print(
        f"merged {args.adapter_dir} into {base}: outputs equal the unmerged adapter to {diff:.3g} (max abs, probe "
        f"batch {tuple(probe.shape)}); wrote {out}"
    )
    return 0


def _cmd_budget(args: argparse.Namespace) -> int:
    from .budget import plan_budget

    config = None
    if args.base:
        folder = Path(args.base)
        if not (folder.is_dir() and (folder / "config.json").is_file()):
            raise CliError(f"--base {args.base!r} is not a local model folder with a config.json; pass such a folder.")
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(args.base, local_files_only=True)
    targets = args.targets
    if targets and len(targets) == 1 and any(ch in targets[0] for ch in "*()[]|\\^$+?"):
        targets = targets[0]  # one regex, matched against full module names as PEFT does
    try:
        rows = plan_budget(
            budget=args.budget,
            model_type=None if config is not None else args.model_type,
            config=config,
            target_modules=targets,
            mode=args.mode,
            share_rules=not args.no_share_rules,
            max_experts=args.max_experts,
            sort=args.sort,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    if not rows:
        raise CliError(
            f"nothing fits --budget {args.budget:,}: even r=1 needs more. Raise --budget or adapt fewer modules "
            "(--targets)."
        )
    records = [row.as_dict() for row in rows[: args.top]]
    if args.format == "json":
        print(json.dumps(records, indent=2))
        return 0
    if args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
        return 0
    top = rows[0]
    source = args.base or f"model_type={args.model_type!r} (transformers' default config)"
    targets = _targets_text(top.settings["target_modules"])
    print(
        f"{source}: {top.layers} {top.settings['mode']} ALoRE layers on {targets}; "
        f"{len(rows)} (r, num_experts) fit {args.budget:,} parameters (sorted by {args.sort}; modules_to_save not "
        "counted)."
    )
    table = [
        {
            "r": row.r,
            "num_experts": row.num_experts,
            "trainable": f"{row.trainable:,}",
            "of budget": f"{100 * row.budget_used:.1f}%",
            "rules": f"{row.rule_params:,}",
            "rank bound": str(row.min_rank) if row.min_rank == row.max_rank else f"{row.min_rank}-{row.max_rank}",
        }
        for row in rows[: args.top]
    ]
    print(_markdown(table, list(table[0])))
    print(
        f"\nFirst row as a config: AloreConfig(r={top.r}, num_experts={top.num_experts}, "
        f"mode={top.settings['mode']!r}, target_modules={targets})"
    )
    return 0


# -- helpers ---------------------------------------------------------------------
def _targets_text(targets: Any) -> str:
    return repr(targets) if isinstance(targets, str) else repr(sorted(targets))


def _plots_module() -> Any:
    from . import plots

    try:
        plots.require_matplotlib()
    except ImportError as exc:
        raise CliError(f"{exc} Or pass --no-plots to write only the tables.") from exc
    return plots


def _collect_images(paths: Sequence[str]) -> list[Path]:
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise CliError(f"--images {raw!r} is neither an image file nor a folder; pass existing image paths.")
    if paths and not found:
        raise CliError(f"--images {list(paths)} holds no image files ({', '.join(IMAGE_SUFFIXES)}).")
    return found


def _load_images(paths: list[Path], base: str, model: Any, image_size: Optional[int]) -> Any:
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
    if (Path(base) / "preprocessor_config.json").is_file() and image_size is None:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(base, local_files_only=True)
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


def _markdown(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _write_csv(path: Path, records: Sequence[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def _parse_count(text: str) -> int:
    """``150000``, ``150_000``, ``150k`` or ``1.5M`` as an int."""
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


# -- parser ----------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``alore`` argument parser (one subparser per command)."""
    parser = argparse.ArgumentParser(
        prog="alore",
        description="Inspect, merge, size and describe ALoRE (Aggregating Low Rank Experts) adapters.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_text: str, description: str):
        p = sub.add_parser(name, help=help_text, description=description)
        p.set_defaults(func=func, parser=p)
        return p

    base_help = (
        "local Hugging Face model folder of the base model (default: the adapter's base_model_name_or_path); "
        "nothing is downloaded"
    )

    p = add(
        "info",
        _cmd_info,
        "describe an adapter folder from its files alone",
        "Print an ALoRE adapter's config, parameter counts and adapted layers, read from adapter_config.json and "
        "adapter_model.safetensors only (no base model needed).",
    )
    p.add_argument("adapter_dir", help="adapter folder written by save_pretrained")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    p = add(
        "inspect",
        _cmd_inspect,
        "per-expert contribution norms, ranks and image maps",
        "Load the adapter onto its base and write experts.csv, layers.csv, rules.json and summary.md (per-layer "
        "norm and effective rank of dW, per-expert contribution norms, the rule matrices), a layers x experts heat "
        "map and, with --images, "
        "each expert's contribution map over every image.",
    )
    p.add_argument("adapter_dir", help="adapter folder written by save_pretrained")
    p.add_argument("--base", help=base_help)
    p.add_argument("--images", nargs="+", metavar="IMAGE", help="image files or folders to map the experts on")
    p.add_argument("--out", required=True, help="folder for the tables and pictures (created if missing)")
    p.add_argument(
        "--layers", nargs="+", metavar="NAME", help="with --images: map only these ALoRE layers (default: all)"
    )
    p.add_argument("--per-layer", action="store_true", help="also write map and share pictures per layer")
    p.add_argument(
        "--image-size",
        type=_positive_int,
        help="resize images to this square size instead of using the base's image processor",
    )
    p.add_argument("--format", choices=("png", "svg", "pdf"), default="png", help="picture format (default png)")
    p.add_argument("--no-plots", action="store_true", help="write the tables only (no matplotlib needed)")

    p = add(
        "merge",
        _cmd_merge,
        "fold the adapter into the base and save a plain model",
        "Merge the adapter into its base (W' = W (I + s dW) sequential, W + s dW parallel), check on a random "
        "probe batch that the merged model reproduces the adapter's outputs, and only then save it with "
        "save_pretrained (safetensors). On a mismatch nothing is written.",
    )
    p.add_argument("adapter_dir", help="adapter folder written by save_pretrained")
    p.add_argument("--base", help=base_help)
    p.add_argument("--out", required=True, help="folder for the merged model (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument(
        "--probe-size",
        type=_positive_int,
        help="probe image size in pixels (default: the size of the base's image processor, else its config.image_size)",
    )
    p.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance of the check (default 1e-5)")
    p.add_argument(
        "--rtol", type=float, default=1e-4, help="tolerance relative to the largest output value (default 1e-4)"
    )

    p = add(
        "budget",
        _cmd_budget,
        "list (r, num_experts) that fit a parameter budget",
        "List every (r, num_experts) whose ALoRE adapter fits a trainable-parameter budget, with exact counts "
        "(r * sum(d_out + d_in) + n^3 shared rules; modules_to_save not counted) and the rank dW can reach, "
        "min(d_out, d_in, n^2 r). Reads only the model's config: no weights are loaded.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--base", help="local model folder (only its config.json is read)")
    source.add_argument("--model-type", help="transformers model type with its default config, e.g. vit (ViT-B/16)")
    p.add_argument("--budget", type=_parse_count, required=True, help="trainable parameters, e.g. 150000, 150k, 1.5M")
    p.add_argument(
        "--targets",
        nargs="+",
        metavar="NAME",
        help="module names to adapt, matched as name suffixes (default: the model type's preset); a single value "
        "with regex characters is a regex on full module names",
    )
    p.add_argument("--mode", choices=("sequential", "parallel"), default="sequential", help="adapter placement")
    p.add_argument("--no-share-rules", action="store_true", help="one rule tensor per layer instead of one shared")
    p.add_argument("--max-experts", type=_positive_int, default=64, help="largest num_experts listed (default 64)")
    p.add_argument("--sort", choices=("params", "rank"), default="params", help="row order (default params)")
    p.add_argument("--top", type=_positive_int, default=15, help="rows shown (default 15)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``alore`` command line.

    Args:
        argv: Arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        0 on success. User errors exit with status 2 (``SystemExit``) after a
        one-line message on stderr, as argparse does.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except CliError as exc:
        args.parser.error(str(exc))
    return 2  # unreachable: parser.error exits


if __name__ == "__main__":
    sys.exit(main())
