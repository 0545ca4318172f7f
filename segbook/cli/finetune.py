"""`segbook finetune`: train one run (task, model, initialisation, fold) and `segbook env` for nnU-Net's tools."""

from __future__ import annotations

import argparse

from segbook.cli.common import (HelpFormatter, add_backbone_file_option, add_budget_options, add_registry_option,
                                add_seed_and_fraction_options, add_task_option, add_weights_and_device_options,
                                at_least, load_backbone_files, model_help, registry_from_args,
                                seeds_and_fractions_from_args, training_settings_from_args)

#: The plans a run can train on: nnU-Net's, or nnU-Net's at the SegBook authors' patch size and spacing.
TRAINING_PLANS = ("default", "paper", "paper-zscore")
#: What a run can be planned by: those, or around its checkpoint's own network (`segbook.checkpoint_plans`).
FINETUNE_PLANS = (*TRAINING_PLANS, "checkpoint")
PLANS_HELP = ("nnU-Net plans to train on: default (the model's own: nnUNetPlans, nnUNetResEncUNet{M,L}Plans for "
              "resenc-m/-l), paper (nnU-Net's planner at the SegBook authors' "
              "patch size and target spacing: SegbookPaperPlans), paper-zscore (the same with z-score "
              "normalisation for CT, as in pretraining) or checkpoint (resenc-l/-m with --weights "
              "NNSSL_FILE: the task planned around the checkpoint's own network, "
              "SegbookCheckpoint{arch}_{hash}Plans; without --pretrained the file only plans the scratch run, "
              "for a Delta(PT) on the same plans); part of the run's folder")

NORMALIZATION_HELP = ("task (the default): normalise per the task's plans (CT: CTNormalization); checkpoint: "
                      "preprocess the task as the checkpoint (--weights, or the cached official one) was pretrained, "
                      "its scheme on every channel (nnssl: its plan's; STU-Net: per-image z-score), under plans of "
                      "their own ({plans}_ZScoreNorm, part of the run's folder); without --pretrained the file only "
                      "normalises the scratch run, for a Delta(PT) on the same preprocessing")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune", help="train STU-Net (pretrained or scratch) or nnU-Net runs on a task",
        description="Train one run with nnU-Net v2's training loop, augmentation and validation. With --pretrained "
                    "the STU-Net body comes from the TotalSegmentator checkpoint and fresh segmentation heads are "
                    "added; what trains at which rate on which schedule is the recipe's (default segbook: the body "
                    "at 1e-3, the heads at 10x, poly decay per group). Without --pretrained the same network "
                    "trains from scratch (recipe scratch). The task is planned first if needed. Each seed and training "
                    "fraction is a run of its own, trained in turn. A run lives in "
                    "$nnUNet_results/Dataset{id}_{Name}/SegbookTrainer_{model}_{init}[_{recipe}][_seed{N}]"
                    "[_frac{P}]__{plans}__3d_fullres/fold_{fold} with its run.json record.",
        epilog="examples: segbook finetune --task 613 --model large --pretrained\n"
               "          segbook finetune --task 613 --model large --pretrained --recipe llrd --epochs 150\n"
               "          segbook finetune --task 613 --model large --pretrained --seeds 0 1 2 --fractions 0.25 1",
        formatter_class=HelpFormatter)
    add_task_option(parser)
    add_registry_option(parser)
    parser.add_argument("--model", required=True,
                        help=model_help("the backbone (STU-Net sizes; nnunet, nnU-Net's default network, scratch "
                                        "only; resenc-m/resenc-l, nnU-Net's residual-encoder U-Nets)"))
    add_backbone_file_option(parser)
    init = parser.add_mutually_exclusive_group()
    init.add_argument("--pretrained", action="store_true",
                      help="fine-tune from a checkpoint: the backbone's catalogued one (STU-Net: TotalSegmentator) "
                           "or --weights FILE")
    init.add_argument("--scratch", action="store_true", help="train from random initialisation (the default)")
    parser.add_argument("--recipe", metavar="NAME",
                        help="the fine-tuning recipe (`segbook recipes` lists them; default: the model's own: "
                             "segbook with --pretrained, scratch without, for the built-in models)")
    parser.add_argument("--fold", default="all", choices=["all", "0", "1", "2", "3", "4"],
                        help="'all' trains on the whole train split (SegBook's protocol); 0-4 are nnU-Net's "
                             "cross-validation folds inside it")
    add_seed_and_fraction_options(parser)
    parser.add_argument("--plans", choices=FINETUNE_PLANS, default="default", help=PLANS_HELP)
    parser.add_argument("--normalization", choices=("task", "checkpoint"), default="task", help=NORMALIZATION_HELP)
    add_weights_and_device_options(parser)
    parser.add_argument("--num-gpus", type=at_least(1), default=1, help="GPUs on this node (nnU-Net DDP when > 1)")
    parser.add_argument("--continue", dest="resume", action="store_true",
                        help="resume the run from its latest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing run of this configuration first")
    add_budget_options(parser)
    parser.add_argument("--plan-processes", type=at_least(1), default=None,
                        help="processes for planning and preprocessing if the task is not planned yet")
    parser.set_defaults(handler=run)

    env = subparsers.add_parser(
        "env", help="print the environment variables that let nnU-Net's own tools use segbook's folders and trainers",
        description="Prints `export` lines for nnUNet_raw, nnUNet_preprocessed, nnUNet_results and "
                    "nnUNet_extTrainer, so that `nnUNetv2_train ... -tr SegbookTrainer_large_pretrained` and "
                    "`nnUNetv2_predict` work on segbook's runs. Use: eval \"$(segbook env)\"")
    env.set_defaults(handler=run_env)


def run(args: argparse.Namespace) -> int:
    from segbook.training.finetune import finetune

    load_backbone_files(args)
    seeds, fractions = seeds_and_fractions_from_args(args)
    entry = registry_from_args(args).get(args.task)
    settings = training_settings_from_args(args)
    request = {k: v for k, v in vars(args).items() if k not in ("handler", "registry", "seeds", "fractions")}
    statuses = []
    for seed in seeds:
        for fraction in fractions:
            result = finetune(entry, args.model, args.pretrained, args.fold, recipe=args.recipe, seed=seed,
                              fraction=fraction, recipe_files=args.recipe_file, settings=settings,
                              weights=args.weights, device=args.device, num_gpus=args.num_gpus, resume=args.resume,
                              overwrite=args.overwrite, compile=args.compile, plan_processes=args.plan_processes,
                              plans=args.plans, normalization=args.normalization,
                              request={**request, "seed": seed, "fraction": fraction})
            print(f"{result.status}: {result.folder}")
            statuses.append(result.status)
    return 0 if all(status == "finished" for status in statuses) else 1


def run_env(args: argparse.Namespace) -> int:
    import os
    import shlex

    from segbook.paths import Paths
    from segbook.training.trainers import register_with_nnunet

    Paths.from_env().export()
    register_with_nnunet()
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        print(f"export {name}={shlex.quote(os.environ[name])}")
    return 0
