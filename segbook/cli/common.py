"""Options every command that works on datasets shares: the registry files, the task and the output format.

The registry is imported lazily so that building the parser (`segbook --help`) stays instant.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from segbook.registry import Registry

TASK_HELP = ("the dataset: paper number (613, Task613), key (Task613_COVID-19-20), nnU-Net id (Dataset613) or name "
             "(COVID-19-20, any case)")


def add_registry_option(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS keeps a value given before a sub-command from being reset by the sub-command's default.
    parser.add_argument("--registry", metavar="FILE", action="append", default=argparse.SUPPRESS,
                        help="your own dataset registry YAML, added to the built-in one (repeatable; also "
                             "SEGBOOK_REGISTRY, os.pathsep-separated)")


def registry_from_args(args: argparse.Namespace) -> Registry:
    from segbook.registry import load_registry

    return load_registry(getattr(args, "registry", None))


def add_task_option(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--task", required=required, metavar="TASK", help=TASK_HELP)


def add_format_option(parser: argparse.ArgumentParser, choices: Sequence[str]) -> None:
    parser.add_argument("--format", choices=list(choices), default=choices[0],
                        help=f"output format (default: {choices[0]})")
