"""`segbook demo`: the whole benchmark in miniature on synthetic data (the README's main command)."""

from __future__ import annotations

import argparse

from segbook.cli.common import HelpFormatter, at_least


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the whole benchmark in miniature on synthetic data (minutes on a laptop CPU)",
        formatter_class=HelpFormatter,
        description="Generates a synthetic source task and three target tasks (CT and MRI; seen and unseen "
                    "structures and lesions; small, medium and large), pretrains an STU-Net on the source, "
                    "fine-tunes it and trains from scratch on every target through `segbook batch`, evaluates on "
                    "the held-out cases, prints the results tables and writes the HTML report. Everything stays "
                    "in the output folder; your nnU-Net folders are not touched. The numbers are toy-scale.")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: a fresh temporary folder); running "
                                                     "again into the same folder reuses what is already done")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test of every stage")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"],
                        help="cuda runs a bigger demo (STU-Net small, larger volumes, longer training)")
    parser.add_argument("--seed", type=at_least(0), default=0, help="the same seed gives the same tables")
    parser.add_argument("--budgets", nargs="+", metavar="E", default=[],
                        help="train the targets for each of these budgets in epochs, each its own run, and add the "
                             "budgets table (default: the demo's one budget, 15 epochs; 2 with --quick)")
    parser.add_argument("--snapshots", nargs="+", metavar="P", default=[],
                        help="also keep and score each target network after these percentages of its budget "
                             "(learning curves: the curves table and report figure)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from segbook.cli.results import print_table
    from segbook.demo import run_demo

    from segbook.runs import parse_budgets
    from segbook.training.settings import parse_snapshots

    budgets = parse_budgets(args.budgets) if args.budgets else []
    snapshots = parse_snapshots(args.snapshots) if args.snapshots else []
    result = run_demo(args.out, quick=args.quick, device=args.device, seed=args.seed, budgets=budgets,
                      snapshots=snapshots)
    for table in result.tables.values():
        print()
        print_table(table, "table")
    print()
    print(result.closing_note())
    return 0
