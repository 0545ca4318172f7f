"""`segbook plan`: nnU-Net's fingerprint, planning and preprocessing of an imported task (3d_fullres)."""

from __future__ import annotations

import argparse
import json
import os

from segbook.cli.common import add_format_option, add_registry_option, add_task_option, at_least, registry_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    from segbook.backbones import PLANNERS  # the planners' names, without the planning code

    parser = subparsers.add_parser(
        "plan", help="fingerprint, plan and preprocess an imported task with nnU-Net (3d_fullres)",
        description="Runs nnU-Net v2's fingerprint extraction, experiment planning and preprocessing for the "
                    "3d_fullres configuration. STU-Net trains on these plans (patch size, spacing, batch size, "
                    "normalisation) with strides derived from them. Prints the plan beside the SegBook authors' "
                    "nnU-Net v1 plans (patch size, spacing, stages). Re-running is a no-op until the raw data "
                    "changes, which makes everything preprocessed from it stale and rebuilt.")
    add_task_option(parser)
    add_registry_option(parser)
    parser.add_argument("--plans", "--planner", dest="planner", choices=tuple(PLANNERS), default="default",
                        help="nnU-Net's default planner (nnUNetPlans), a residual-encoder preset "
                             "(nnUNetResEncUNet{M,L,XL}Plans), or paper: nnU-Net's planner at the SegBook authors' "
                             "patch size and target spacing (SegbookPaperPlans; paper-zscore: also z-score for CT, "
                             "as in pretraining) (default: default)")
    parser.add_argument("--num-processes", "-np", type=at_least(1), default=None, metavar="N",
                        help="worker processes (default: nnUNet_def_n_proc, capped by the cores)")
    parser.add_argument("--force", action="store_true", help="plan and preprocess again even if up to date")
    add_format_option(parser, ("text", "json"))
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from segbook.plan import plan_task

    entry = registry_from_args(args).get(args.task)
    processes = args.num_processes or max(1, int(os.environ.get("nnUNet_def_n_proc") or 1))
    result = plan_task(entry, num_processes=processes, planner=args.planner, force=args.force)
    print(json.dumps(result.as_dict(), indent=2) if args.format == "json" else result.summary())
    return 0
