"""A dataset's folders (raw and preprocessed) and the claim that keeps two processes from rewriting them at once.

Import and planning both replace a dataset's folders; each holds the dataset's claim while it does, so a second
process waits (or is refused) instead of mixing its files with the first one's, and whatever a killed process
left behind is repaired by the next holder, never while a live one is still writing.

Neither replaces a folder while a run of the dataset is live (another process holds its run's claim: it trains on
the preprocessed cases, or evaluates on the raw test cases): `check_not_in_use` refuses, naming the runs, and
the folders stay as they are.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from segbook import claims
from segbook.errors import SegbookError
from segbook.io import leftovers, sweep_leftovers
from segbook.paths import Paths

if TYPE_CHECKING:
    from segbook.registry import DatasetEntry


class DatasetInUse(SegbookError):
    """A dataset's folders would be replaced under runs of it that are live; nothing was changed."""


def raw_folder(entry: "DatasetEntry", paths: Paths) -> Path:
    return paths.raw / entry.nnunet_name


def preprocessed_folder(entry: "DatasetEntry", paths: Paths) -> Path:
    return paths.preprocessed / entry.nnunet_name


def is_imported(entry: "DatasetEntry", paths: Paths) -> bool:
    return (raw_folder(entry, paths) / "dataset.json").is_file()


@contextlib.contextmanager
def dataset_claim(entry: "DatasetEntry", paths: Paths, *, wait: bool = False,
                  say: Callable[[str], None] | None = None) -> Iterator[list[str]]:
    """Hold the dataset's claim for the block, after repairing what a killed import or planning left behind.

    Yields the repairs made (for the log). `ClaimBusy` names the live holder; with `wait`, wait for it instead.
    """
    with claims.exclusive(paths.claims, f"dataset__{entry.nnunet_name}", f"dataset {entry.nnunet_name}",
                          wait=wait, say=say):
        yield repair_leftovers(entry, paths)


def repair_leftovers(entry: "DatasetEntry", paths: Paths) -> list[str]:
    """Repair the dataset's half-written folders; only call while holding its claim."""
    done = []
    for folder in (raw_folder(entry, paths), preprocessed_folder(entry, paths)):
        done += [f"{folder.parent}: {line}" for line in sweep_leftovers(folder)]
    return done


def repair_if_free(entry: "DatasetEntry", paths: Paths) -> list[str]:
    """Repair leftovers when there are some and no live process holds the dataset (for status commands)."""
    if not any(leftovers(folder) for folder in (raw_folder(entry, paths), preprocessed_folder(entry, paths))):
        return []
    try:
        with dataset_claim(entry, paths) as repaired:
            return repaired
    except claims.ClaimBusy:
        return []


def runs_in_use(entry: "DatasetEntry", paths: Paths) -> list[claims.ClaimRecord]:
    """The dataset's runs that a live process other than this one holds, by their claims (named by job id,
    `TASK__...__fold_F`); this process's own run (a `finetune` planning its task) does not count."""
    if not paths.claims.is_dir():
        return []
    live = [claims.holder(folder) for folder in sorted(paths.claims.glob(f"{entry.key}__*__fold_*"))]
    return [record for record in live if record is not None
            and not (record.host == socket.gethostname() and record.pid == os.getpid())]


def check_not_in_use(entry: "DatasetEntry", paths: Paths, action: str) -> None:
    """`DatasetInUse` naming the runs of the dataset that are live: `action` ("Planning X again") would replace their
    data."""
    runs = runs_in_use(entry, paths)
    if runs:
        named = "; ".join(f"{r.job} ({r.describe()})" for r in runs[:3]) + ("; ..." if len(runs) > 3 else "")
        raise DatasetInUse(f"{action} would replace the data under {len(runs)} live run(s) of {entry.nnunet_name}: "
                           f"{named}; wait for them to end (or stop them), then run it again")
