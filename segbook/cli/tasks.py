"""`segbook tasks`: list, show and summarise the datasets of the registry."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from segbook.cli.common import TASK_HELP, add_format_option, add_registry_option, registry_from_args

if TYPE_CHECKING:
    from segbook.registry import DatasetEntry, RegistrySummary

LIST_FORMATS = ("table", "csv", "json", "md", "latex")
TABLE_COLUMNS = ("key", "dataset_id", "name", "modality", "target", "cases", "scale", "region")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tasks", help="list, show and summarise the SegBook datasets",
        description="The datasets of the registry (the 87 SegBook datasets plus yours). Without an action, list "
                    "them; filters are case-insensitive and combine.")
    parser.add_argument("--modality", help="CT, MRI, CT&PET or Ultrasound")
    parser.add_argument("--target", help="lesion, seen, unseen or structure&lesion")
    parser.add_argument("--scale", help="small (<100 cases), medium (100-399) or large (400+)")
    parser.add_argument("--region", help="head and neck, thoracic, abdominal, pelvic, limb or other")
    add_format_option(parser, LIST_FORMATS)
    add_registry_option(parser)
    parser.set_defaults(handler=run_list)
    actions = parser.add_subparsers(dest="tasks_action", metavar="ACTION")
    show = actions.add_parser("show", help="everything about one dataset, and whether its data is present")
    show.add_argument("task", help=TASK_HELP)
    add_format_option(show, ("text", "json"))
    add_registry_option(show)
    show.set_defaults(handler=run_show)
    summary = actions.add_parser("summary", help="the paper's counts by scale, modality and target, region")
    add_format_option(summary, ("table", "json"))
    add_registry_option(summary)
    summary.set_defaults(handler=run_summary)
    pairs = actions.add_parser(
        "pairs", help="which datasets can validate which: shared structures, modalities, case counts, channels",
        description="Every ordered pair (trained on, tested on) of registered datasets that share a structure, by "
                    "the registry's label names (without case, spaces, '_' and '-'), derived from the registry "
                    "now. 'cases' is what `segbook evaluate --on` scores: the tested dataset's test split, or all "
                    "its labelled cases with --on-all-cases. Pairs whose input channels differ are listed with "
                    "the reason (evaluate --on refuses them unless --channels maps the tested dataset's channels "
                    "onto the run's).")
    pairs.add_argument("--structure", metavar="NAME", help="only pairs sharing this structure (e.g. liver)")
    add_format_option(pairs, LIST_FORMATS)
    add_registry_option(pairs)
    pairs.set_defaults(handler=run_pairs)


def run_list(args: argparse.Namespace) -> int:
    from segbook.cli.output import emit

    entries = registry_from_args(args).select(args.modality, args.target, args.scale, args.region)
    if args.format == "json":
        print(json.dumps([entry.as_dict() for entry in entries], indent=2))
    elif args.format == "table":
        emit([{column: row[column] for column in TABLE_COLUMNS} for row in (e.row() for e in entries)], "table")
        print(f"{len(entries)} dataset(s)")
    else:
        emit([entry.row() for entry in entries], args.format)
    return 0


def _raw_status(entry: DatasetEntry) -> tuple[str, str]:
    from segbook.data.folders import is_imported, raw_folder
    from segbook.paths import Paths

    paths = Paths.from_env()
    folder = raw_folder(entry, paths)
    if is_imported(entry, paths):
        return str(folder), "present"
    return str(folder), "incomplete (no dataset.json)" if folder.is_dir() else "absent"


def _show_text(entry: DatasetEntry, folder: str, status: str, comparisons: dict[str, dict]) -> str:
    from tabulate import tabulate

    split = f"{entry.train_cases} train / {entry.test_cases} test"
    facts = [
        ("key", entry.key), ("name", entry.name), ("paper task", entry.paper_task or "not in the paper"),
        ("nnU-Net dataset", entry.nnunet_name), ("modality", entry.modality),
        ("channels", ", ".join(f"{i}: {name}" for i, name in enumerate(entry.channels))),
        ("target", entry.target), ("cases", f"{entry.cases} ({entry.scale}); split {split}"),
        ("region", entry.region), ("bone / vessel", f"{entry.bone} / {entry.vessel}"),
        ("citation", entry.citation), ("source", entry.source_url), ("licence", entry.licence),
        ("NSD tolerance", f"{entry.nsd_tolerance_mm} mm"), ("file ending", entry.file_ending),
        ("raw data", f"{folder} ({status})"),
    ]
    if entry.reference_patch_size or entry.reference_spacing:
        plans = f"patch {entry.reference_patch_size or 'unknown'}, spacing {entry.reference_spacing or 'unknown'}"
        facts.insert(-1, ("authors' plans", plans))
    labels = [(label.index, label.name, label.kind, "" if label.seen is None else label.seen,
               ", ".join(label.totalseg_classes)) for label in entry.labels]
    parts = [tabulate(facts, tablefmt="plain"), "",
             tabulate(labels, headers=["label", "name", "kind", "seen", "TotalSegmentator v1"], tablefmt="simple")]
    parts += ["", *_plans_text(entry, comparisons)]
    if entry.notes:
        parts += ["", "notes:", *(f"  - {note}" for note in entry.notes)]
    return "\n".join(parts)


def _plans_text(entry: DatasetEntry, comparisons: dict[str, dict]) -> list[str]:
    """segbook's current plans of the task beside the authors', as `segbook plan` recorded them."""
    from segbook.reference_plans import describe_comparison

    if not comparisons:
        return [f"segbook's plans: none yet (`segbook plan --task {entry.key}` plans it and compares them with the "
                "authors')"]
    return [line for planner, comparison in comparisons.items()
            for line in [f"segbook's plans ({planner}):", *describe_comparison(comparison)]]


def _comparisons(entry: DatasetEntry) -> dict[str, dict]:
    from segbook.data.folders import is_imported
    from segbook.paths import Paths
    from segbook.plan import recorded_comparisons

    paths = Paths.from_env()
    return recorded_comparisons(entry, paths) if is_imported(entry, paths) else {}


def run_show(args: argparse.Namespace) -> int:
    entry = registry_from_args(args).get(args.task)
    folder, status = _raw_status(entry)
    comparisons = _comparisons(entry)
    if args.format == "json":
        print(json.dumps({**entry.as_dict(), "raw_folder": folder, "raw_status": status,
                          "plans_comparison": comparisons}, indent=2))
    else:
        print(_show_text(entry, folder, status, comparisons))
    return 0


def _summary_text(summary: RegistrySummary) -> str:
    from tabulate import tabulate

    scales = [(scale, count, f"{summary.scale_percent[scale]:.2f}%") for scale, count in summary.by_scale.items()]
    targets = list(next(iter(summary.by_modality_target.values())))
    grid = [[modality, *counts.values(), sum(counts.values())]
            for modality, counts in summary.by_modality_target.items()]
    grid.append(["all", *(sum(row[i + 1] for row in grid) for i in range(len(targets))), summary.total])
    return "\n\n".join([
        f"{summary.total} datasets; {summary.bone} with bone and {summary.vessel} with vessel labels",
        tabulate(scales, headers=["scale", "datasets", "share"], tablefmt="simple"),
        tabulate(grid, headers=["modality", *targets, "all"], tablefmt="simple"),
        tabulate(summary.by_region.items(), headers=["region", "datasets"], tablefmt="simple"),
    ])


def run_summary(args: argparse.Namespace) -> int:
    summary = registry_from_args(args).summary()
    print(json.dumps(summary.as_dict(), indent=2) if args.format == "json" else _summary_text(summary))
    return 0


def pair_row(pairing) -> dict:
    """One row of `segbook tasks pairs`."""
    trained, tested = pairing.trained, pairing.tested
    return {"trained_on": trained.key, "tested_on": tested.key, "shift": pairing.shift,
            "shared": ", ".join(s.name for s in pairing.structures), "n_shared": len(pairing.structures),
            "trained_test_cases": trained.test_cases, "tested_test_cases": tested.test_cases,
            "tested_cases": tested.cases,
            "channels": "compatible" if not pairing.problems else
            f"differ: {', '.join(trained.channels)} vs {', '.join(tested.channels)}"}


def run_pairs(args: argparse.Namespace) -> int:
    from segbook.cli.output import emit
    from segbook.structures import validation_pairs

    pairs = validation_pairs(registry_from_args(args), args.structure)
    rows = [pair_row(p) for p in pairs]
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    if args.format == "table":
        rows = [{**row, "shared": _short(row["shared"])} for row in rows]
    emit(rows, args.format)
    if args.format == "table":
        usable = sum(p.usable for p in pairs)
        mappable = " (the others: evaluate --on ... --channels NAME ... maps them)" if usable < len(pairs) else ""
        print(f"{len(pairs)} pair(s), {usable} with compatible channels{mappable}")
    return 0


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
