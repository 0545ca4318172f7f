"""`segbook evaluate`: score a trained run on its dataset's held-out test split."""

from __future__ import annotations

import argparse

from segbook.cli.common import (DEVICE_HELP, POSITIVE_NUMBER, HelpFormatter, add_backbone_file_option,
                                add_registry_option, add_seed_and_fraction_options, at_least, bounded,
                                budgets_from_args, load_backbone_files, model_help, registry_from_args,
                                seeds_and_fractions_from_args)
from segbook.cli.finetune import FINETUNE_PLANS, NORMALIZATION_HELP
from segbook.evaluation.settings import STEP_SIZE


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="predict the held-out test split of a trained run and compute Dice, NSD and HD95",
        formatter_class=HelpFormatter,
        description="Sliding-window prediction of the test split (imagesTs) with nnU-Net's predictor and the run's "
                    "final checkpoint, then per-case, per-label Dice (nnU-Net's convention), normalised surface "
                    "Dice and HD95 (spacing-aware). Writes evaluation/metrics.csv and evaluation/summary.json in "
                    "the run folder. A run already evaluated with the same settings and checkpoint is skipped.",
        epilog="examples: segbook evaluate --task 613 --model large --pretrained\n"
               "          segbook evaluate --task 613 --model large --pretrained --seeds 0 1 2 --fractions 0.25 1\n"
               "          segbook evaluate --task 613 --model large --pretrained --budgets 150 1000\n"
               "          segbook evaluate --run $nnUNet_results/Dataset613_COVID-19-20/"
               "SegbookTrainer_large_pretrained__nnUNetPlans__3d_fullres/fold_all")
    which = parser.add_argument_group("which run (a task and configuration, or a run folder)")
    which.add_argument("--task", help="paper number, key, nnU-Net id or name")
    which.add_argument("--model", help=model_help("the backbone the run trained"))
    add_backbone_file_option(which)
    init = which.add_mutually_exclusive_group()
    init.add_argument("--pretrained", action="store_true")
    init.add_argument("--scratch", action="store_true")
    which.add_argument("--recipe", metavar="NAME",
                       help="the run's recipe (default: the model's own: segbook with --pretrained, scratch "
                            "without, for the built-in models)")
    which.add_argument("--fold", default="all", choices=["all", "0", "1", "2", "3", "4"])
    add_seed_and_fraction_options(which)
    which.add_argument("--plans", choices=FINETUNE_PLANS, default="default",
                       help="the plans the run trained on, as given to `segbook finetune` (default: the model's "
                            "own, nnUNetPlans for STU-Net; checkpoint: with --weights, the file it was planned "
                            "around)")
    which.add_argument("--normalization", choices=("task", "checkpoint"), default="task",
                       help="as given to `segbook finetune`: " + NORMALIZATION_HELP)
    which.add_argument("--weights", metavar="PATH",
                       help="the checkpoint the run was given with --weights (read for --plans checkpoint and "
                            "--normalization checkpoint, which name the run's plans; never loaded)")
    which.add_argument("--run", metavar="DIR", help="a run folder (…/fold_X) instead of --task/--model")
    add_registry_option(parser)
    external = parser.add_argument_group(
        "external validation (the run scored on datasets it never saw; `segbook tasks pairs` lists them)")
    external.add_argument("--on", nargs="+", metavar="TASK",
                          help="score the run on these datasets instead of its own: their raw images preprocessed "
                               "with the run's plans, scored on the structures both datasets label (by registry "
                               "name, or --label-map); written to evaluation/external/TASK/ in the run folder")
    external.add_argument("--on-all-cases", action="store_true",
                          help="with --on: all labelled cases of each dataset, its training split included")
    external.add_argument("--label-map", metavar="FILE",
                          help="with --on: YAML naming synonyms and merges, e.g. 'structures: {Kidney: [Left "
                               "kidney, Right kidney]}' (docs/results.md)")
    external.add_argument("--channels", nargs="+", metavar="NAME",
                          help="with --on: the tested dataset's channels (registry names, or 0-based indices) the "
                               "run reads as its own, in its own channel order, e.g. --channels T2 for a run on T2 "
                               "scored on a T1, T2 dataset; lets channels that differ be mapped (recorded; another "
                               "map redoes the evaluation)")
    options = parser.add_argument_group("prediction and metrics")
    options.add_argument("--step-size", type=bounded(STEP_SIZE), default=0.5,
                         help="sliding-window step as a fraction of the patch")
    options.add_argument("--no-gaussian", dest="gaussian", action="store_false", help="uniform window weighting")
    options.add_argument("--no-mirroring", dest="mirroring", action="store_false", help="no test-time mirroring")
    options.add_argument("--nsd-tolerance", type=POSITIVE_NUMBER, default=None,
                         help="NSD tolerance in mm (default: the registry's value for the dataset, usually 2)")
    options.add_argument("--empty-dice", choices=["nan", "one"], default="nan",
                         help="Dice when reference and prediction are both empty: NaN (nnU-Net, left out of "
                              "means) or 1")
    options.add_argument("--keep-predictions", action="store_true", help="keep the predicted segmentations")
    options.add_argument("--device", choices=["cuda", "cpu", "mps"], default=None, help=DEVICE_HELP)
    options.add_argument("--threads", type=at_least(1), default=None, metavar="N",
                         help="torch's intra-op threads while predicting (with --device cpu: how many cores the "
                              "network computes on; nnU-Net caps them at nnUNet_def_n_proc, 8 unless set); the "
                              "summary's cost records the threads used, the seconds per case and the peak resident "
                              "memory (default: torch's own, usually the number of cores)")
    options.add_argument("--num-processes", type=at_least(1), default=1, help="processes for preprocessing and metrics")
    options.add_argument("--force", action="store_true", help="evaluate again even if up to date")
    options.add_argument("--snapshots", action="store_true",
                         help="also score each snapshot the run kept (finetune --snapshots) on the test split, each "
                              "into its own folder, snapshots/evaluation_ep{E}/; a snapshot is a point of a longer "
                              "schedule whose learning rate had not decayed, not a run of that many epochs")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from segbook.evaluation.evaluate import evaluate_run
    from segbook.evaluation.settings import EvaluationSettings

    load_backbone_files(args)
    registry = registry_from_args(args)
    settings = EvaluationSettings(step_size=args.step_size, gaussian=args.gaussian, mirroring=args.mirroring,
                                  nsd_tolerance_mm=args.nsd_tolerance, empty_dice=args.empty_dice)
    if args.on or args.on_all_cases or args.label_map or args.channels:
        return _run_external(args, registry, settings)
    for entry, spec, folder in _runs(args, registry):
        result = evaluate_run(entry, spec, settings=settings, device=args.device, num_processes=args.num_processes,
                              keep_predictions=args.keep_predictions, force=args.force, run_folder=folder,
                              threads=args.threads)
        _print_summary(result)
        if args.snapshots:
            _evaluate_snapshots(entry, spec, settings, args, result.folder.parent)
    return 0


def _evaluate_snapshots(entry, spec, settings, args: argparse.Namespace, run_folder) -> None:
    """Each snapshot of the run, scored into its own folder (none kept: said)."""
    from segbook.evaluation.evaluate import evaluate_run, run_snapshots

    snapshots = run_snapshots(run_folder)
    if not snapshots:
        print(f"  no snapshots in {run_folder} (train with --snapshots to keep some)")
    for snapshot in snapshots:
        result = evaluate_run(entry, spec, settings=settings, device=args.device, num_processes=args.num_processes,
                              keep_predictions=args.keep_predictions, force=args.force, run_folder=run_folder,
                              threads=args.threads, snapshot=snapshot["epoch"])
        print(f"snapshot after epoch {snapshot['epoch']} ({snapshot.get('percent')}% of the budget, learning rate "
              "not decayed):")
        _print_summary(result)


def _run_external(args: argparse.Namespace, registry, settings) -> int:
    """Every (run, tested dataset) checked, label map included, before the first prediction."""
    from segbook.errors import SegbookError
    from segbook.evaluation.external import evaluate_external, labelled_cases
    from segbook.paths import Paths
    from segbook.structures import pair, read_label_map

    if not args.on:
        raise SegbookError("--on-all-cases, --label-map and --channels go with --on TASK (the datasets to score the "
                           "run on)")
    if args.snapshots:
        raise SegbookError("--snapshots with --on: a run is scored on other datasets with its final network only")
    label_map = read_label_map(args.label_map) if args.label_map else None
    runs = _runs(args, registry)
    tested = list({entry.key: entry for entry in (registry.get(task) for task in args.on)}.values())
    for entry, _, _ in runs:
        if any(other.key == entry.key for other in tested):
            raise SegbookError(f"--on {entry.key}: that is the dataset the run trained on; plain `segbook evaluate` "
                               "scores its test split")
        for other in tested:
            pair(entry, other, label_map, args.channels).require_usable()
    for other in tested:  # every tested dataset's data is there before the first prediction
        labelled_cases(other, Paths.from_env(), args.on_all_cases)
    for entry, spec, folder in runs:
        for other in tested:
            result = evaluate_external(entry, spec, other, settings=settings, label_map=label_map,
                                       all_cases=args.on_all_cases, device=args.device,
                                       num_processes=args.num_processes, keep_predictions=args.keep_predictions,
                                       force=args.force, run_folder=folder, threads=args.threads,
                                       channels=args.channels)
            _print_summary(result)
    return 0


def _runs(args: argparse.Namespace, registry) -> list[tuple]:
    """(entry, spec, folder) of each run named: the run folder, or one per seed, fraction and budget of the
    configuration (a budget named as `finetune` names it: none where it is the recipe's own)."""
    from pathlib import Path

    from segbook.errors import SegbookError
    from segbook.evaluation.evaluate import spec_from_folder
    from segbook.paths import Paths
    from segbook.plan import plans_identifier
    from segbook.runs import RunSpec
    from segbook.training.finetune import run_planner

    if args.run and (args.plans, args.normalization, args.weights) != ("default", "task", None):
        raise SegbookError("--run DIR names the run, plans included; --plans, --normalization and --weights are for "
                           "--task/--model")
    if args.run:
        folder = Path(args.run).expanduser()
        spec = spec_from_folder(folder)
        return [(registry.get(spec.task), spec, folder)]
    if not (args.task and args.model):
        raise SegbookError("name the run: --task and --model (with --pretrained or --scratch), or --run DIR")
    seeds, fractions = seeds_and_fractions_from_args(args)
    budgets = budgets_from_args(args)
    entry = registry.get(args.task)
    _recorded_model(args.model, entry)
    plans = plans_identifier(run_planner(args.model, args.pretrained, args.plans, args.normalization, args.weights,
                                         Paths.from_env()))
    named = _named_budgets(RunSpec.of(entry, args.model, args.pretrained, args.fold, recipe=args.recipe), budgets)
    return [(entry, RunSpec.of(entry, args.model, args.pretrained, args.fold, recipe=args.recipe, seed=seed,
                               fraction=fraction, budget=budget, plans=plans), None)
            for seed in seeds for fraction in fractions for budget in named]


def _named_budgets(spec, budgets: list[int | None]) -> list[int | None]:
    """The budgets as the runs' names say them: the recipe's own budget is the run without a suffix."""
    from segbook.recipes import get_recipe
    from segbook.runs import named_budget

    recipe_epochs = get_recipe(spec.recipe, spec.init).budget.epochs
    return [named_budget(budget, recipe_epochs) for budget in budgets]


def _recorded_model(model: str, entry) -> None:
    """A user's model that no flag names: its backbone as one of its runs of the task recorded it (strictly: the
    recorded file, unchanged), so `--task --model` needs no --backbone-file either."""
    from segbook.backbones import is_known
    from segbook.paths import Paths
    from segbook.runs import CONFIGURATION, TRAINER_PREFIX, require_recorded_backbone

    if is_known(model) or not model.replace("-", "").isalnum():
        return
    pattern = f"{TRAINER_PREFIX}_{model}_*__*__{CONFIGURATION}/fold_*"
    for folder in sorted((Paths.from_env().results / entry.nnunet_name).glob(pattern)):
        require_recorded_backbone(folder)
        return


def _print_summary(result) -> None:
    summary = result.summary
    state = "up to date" if result.skipped else "evaluated"
    external = summary.get("external")
    where = (f"{external['tested_on']}'s {'labelled' if external['cases'] == 'all' else 'test'} cases, "
             f"{external['shift']}" if external else "test cases")
    print(f"{state}: {result.folder} ({summary['num_cases']} {where})")
    for label, values in summary["labels"].items():
        print(f"  {label:>3} {values['name']:<30} Dice {_pct(values['dice'])}  NSD {_pct(values['nsd'])}  "
              f"HD95 {_mm(values['hd95'])}")
    mean = summary["foreground_mean"]
    print(f"  mean over labels: Dice {_pct(mean['dice'])}  NSD {_pct(mean['nsd'])}  HD95 {_mm(mean['hd95'])}")


def _pct(value: float | None) -> str:
    return "   n/a" if value is None or value != value else f"{100 * value:6.2f}"


def _mm(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.2f} mm"
