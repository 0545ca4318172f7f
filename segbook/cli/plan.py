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
    parser.add_argument("--plans", "--planner", dest="planner", choices=(*PLANNERS, "checkpoint"), default="default",
                        help="nnU-Net's default planner (nnUNetPlans), a residual-encoder preset "
                             "(nnUNetResEncUNet{M,L,XL}Plans), paper: nnU-Net's planner at the SegBook authors' "
                             "patch size and target spacing (SegbookPaperPlans; paper-zscore: also z-score for CT, "
                             "as in pretraining), or checkpoint: the task planned around the network of the nnssl "
                             "checkpoint --weights FILE (SegbookCheckpoint{arch}_{hash}Plans), shown beside the "
                             "task's ResEnc-L and default plans where they exist (default: default)")
    parser.add_argument("--weights", metavar="FILE",
                        help="the nnssl checkpoint --plans checkpoint plans around, or whose pretraining "
                             "normalisation --normalization checkpoint applies")
    parser.add_argument("--normalization", choices=("task", "checkpoint"), default="task",
                        help="task (the default): normalise per the task's plans (CT: CTNormalization); checkpoint: "
                             "as the nnssl checkpoint --weights FILE was pretrained, its scheme on every channel, "
                             "under plans of their own ({plans}_ZScoreNorm; `segbook finetune --normalization "
                             "checkpoint` plans STU-Net runs so from its catalogued checkpoint)")
    parser.add_argument("--num-processes", "-np", type=at_least(1), default=None, metavar="N",
                        help="worker processes (default: nnUNet_def_n_proc, capped by the cores)")
    parser.add_argument("--force", action="store_true", help="plan and preprocess again even if up to date")
    add_format_option(parser, ("text", "json"))
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from segbook.plan import plan_task

    entry = registry_from_args(args).get(args.task)
    processes = args.num_processes or max(1, int(os.environ.get("nnUNet_def_n_proc") or 1))
    planner = _planner(args)
    result = plan_task(entry, num_processes=processes, planner=planner, force=args.force)
    if args.format == "json":
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    print(result.summary())
    if planner != args.planner:
        print("\n".join(_beside_defaults(entry, result)))
    return 0


def _planner(args: argparse.Namespace) -> str:
    from segbook.checkpoint_plans import CHECKPOINT_PLANS, planner_for_weights
    from segbook.errors import SegbookError

    if args.planner == CHECKPOINT_PLANS:
        planner = planner_for_weights("resenc-l", args.weights)
    elif args.weights is not None and args.normalization == "task":
        raise SegbookError(f"--weights is for --plans {CHECKPOINT_PLANS} or --normalization checkpoint")
    else:
        planner = args.planner
    if args.normalization == "task":
        return planner
    return _normalised_planner(planner, args.weights)


def _normalised_planner(planner: str, weights: str | None) -> str:
    """`planner` normalising as the nnssl checkpoint `weights` was pretrained, read before anything is planned."""
    from segbook import backbones
    from segbook.backbones.models import checkpoint_facts
    from segbook.checkpoint_normalization import pretraining_schemes, register
    from segbook.errors import SegbookError
    from stunet import CheckpointError

    if weights is None:
        raise SegbookError("--normalization checkpoint needs the checkpoint: pass --weights FILE")
    try:
        facts = checkpoint_facts(backbones.get("resenc-l"), weights)
    except CheckpointError as error:
        raise SegbookError(f"--normalization checkpoint: {error}") from None
    return register(planner, *pretraining_schemes(facts.pretraining, weights))


def _beside_defaults(entry, result) -> list[str]:
    """The checkpoint plan beside the task's own ResEnc-L and default plans (those already planned): what planning
    around the checkpoint changed."""
    from segbook.errors import SegbookError
    from segbook.plan import load_plan

    rows = [("checkpoint", result)]
    for name in ("resenc-l", "default"):
        try:
            rows.append((name, load_plan(entry, planner=name)))
        except SegbookError:
            rows.append((name, None))
    lines = ["compared with the task's own plans:", f"  {'plans':<12} {'patch':<16} {'spacing':<22} stages batch"]
    for name, plan in rows:
        if plan is None:
            lines.append(f"  {name:<12} not planned (segbook plan --task {entry.key} --plans {name})")
            continue
        spacing = str([round(s, 3) for s in plan.spacing])
        lines.append(f"  {name:<12} {str(plan.patch_size):<16} {spacing:<22} {len(plan.nnunet_strides):<6} "
                     f"{plan.batch_size}")
    return lines
