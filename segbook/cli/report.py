"""`segbook report`: one self-contained HTML file with the tables, statistics and figures."""

from __future__ import annotations

import argparse

from segbook.cli.results import add_collection_options, collect_from_args, recipes_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="write an HTML report: tables, statistics, violin plot, Delta bar charts",
        description="Write one self-contained HTML file (inline CSS, figures embedded as PNG): the tables by "
                    "scale, modality x target and region with pretrained vs scratch statistics, a violin plot of "
                    "per-dataset scores per configuration, Delta(PT) bar charts per group, with --recipes the "
                    "recipes table and a plot of each recipe's gain over scratch, the per-case tests per dataset "
                    "(Holm and Benjamini-Hochberg corrected), significance maps and rank stability by dataset scale, "
                    "with several training fractions the data-efficiency curves and the fractions table, and the "
                    "per-dataset table. Seeds are averaged and their spread shown (definitions: docs/results.md).")
    parser.add_argument("--out", required=True, metavar="FILE.html", help="where to write the report")
    parser.add_argument("--figures", metavar="DIR", help="also write each figure as a file into DIR")
    parser.add_argument("--figure-format", choices=("png", "pdf"), default="png",
                        help="format of the files written with --figures (default: png)")
    parser.add_argument("--title", default="SegBook results", help="the report's title")
    add_collection_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from segbook.paths import Paths
    from segbook.results import Selection, write_report

    known = recipes_from_args(args)
    df = collect_from_args(args, list(known) if known else None)
    where = args.results_dir or str(Paths.from_env().results)
    out = write_report(df, args.out, Selection.from_args(args, known), args.figures, args.figure_format, args.title,
                       description=f"runs from {where}")
    figures = f"; figures in {args.figures}" if args.figures else ""
    print(f"wrote {out} ({df['task'].nunique()} datasets, {int(df['evaluated'].sum())} results){figures}")
    return 0
