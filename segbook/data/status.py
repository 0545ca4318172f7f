"""`dataset_status`: how far each registered task has come (raw data, validation, split, plans, preprocessing).

Only small metadata files and directory listings are read, so it stays fast for the whole registry.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from segbook.data.folders import is_imported, raw_folder, repair_if_free
from segbook.data.importer import read_import_record
from segbook.data.split import read_split
from segbook.errors import SegbookError
from segbook.paths import Paths

if TYPE_CHECKING:
    from segbook.registry import DatasetEntry, Registry


def _split_cell(entry: DatasetEntry, paths: Paths) -> str:
    try:
        split = read_split(raw_folder(entry, paths))
    except SegbookError:
        return "damaged"
    return f"{len(split.train)}/{len(split.test)}" if split else "no"


def task_status(entry: DatasetEntry, paths: Paths) -> dict[str, Any]:
    """One row: `raw` (dataset.json present), `validated` (imported by segbook, so every case passed validation),
    `split` (train/test counts), `planned` (planners with plans) and `preprocessed` (yes / stale / no).

    What a killed import or planning left behind is repaired first, unless a live process is at work on the task.
    """
    from segbook.plan import plan_states

    for line in repair_if_free(entry, paths):
        print(f"segbook: repaired {entry.nnunet_name}: {line}", file=sys.stderr)
    folder = raw_folder(entry, paths)
    raw = is_imported(entry, paths)
    record = read_import_record(folder) if raw else None
    states = plan_states(entry, paths) if raw else {}
    current = [name for name, state in states.items() if state == "preprocessed"]
    preprocessed = "yes" if current else "stale" if states else "no"
    return {
        "task": entry.key, "dataset": entry.nnunet_name, "raw": "yes" if raw else "no",
        "validated": "yes" if record and record.get("validated") else "no",
        "split": _split_cell(entry, paths) if raw else "-",
        "planned": ",".join(states) if states else "no", "preprocessed": preprocessed,
    }


def dataset_status(registry: Registry, paths: Paths | None = None, present_only: bool = False) -> list[dict]:
    """One row per registered task (only those with raw data when `present_only`)."""
    paths = paths or Paths.from_env()
    rows = [task_status(entry, paths) for entry in registry]
    return [row for row in rows if row["raw"] == "yes"] if present_only else rows
