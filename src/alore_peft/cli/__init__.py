"""The ``alore`` command line: inspect, merge, size and describe ALoRE adapters.

    alore info ADAPTER_DIR
    alore inspect ADAPTER_DIR [--base BASE] [--images IMG ...] --out DIR
    alore merge ADAPTER_DIR [--base BASE] --out DIR
    alore budget (--base BASE | --model-type T) --budget N [--targets ...] [--mode ...]

BASE is a local Hugging Face model folder; it defaults to the adapter's
``base_model_name_or_path``. Nothing is downloaded. Every user error ends with
a one-paragraph message and exit status 2, as argparse does for bad arguments.

One module per command (``cmd_info``, ``cmd_inspect``, ``cmd_merge``,
``cmd_budget``: its ``add_arguments`` and ``run``); reading adapter folders and
loading them onto their base is :mod:`alore_peft.adapter_files`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..adapter_files import CliError
from . import cmd_budget, cmd_info, cmd_inspect, cmd_merge

__all__ = ["main", "build_parser", "CliError"]

BASE_HELP = (
    "local Hugging Face model folder of the base model (default: the adapter's base_model_name_or_path); nothing is "
    "downloaded"
)


def build_parser() -> argparse.ArgumentParser:
    """The ``alore`` argument parser (one subparser per command)."""
    parser = argparse.ArgumentParser(
        prog="alore",
        description="Inspect, merge, size and describe ALoRE (Aggregating Low Rank Experts) adapters.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, extra in (
        ("info", cmd_info, ()),
        ("inspect", cmd_inspect, (BASE_HELP,)),
        ("merge", cmd_merge, (BASE_HELP,)),
        ("budget", cmd_budget, ()),
    ):
        p = sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION)
        p.set_defaults(func=module.run, parser=p)
        module.add_arguments(p, *extra)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``alore`` command line.

    Args:
        argv: Arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        0 on success. User errors exit with status 2 (``SystemExit``) after a
        one-line message on stderr, as argparse does.
    """
    from .._noise import expected_warnings_hidden, progress_bars_hidden

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        with expected_warnings_hidden(), progress_bars_hidden():
            return args.func(args)
    except CliError as exc:
        args.parser.error(str(exc))
    return 2  # unreachable: parser.error exits


if __name__ == "__main__":
    sys.exit(main())
