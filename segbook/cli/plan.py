"""`segbook plan`: nnU-Net's fingerprint, planning and preprocessing of an imported task (3d_fullres)."""

from __future__ import annotations

import argparse
import json
import os

from segbook.cli.common import (add_backbone_file_option, add_format_option, add_registry_option, add_task_option,
                                at_least, load_backbone_files, model_help, registry_from_args)


def register(subparsers: argparse._SubParsersAction) -> None:
    from segbook.backbones import CHECKPOINT_PLANS_MODEL, PLANNERS  # names and data, without the planning code

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
                             "task's plans of --model and nnU-Net's default plans where they exist (default: default)")
    parser.add_argument("--weights", metavar="FILE",
                        help="the nnssl checkpoint --plans checkpoint plans around, or whose pretraining "
                             "normalisation --normalization checkpoint applies")
    parser.add_argument("--model", default=CHECKPOINT_PLANS_MODEL,
                        help=model_help("the backbone whose checkpoint --weights FILE is (its format decides how "
                                        "the file is read), shown beside the task's plans by its own plans") +
                        f" (default: {CHECKPOINT_PLANS_MODEL})")
    add_backbone_file_option(parser)
    parser.add_argument("--normalization", choices=("task", "checkpoint"), default="task",
                        help="task (the default): normalise per the task's plans (CT: CTNormalization); checkpoint: "
                             "as the checkpoint --weights FILE of --model was pretrained, its scheme on every channel, "
                             "under plans of their own ({plans}_ZScoreNorm; `segbook finetune --normalization "
                             "checkpoint` plans STU-Net runs so from its catalogued checkpoint)")
    parser.add_argument("--num-processes", "-np", type=at_least(1), default=None, metavar="N",
                        help="worker processes (default: nnUNet_def_n_proc, capped by the cores)")
    parser.add_argument("--force", action="store_true", help="plan and preprocess again even if up to date")
    add_format_option(parser, ("text", "json"))
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from segbook.plan import plan_task

    load_backbone_files(args)
    entry = registry_from_args(args).get(args.task)
    processes = args.num_processes or max(1, int(os.environ.get("nnUNet_def_n_proc") or 1))
    planner = _planner(args)
    result = plan_task(entry, num_processes=processes, planner=planner, force=args.force)
    if args.format == "json":
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    print(result.summary())
    if planner != args.planner:
        print("\n".join(_beside_defaults(entry, result, args.model)))
    return 0


def _planner(args: argparse.Namespace) -> str:
    """The planner to run: `--plans`, or the one around `--model`'s checkpoint, normalised as it was pretrained
    where asked; the file is read (no weights loaded) before anything is planned."""
    from segbook import backbones
    from segbook.checkpoint_plans import CHECKPOINT_PLANS, planner_for_weights
    from segbook.errors import SegbookError
    from segbook.training.finetune import normalised_like_weights

    backbones.get(args.model)  # an unknown model is refused whether or not a file is read
    if args.planner == CHECKPOINT_PLANS:
        planner = planner_for_weights(args.model, args.weights)
    elif args.weights is not None and args.normalization == "task":
        raise SegbookError(f"--weights is for --plans {CHECKPOINT_PLANS} or --normalization checkpoint")
    else:
        planner = args.planner
    if args.normalization == "task":
        return planner
    return normalised_like_weights(planner, args.model, args.weights)


def _beside_defaults(entry, result, model: str) -> list[str]:
    """The checkpoint plan beside the task's own plans of `model` and nnU-Net's default plans (those already
    planned): what planning around the checkpoint changed."""
    from segbook import backbones
    from segbook.errors import SegbookError
    from segbook.plan import load_plan

    rows = [("checkpoint", result)]
    for name in dict.fromkeys((backbones.get(model).planner, "default")):
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
