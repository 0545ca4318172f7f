"""Entry point of the `segbook` command.

Each feature lives in its own module under `segbook.cli` with a `register(subparsers)` function; heavy imports
(torch, nnU-Net) happen inside the command handlers so `segbook --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from segbook import __version__
from segbook.errors import SegbookError

# Order in which commands appear in `segbook --help`, following the data flow.
COMMAND_MODULES = [
    "models",
    "weights",
    "tasks",
    "data",
    "plan",
    "recipes",
    "finetune",
    "evaluate",
    "results",
    "report",
    "batch",
    "demo",
]


def _limit_nnunet_processes() -> None:
    """nnU-Net defaults to 8 worker processes and a per-host table of augmentation workers; cap both by the cores."""
    cores = os.cpu_count() or 1
    os.environ.setdefault("nnUNet_def_n_proc", str(min(8, cores)))
    os.environ.setdefault("nnUNet_n_proc_DA", str(max(1, min(12, cores - 1))))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segbook",
        description="SegBook: transfer learning with STU-Net backbones pretrained on TotalSegmentator, "
                    "benchmarked on nnU-Net v2 against training from scratch.",
    )
    parser.add_argument("--version", action="version", version=f"segbook {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"segbook.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    _limit_nnunet_processes()
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except SegbookError as error:
        print(f"segbook: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("segbook: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
