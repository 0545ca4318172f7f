"""`segbook results`: the benchmark's tables from every evaluated run (and imported numbers), or an import."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import TYPE_CHECKING, Sequence, TextIO

from segbook.cli.common import ChoiceList, NameList, add_format_option, add_registry_option, registry_from_args
from segbook.cli.output import FORMATS
from segbook.results.tables import DEFAULT_TABLE, NAMES, table_help
from segbook.runs import INITS, MODELS

if TYPE_CHECKING:
    import pandas as pd

    from segbook.results import ResultTable

#: segbook.results.collect.METRICS, spelled out so that building the parser does not import pandas.
METRIC_CHOICES = ("dice", "nsd", "iou", "precision", "recall", "hd95")


def add_collection_options(parser: argparse.ArgumentParser) -> None:
    """What to collect and which configurations to show: shared by `results` and `report`."""
    parser.add_argument("--results-dir", metavar="DIR",
                        help="collect runs from DIR instead of nnU-Net's results folder ($nnUNet_results)")
    parser.add_argument("--plans", default="default",
                        help="nnU-Net plans of the runs: default (each backbone's own: nnUNetPlans, "
                             "nnUNetResEncUNet{M,L}Plans for ResEnc), a plans identifier or a planner name (paper, "
                             "paper-zscore, ...); runs of other plans are never averaged in (default: default)")
    parser.add_argument("--folds", choices=("all", "0-4"), default="all",
                        help="which runs a dataset's score averages: fold all, SegBook's protocol, or the five "
                             "cross-validation folds 0-4; the table's notes say which (default: all)")
    parser.add_argument("--metric", choices=METRIC_CHOICES, default="dice",
                        help="score to tabulate: dice, nsd, iou, precision, recall (percent) or hd95 (mm, lower is "
                             "better: its Delta is scratch - pretrained, so positive always means pretraining helps); "
                             "a run evaluated before segbook computed a metric shows 'not evaluated for METRIC' "
                             "(default: dice)")
    parser.add_argument("--models", action=ChoiceList, choices=MODELS, metavar="MODEL",
                        help="show these models (nnunet, tiny, small, base, large, huge; spaces or commas), marking "
                             "datasets they lack; default: every configuration present")
    parser.add_argument("--init", action=ChoiceList, choices=INITS, metavar="INIT",
                        help="show these initialisations (pretrained, scratch); default: both")
    parser.add_argument("--recipes", action=NameList, metavar="RECIPE",
                        help="show the runs of these fine-tuning recipes side by side (spaces or commas; see "
                             "`segbook recipes`), with scratch runs as their baseline; default: the segbook recipe "
                             "(`--table recipes`: every recipe present)")
    parser.add_argument("--recipe-file", metavar="FILE", action="append", default=[],
                        help="your own recipes (YAML), so that --recipes knows their names (repeatable; also "
                             "SEGBOOK_RECIPES, os.pathsep-separated)")
    parser.add_argument("--group-datasets", action="store_true",
                        help="modality x target: group whole datasets by their target (structure&lesion is its "
                             "own group) instead of splitting structure&lesion datasets by label")
    parser.add_argument("--no-imported", action="store_true", help="leave imported results out")
    parser.add_argument("--include-incomplete", action="store_true",
                        help="count evaluated runs that stopped before their whole training budget (left out by "
                             "default, with a warning naming them)")
    add_registry_option(parser)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "results", help="tables by scale, modality x target, region or dataset; statistics; import CSVs",
        description="Collect every evaluated run (evaluation/summary.json) and imported result, join the registry "
                    "and print a table. Cells are percentages with the number of datasets they average (n); "
                    "datasets lacking a configuration are listed, never averaged in (definitions: "
                    "docs/results.md).")
    add_collection_options(parser)
    parser.add_argument("--table", choices=NAMES, default=DEFAULT_TABLE, help=table_help())
    parser.add_argument("--stats", action="store_true",
                        help="print pretrained vs scratch statistics for the table's groups instead (recipes: each "
                             "recipe vs scratch and vs segbook): wins/ties/losses, Wilcoxon p-value, bootstrap 95%% "
                             "CI of the mean difference, and (not for recipes) the counts of datasets where the "
                             "per-case test says pretraining is better / not different / worse (reads each run's "
                             "metrics.csv)")
    parser.add_argument("--summary", choices=("mean", "median"), default="mean",
                        help="what a cell shows: the mean, or the median with its first and third quartiles, "
                             "'median (Q1, Q3)', over a group's datasets (group tables) or a dataset's test cases "
                             "(--table datasets); tables whose cells are no such summary refuse median (default: "
                             "mean)")
    parser.add_argument("--method", choices=("aggregate-then-rank", "rank-then-aggregate"), default=None,
                        help="with --table ranks: rank the configurations' mean scores over datasets "
                             "(aggregate-then-rank), or rank them per test case, average the ranks per dataset, "
                             "then over datasets (rank-then-aggregate, the challenge convention); rank stability "
                             "(bootstrap over datasets) for either (default: aggregate-then-rank)")
    parser.add_argument("--pretraining-cost", choices=("none", "amortise"), default="none",
                        help="with --table pareto: count no pretraining (none), or add each pretrained "
                             "configuration's pretraining GPU-hours divided by the number of downstream datasets "
                             "shown (amortise; the hours from the backbone catalogue where published, or "
                             "--pretraining-gpu-hours; unknown ones are shown unknown, never zero) (default: none)")
    parser.add_argument("--pretraining-gpu-hours", nargs="+", default=None, metavar="MODEL=H",
                        help="with --table pareto --pretraining-cost amortise: a model's pretraining GPU-hours "
                             "(a positive number), overriding the catalogue's, e.g. large=800")
    parser.add_argument("--import", dest="import_file", metavar="FILE.csv|DIR",
                        help="store results from elsewhere and exit: a CSV of dataset-level numbers (columns task, "
                             "model, init, dice and optionally nsd; scores as fractions in [0, 1]), or a bundle "
                             "folder made by --export (runs at case level, shown as source bundle:NAME)")
    parser.add_argument("--export", metavar="DIR",
                        help="write every evaluated run (per-case metrics, summary, run.json without local paths, "
                             "split hashes) into the new bundle folder DIR, for --import elsewhere, and exit")
    parser.add_argument("--bundle-name", metavar="NAME",
                        help="with --export: the bundle's name, which importers see as source bundle:NAME "
                             "(default: DIR's name)")
    add_format_option(parser, FORMATS)
    parser.set_defaults(handler=run)


def recipes_from_args(args: argparse.Namespace) -> dict[str, str] | None:
    """The recipes of `--recipes` with their initialisation (None when not given); an unknown one is an error."""
    from segbook.results import resolve_recipes

    return None if args.recipes is None else resolve_recipes(args.recipes, args.recipe_file)


def collect_from_args(args: argparse.Namespace, recipes: Sequence[str] | None = None) -> pd.DataFrame:
    """Collect with the shared options and the runs of `recipes`; skipped folders are reported on stderr, not
    fatal."""
    from segbook.paths import Paths
    from segbook.results import ResultsWarning, collect_results

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResultsWarning)
        df = collect_results(Paths.from_env(), registry_from_args(args), args.results_dir, args.plans,
                             imported=not args.no_imported, include_incomplete=args.include_incomplete,
                             recipes=recipes, folds=args.folds)
    for warning in caught:
        if issubclass(warning.category, ResultsWarning):
            print(f"segbook: warning: {warning.message}", file=sys.stderr)
    if df.empty:
        where = args.results_dir or Paths.from_env().results
        print(f"segbook: no runs under {where} and no imported results", file=sys.stderr)
    return df


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.export:
        return run_export(args)
    if args.import_file and Path(args.import_file).is_dir():
        return run_bundle_import(args)
    if args.import_file:
        return run_import(args)
    from segbook.results import ALL_RECIPES, Selection, TableError, build_table
    from segbook.results.selection import AGGREGATE_THEN_RANK, parse_pretraining_hours
    from segbook.results.tables import check_request

    if args.method and args.table != "ranks":
        raise TableError(f"--method says how --table ranks ranks configurations; it does not apply to --table "
                         f"{args.table}")
    known = recipes_from_args(args)
    selection = Selection.of(Selection.from_args(args, known), summary=args.summary,
                             rank_method=args.method or AGGREGATE_THEN_RANK, pretraining_cost=args.pretraining_cost,
                             pretraining_gpu_hours=parse_pretraining_hours(args.pretraining_gpu_hours))
    spec = check_request(args.table, selection, args.stats)
    df = collect_from_args(args, list(known) if known else [ALL_RECIPES] if spec.every_recipe else None)
    print_table(build_table(df, args.table, selection, args.stats), args.format)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from segbook.results.bundles import export_bundle

    report = export_bundle(args.export, args.results_dir, registry_from_args(args), name=args.bundle_name)
    print(f"exported {report.runs} run(s) as bundle {report.name} into {report.folder}; import it elsewhere with "
          f"`segbook results --import {report.folder}`")
    if report.left_out:
        print(f"segbook: warning: {report.left_out} evaluated run(s) without evaluation/metrics.csv (or of datasets "
              "the registry does not know) were left out", file=sys.stderr)
    return 0


def run_bundle_import(args: argparse.Namespace) -> int:
    from segbook.results.bundles import import_bundle

    report = import_bundle(args.import_file, registry_from_args(args))
    if report.already_imported:
        print(f"bundle {report.name} is imported already ({report.folder}): nothing to do")
        return 0
    print(f"imported {report.runs} run(s) of bundle {report.name} into {report.folder}; `segbook results` shows "
          f"them as source bundle:{report.name} (delete that folder to forget them)")
    for task, (theirs, ours) in sorted(report.other_splits.items()):
        print(f"segbook: warning: bundle {report.name}: its {task} runs were scored on the test split {theirs[:12]}, "
              f"not on this dataset's {ours[:12]}; they are kept apart (never averaged or compared with local runs: "
              f"tables show them as configurations of their own, [bundle:{report.name}, other split])",
              file=sys.stderr)
    return 0


def run_import(args: argparse.Namespace) -> int:
    from segbook.results import import_results, read_import_csv

    registry = registry_from_args(args)
    stored = import_results(args.import_file, registry)
    count = len(read_import_csv(stored, registry))
    print(f"imported {count} result(s) from {args.import_file} into {stored}; `segbook results` shows them from now "
          f"on as source imported:{stored.stem} (delete that file to forget them)")
    return 0


def print_table(table: ResultTable, fmt: str, stream: TextIO | None = None) -> None:
    """The table in `fmt`; notes follow it in text formats and go to stderr with csv and json (kept parseable)."""
    from segbook.cli.output import emit

    stream = stream or sys.stdout
    machine = fmt in ("csv", "json")
    if not machine:
        stream.write({"md": f"### {table.title}\n\n", "latex": f"% {table.title}\n"}.get(fmt, f"{table.title}\n"))
    if table.rows or fmt == "json":
        emit(table.records(fmt), fmt, stream, numparse=False)
    elif not machine:
        stream.write("no datasets\n")
    notes_stream = sys.stderr if machine else stream
    prefix = {"md": "", "latex": "% "}.get(fmt, "")
    lines = [f"{prefix}{note}" for note in table.notes]
    if fmt == "md":
        lines = [f"{'  ' if note.startswith('  ') else ''}- {note.strip()}" for note in table.notes]
    if lines:
        notes_stream.write(("\n" if not machine else "") + "\n".join(lines) + "\n")
