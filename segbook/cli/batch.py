"""`segbook batch`: the benchmark matrix as resumable jobs: plan it, prepare its tasks, run it on local GPUs,
submit it to SLURM, follow it, retry what failed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segbook.cli.common import (POSITIVE_NUMBER, HelpFormatter, add_backbone_file_option, add_batch_weights_option,
                                add_registry_option, add_seed_and_fraction_options, add_training_options, at_least,
                                load_backbone_files, model_help, training_settings_from_args)

if TYPE_CHECKING:
    from segbook.batch.execute import ExecutionOptions
    from segbook.batch.forecast import Forecast
    from segbook.batch.jobs import Job
    from segbook.batch.retry import LastRun
    from segbook.batch.slurm import SlurmOptions

TABLE_FORMATS = ("table", "md", "csv", "json")
#: The options of the selection that apply to the jobs of --jobs FILE too; the others pick jobs from the matrix.
LISTED_TOO = {"jobs", "plans", "normalization", "registry", "backbone_file"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "batch", help="the benchmark matrix as resumable jobs: plan, prepare, run locally, submit to SLURM, status, "
                      "retry",
        description="Jobs are (task, model, initialisation, recipe, seed, training fraction, budget, fold) runs. Their "
                    "tasks are prepared (planned, preprocessed, split) first, on CPUs; a job then trains (resuming "
                    "from its latest checkpoint) and evaluates; a done job is skipped, a claim per job keeps two "
                    "launchers (or a requeued SLURM task and its predecessor) from running it twice. See "
                    "docs/batch.md.")
    commands = parser.add_subparsers(dest="batch_command", metavar="SUBCOMMAND")
    commands.required = True
    _register_plan(commands)
    _register_prepare(commands)
    _register_run(commands)
    _register_submit(commands)
    _register_status(commands)
    _register_retry(commands)
    _register_worker(commands)


def _subparser(commands: argparse._SubParsersAction, name: str, help: str, description: str,
               example: str) -> argparse.ArgumentParser:
    return commands.add_parser(name, help=help, description=description, epilog=f"example: {example}",
                               formatter_class=HelpFormatter)


def _add_selection(parser: argparse.ArgumentParser) -> None:
    from segbook.backbones import study_models

    group = parser.add_argument_group("which jobs (the matrix)")
    group.add_argument("--tasks", default="all", help="'all' or comma-separated tasks (613,004,Task009_Spleen)")
    group.add_argument("--jobs", metavar="FILE", default=None,
                       help="the jobs a job file lists (one job id a line, '#' comments; `batch plan --write-jobs` "
                            "writes one) instead of the matrix of --tasks, --models, ... and their filters; every "
                            "line is checked before anything starts")
    group.add_argument("--scale", help="small, medium or large datasets only")
    group.add_argument("--modality", help="CT, MRI, CT&PET or Ultrasound only")
    group.add_argument("--target", help="seen, unseen, lesion or structure+lesion only")
    group.add_argument("--region", help="one body region only (e.g. abdomen, thorax)")
    group.add_argument("--models", default=",".join(study_models()), help=model_help("comma-separated backbones"))
    add_backbone_file_option(group)
    group.add_argument("--init", default="pretrained,scratch", help="pretrained, scratch or both")
    group.add_argument("--plans", default="default", choices=["default", "checkpoint"],
                       help="default (each backbone's own) or checkpoint: every job of a model, pretrained and "
                            "scratch, planned around its nnssl file (--weights resenc-l=FILE; "
                            "SegbookCheckpoint{arch}_{hash}Plans); a model without one is refused")
    group.add_argument("--normalization", default="task", choices=["task", "checkpoint"],
                       help="task (each task's plans) or checkpoint: every job of a model, pretrained and scratch, "
                            "preprocessed as its file (--weights MODEL=FILE) was pretrained, under plans of their own "
                            "({plans}_ZScoreNorm; scratch jobs load nothing from it); a model without a file is "
                            "refused")
    group.add_argument("--recipes", default=None,
                       help="fine-tuning recipes of the pretrained jobs, comma-separated, or 'all' (`segbook "
                            "recipes` lists them); one job per recipe; scratch jobs train with their model's scratch "
                            "recipe, 'scratch' (default: each model's own, 'segbook' for the built-in ones)")
    add_seed_and_fraction_options(group)
    group.add_argument("--folds", default="all",
                       help="'all' is nnU-Net's fold all (the whole train split, SegBook's protocol); 0-4 are "
                            "cross-validation folds; comma-separated")
    add_registry_option(group)
    parser.set_defaults(matrix_options={action.dest: (action.option_strings[0], action.default)
                                        for action in group._group_actions if action.dest not in LISTED_TOO})


def _add_recipe_files(parser: argparse.ArgumentParser) -> None:
    """--recipe-file for the commands without training options (which have it): --recipes may name the user's."""
    parser.add_argument("--recipe-file", metavar="FILE", action="append", default=[],
                        help="your own recipes (YAML), added to the built-in ones (repeatable; also SEGBOOK_RECIPES)")


def _add_execution(parser: argparse.ArgumentParser) -> None:
    add_training_options(parser)
    group = parser.add_argument_group("each job")
    group.add_argument("--gpus-per-job", type=at_least(0), default=1,
                       help="GPUs per job (nnU-Net DDP when > 1; 0 for CPU jobs on SLURM)")
    group.add_argument("--processes", type=at_least(1), default=None,
                       help="processes for planning and evaluation (default: nnUNet_def_n_proc)")
    group.add_argument("--data-workers", type=at_least(0), default=None,
                       help="nnU-Net's augmentation workers per job (nnUNet_n_proc_DA; default: the environment's, "
                            "capped by the CPUs of a SLURM job; shared among the ranks of a multi-GPU job)")
    group.add_argument("--max-attempts", type=at_least(1), default=3,
                       help="attempts of a job that may end badly (killed: out of memory, kill -9, a node failure; "
                            "terminated: scancel, SIGTERM) before it is failed; requeues and Ctrl-C do not count")


def _add_local(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("this machine")
    group.add_argument("--gpus", help="comma-separated GPU ids to use (default: all visible)")
    group.add_argument("--workers", type=at_least(1), default=None,
                       help="jobs at once (default: 1 on cpu or mps; on cuda, one per --gpus-per-job GPUs)")


def _add_slurm(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SLURM (job arrays through submitit)")
    group.add_argument("--partition", help="partition of the GPU jobs (default: the cluster's)")
    group.add_argument("--time", default=None,
                       help="time limit per job (default: the partition's maximum, 48:00:00 where it has none); a "
                            "job that reaches it saves a checkpoint, is requeued and resumes")
    group.add_argument("--cpus-per-job", type=at_least(1), default=None,
                       help="default: 8 per GPU (or what a node of the partition allows if less), 1 without GPU; "
                            "more than a node allows is refused")
    group.add_argument("--mem", help="memory per job, as sbatch --mem (e.g. 64G; default: the cluster's)")
    group.add_argument("--account", help="account to charge")
    group.add_argument("--array-parallelism", type=at_least(1), default=None,
                       help="most jobs running at once, shared among the arrays (default: no limit of segbook's)")
    group.add_argument("--extra-sbatch", action="append", default=[], metavar="OPTION",
                       help="another sbatch option, as --extra-sbatch=--qos=high or --extra-sbatch constraint=a100 "
                            "(repeatable; signal=USR2@300 gives a slow file system more time to save)")
    group.add_argument("--max-timeouts", type=at_least(0), default=None,
                       help="requeues of a job on reaching its time limit (default: what its estimate needs, plus 3; "
                            "preemptions do not count)")
    group.add_argument("--max-array-size", type=at_least(1), default=None,
                       help="most jobs per array (default: the cluster's MaxArraySize, from scontrol)")
    group.add_argument("--max-submitted", type=at_least(1), default=None,
                       help="most jobs submitted now, preparation included (default: the room the cluster's "
                            "MaxJobCount leaves; set it below your QOS's limit); the rest go out on the next submit")
    group.add_argument("--dry-run", action="store_true", help="print the sbatch scripts and every array's jobs; "
                                                              "submit nothing")
    prepare = parser.add_argument_group("SLURM: the CPU array that prepares the tasks first (when some need it)")
    _add_prepare_slurm(prepare, "--prepare-")


def _add_prepare_slurm(group: argparse._ArgumentGroup, prefix: str) -> None:
    group.add_argument(f"{prefix}partition", default=None, help="partition of the preparation (default: the "
                                                                "cluster's)")
    group.add_argument(f"{prefix}time", default=None, help="time limit per task (default: the partition's maximum)")
    group.add_argument(f"{prefix}cpus", type=at_least(1), default=None,
                       help="CPUs per task, nnU-Net's preprocessing processes (default: 8, or what a node of the "
                            "partition allows if less; more than that is refused)")
    group.add_argument(f"{prefix}mem", default=None, help="memory per task, as sbatch --mem")


def _register_plan(commands: argparse._SubParsersAction) -> None:
    parser = _subparser(commands, "plan", "the job matrix with each job's state and its GPU-hours",
                        "Lists the jobs of the selection with their state (done, running, failed, pending, blocked) "
                        "and an estimate of GPU-hours from the network's FLOPs, the task's plans (or its reference "
                        "patch before planning) and the training budget, with totals.",
                        "segbook batch plan --tasks all --models base,large,huge,nnunet --recipes segbook,llrd")
    _add_selection(parser)
    add_training_options(parser)
    parser.add_argument("--assumed-tflops", type=POSITIVE_NUMBER, default=None,
                        help="sustained training throughput of one GPU in TFLOP/s (default: 40, an A100's; measure "
                             "yours with scripts/bench_train.py; see docs/batch.md)")
    parser.add_argument("--time", default=None, help="a SLURM time limit per job: adds how many requeues each job "
                                                     "needs to finish within it")
    parser.add_argument("--gpus-per-job", type=at_least(1), default=1, help="GPUs per job (for --time)")
    parser.add_argument("--state", help="only jobs in these states (comma-separated)")
    parser.add_argument("--format", choices=TABLE_FORMATS, default="table")
    study = parser.add_argument_group("a study planner (docs/batch.md, 'Planning a study to a budget')")
    study.add_argument("--gpu-hours", type=POSITIVE_NUMBER, default=None, metavar="N",
                       help="choose the datasets (each with all its jobs of the selection) that fit N GPU-hours, "
                            "stratified by scale x modality x target, and print per stratum what was chosen and the "
                            "expected 95%% CI half-width of Delta(PT) per scale group, from the store's results")
    study.add_argument("--write-jobs", metavar="FILE", default=None,
                       help="with --gpu-hours: write the chosen jobs to FILE (one job id a line) for `batch run "
                            "--jobs FILE` or `batch submit --jobs FILE`")
    parser.set_defaults(handler=run_plan)


def _register_prepare(commands: argparse._SubParsersAction) -> None:
    parser = _subparser(commands, "prepare", "plan, preprocess and split the matrix's tasks, here or as a CPU array",
                        "Plans and preprocesses each task of the selection (nothing to do when its plans are "
                        "current) and writes nnU-Net's cross-validation splits once, here (--backend local) or as a "
                        "CPU job array on SLURM (--backend slurm). Jobs never plan: `batch run` prepares in the "
                        "launcher first, `batch submit` submits this array before the GPU arrays, which wait for "
                        "it. Each task's outcome is recorded; a failed preparation blocks the task's jobs.",
                        "segbook batch prepare --tasks all --backend slurm --partition cpu --cpus 16")
    parser.add_argument("--backend", choices=["local", "slurm"], default="local",
                        help="here, on this machine, or as SLURM job arrays")
    _add_selection(parser)
    add_batch_weights_option(parser)
    _add_recipe_files(parser)
    parser.add_argument("--processes", type=at_least(1), default=None,
                        help="nnU-Net's preprocessing processes (default: nnUNet_def_n_proc; on SLURM the task's "
                             "CPUs)")
    group = parser.add_argument_group("SLURM (--backend slurm)")
    _add_prepare_slurm(group, "--")
    group.add_argument("--account", help="account to charge")
    group.add_argument("--extra-sbatch", action="append", default=[], metavar="OPTION",
                       help="another sbatch option (repeatable)")
    group.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    parser.set_defaults(handler=run_prepare)


def _register_run(commands: argparse._SubParsersAction) -> None:
    parser = _subparser(commands, "run", "run the pending jobs on this machine, one per GPU, as a queue",
                        "Prepares the tasks that need it (here, on the CPU), then runs every pending job of the "
                        "selection, each in its own process on its GPU(s) (or on CPU workers). Ctrl-C stops cleanly "
                        "(the running jobs save a checkpoint and resume next time); running it again continues where "
                        "it stopped. Exit status 1 when a job failed or was killed.",
                        "segbook batch run --tasks 613,004 --gpus 0,1,2,3")
    _add_selection(parser)
    _add_execution(parser)
    _add_local(parser)
    parser.set_defaults(handler=run_run)


def _register_submit(commands: argparse._SubParsersAction) -> None:
    parser = _subparser(commands, "submit", "submit the pending jobs as SLURM job arrays, after their preparation",
                        "Submits the pending jobs that no SLURM task is queued or running for, as job arrays that "
                        "fit the cluster's limits, through submitit, after a CPU array preparing the tasks that need "
                        "it. Each GPU task trains and evaluates its run; on timeout or preemption it saves a "
                        "checkpoint, requeues and resumes. Submitting again submits only what is left. Logs: "
                        "$SEGBOOK_HOME/batch/slurm/<submission>.<array>/<array>_<index>/.",
                        "segbook batch submit --partition gpu --gpus-per-job 1 --prepare-partition cpu")
    parser.add_argument("--backend", choices=["slurm"], default="slurm", help="the scheduler")
    _add_selection(parser)
    _add_execution(parser)
    _add_slurm(parser)
    parser.set_defaults(handler=run_submit)


def _register_status(commands: argparse._SubParsersAction) -> None:
    parser = _subparser(commands, "status", "each job's state, with live SLURM states and the run manifests",
                        "The matrix with each job's state from its run manifest, evaluation and claim, its progress "
                        "in epochs, its attempts and how the last one ended, and the squeue state of its latest "
                        "SLURM task, then the counts per state.",
                        "segbook batch status --state failed,running")
    _add_selection(parser)
    add_batch_weights_option(parser)
    _add_recipe_files(parser)
    parser.add_argument("--state", help="only jobs in these states (comma-separated)")
    parser.add_argument("--format", choices=TABLE_FORMATS, default="table")
    parser.set_defaults(handler=run_status)


def _register_retry(commands: argparse._SubParsersAction) -> None:
    parser = _subparser(commands, "retry", "make failed jobs pending again and run or submit them where they ran",
                        "Clears the recorded error of every failed job of the selection (the manifest keeps it in a "
                        "'retry' event), then sends each back where its latest attempt ran: submitted to SLURM with "
                        "the sbatch options of its last submission (each SLURM option given here replacing its "
                        "own), or run here. --backend sends them all to one place instead. A failed training "
                        "resumes from its latest checkpoint; a failed evaluation is redone without training.",
                        "segbook batch retry --failed --device cuda --partition gpu")
    parser.add_argument("--failed", action="store_true", required=True, help="retry the failed jobs")
    parser.add_argument("--backend", choices=["local", "slurm"], default=None,
                        help="local (here, on this machine) or slurm (as SLURM job arrays) for every job (default: "
                             "where each job last ran; SLURM jobs with the options of their last submission)")
    _add_selection(parser)
    _add_execution(parser)
    _add_local(parser)
    _add_slurm(parser)
    parser.set_defaults(handler=run_retry)


def _register_worker(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "worker", help="run one job in this process (what `batch run` starts for each job)",
        description="Claims, trains and evaluates one job with the execution options (JSON) a launcher passes; "
                    "its task must be prepared (`segbook batch prepare`). Exit status: 0 done, 1 failed (recorded in "
                    "the manifest), 75 held by another process, 78 its task is not prepared, 130 interrupted, 143 "
                    "terminated (SIGTERM).")
    parser.add_argument("--launcher", type=int, default=None, metavar="PID",
                        help="the process that started this worker: when it dies (even killed outright), the worker "
                             "stops as on Ctrl-C (and is killed with its process group if it hangs)")
    parser.add_argument("--job", required=True, help="the job id (TASK__MODEL__INIT[__RECIPE]__fold_FOLD)")
    parser.add_argument("--options", required=True, help="the execution options as JSON")
    parser.set_defaults(handler=run_worker)


# --- handlers -----------------------------------------------------------------------------------------------------

def _matrix(args: argparse.Namespace) -> list["Job"]:
    from segbook.batch.matrix import MatrixError, build_matrix, on_plans
    from segbook.cli.common import registry_from_args
    from segbook.runs import parse_weights

    load_backbone_files(args)
    if args.jobs is not None:
        return _listed_jobs(args)
    jobs = build_matrix(registry_from_args(args), args.tasks, scale=args.scale, modality=args.modality,
                        target=args.target, region=args.region, models=args.models, inits=args.init,
                        recipes=args.recipes, recipe_files=args.recipe_file, seeds=args.seeds,
                        fractions=args.fractions, budgets=_budgets(args), folds=args.folds)
    jobs = on_plans(jobs, args.plans, parse_weights(getattr(args, "weights", None)), args.normalization)
    if not jobs:
        raise MatrixError("the selection matches no job (nnU-Net's network has no pretrained job; check the "
                          "filters with `segbook tasks`)")
    return jobs


def _listed_jobs(args: argparse.Namespace) -> list["Job"]:
    """The jobs of --jobs FILE, checked line by line, on --plans and --normalization, their recipes checked."""
    from segbook.batch.matrix import MatrixError, check_recipes, on_plans, read_job_file
    from segbook.cli.common import registry_from_args
    from segbook.runs import parse_weights

    given = [option for dest, (option, default) in args.matrix_options.items() if getattr(args, dest) != default]
    if given:
        raise MatrixError(f"--jobs {args.jobs} lists the jobs: leave out {', '.join(given)}, which pick jobs from "
                          "the matrix")
    jobs = read_job_file(registry_from_args(args), args.jobs)
    check_recipes(jobs, args.recipe_file)
    return on_plans(jobs, args.plans, parse_weights(getattr(args, "weights", None)), args.normalization)


def _budgets(args: argparse.Namespace) -> list[int] | None:
    """--budgets, checked (and refused beside --epochs); None: each recipe's own budget."""
    from segbook.cli.common import budgets_from_args

    budgets = budgets_from_args(args)
    return None if budgets == [None] else [budget for budget in budgets if budget is not None]


def _options(args: argparse.Namespace, backend: str) -> "ExecutionOptions":
    from segbook.batch.execute import ExecutionOptions
    from segbook.devices import resolve_device

    # The jobs run here: this machine's best device (or the one asked for, if it has it). On SLURM they run on the
    # cluster's GPU nodes, which the submitting node cannot see.
    device = resolve_device(args.device, print) if backend == "local" else (args.device or "cuda")
    return ExecutionOptions.create(
        registry_files=getattr(args, "registry", None) or [], recipe_files=args.recipe_file, weights=args.weights,
        settings=training_settings_from_args(args), device=device,
        num_gpus=args.gpus_per_job if device == "cuda" else 1, compile=args.compile, processes=args.processes,
        data_workers=args.data_workers, max_attempts=args.max_attempts, plans=getattr(args, "plans", "default"),
        normalization=getattr(args, "normalization", "task"))


def _print(rows: list[dict[str, Any]], totals: list[dict[str, Any]], fmt: str,
           budgets: list[dict[str, Any]] | None = None) -> None:
    """The jobs, then the totals (and, for several budgets, the totals per budget); JSON holds them all in one
    object, CSV only the jobs (one table per stream)."""
    from segbook.cli.output import emit

    if fmt == "json":
        print(json.dumps({"jobs": rows, "totals": totals, **({"budgets": budgets} if budgets else {})}, indent=2,
                         default=str))
        return
    if fmt == "csv":
        emit(rows, fmt)
        return
    if rows:
        emit(rows, fmt)
        print()
    emit(totals, fmt)
    if budgets:
        print()
        emit(budgets, fmt)


def run_status(args: argparse.Namespace) -> int:
    from segbook.batch.matrix import counts, in_states, several_recipes, several_variants, survey
    from segbook.runs import parse_weights

    jobs = _matrix(args)
    statuses = survey(jobs, weights=parse_weights(args.weights))
    recipe, variants = several_recipes(jobs), several_variants(jobs)
    rows = [s.record() if args.format == "json" else s.row(recipe, variants)
            for s in in_states(statuses, args.state)]
    totals = [{"state": state, "jobs": n} for state, n in counts(statuses).items()]
    _print(rows, totals + [{"state": "total", "jobs": len(statuses)}], args.format)
    return 0


def run_plan(args: argparse.Namespace) -> int:
    from segbook.batch.cluster import time_minutes
    from segbook.batch.estimate import DEFAULT_ASSUMED_TFLOPS
    from segbook.batch.execute import ExecutionOptions
    from segbook.batch.forecast import forecast
    from segbook.batch.matrix import several_recipes, several_variants
    from segbook.batch.planner import PlanError

    if args.write_jobs is not None and args.gpu_hours is None:
        raise PlanError("--write-jobs writes the jobs --gpu-hours chooses; give --gpu-hours N")
    if args.write_jobs is not None and not Path(args.write_jobs).expanduser().parent.is_dir():
        raise PlanError(f"--write-jobs {args.write_jobs}: its folder does not exist")
    jobs = _matrix(args)
    options = ExecutionOptions.create(weights=args.weights, settings=training_settings_from_args(args),
                                      recipe_files=args.recipe_file)
    minutes = time_minutes(args.time) if args.time else None
    plan = forecast(jobs, options, assumed_tflops=args.assumed_tflops or DEFAULT_ASSUMED_TFLOPS)
    if args.gpu_hours is not None:
        return _plan_study(plan, args)
    recipe = several_recipes(jobs)
    rows = [c.row(full=args.format == "json", recipe=recipe, time_minutes=minutes, gpus=args.gpus_per_job,
                  variants=several_variants(jobs)) for c in plan.in_states(args.state)]
    budgets = plan.by_budget()
    _print(rows, plan.totals(), args.format, budgets if len(budgets) > 1 else None)
    return 0


def _plan_study(plan: "Forecast", args: argparse.Namespace) -> int:
    """--gpu-hours: the chosen sub-study per stratum, its expected precision, and (--write-jobs) its job file."""
    from segbook.batch.matrix import write_job_file
    from segbook.batch.planner import plan_study
    from segbook.cli.common import registry_from_args
    from segbook.cli.output import emit
    from segbook.paths import Paths

    study = plan_study(plan, args.gpu_hours, Paths.from_env(), registry_from_args(args))
    strata = [s.row() for s in study.strata]
    precision = [p.row() for p in study.precision]
    if args.format == "json":
        print(json.dumps({"summary": study.summary(), "strata": strata, "precision": precision,
                          "jobs": [job.id for job in study.jobs]}, indent=2))
    elif args.format == "csv":  # one table per stream, as the job table
        emit(strata, args.format)
    else:
        print("\n".join(study.summary()) + "\n")
        emit(strata, args.format)
        print("\nexpected precision of Delta(PT) per scale group (95% bootstrap CI half-width, Dice points):")
        emit(precision, args.format)
    if args.write_jobs is not None:
        write_job_file(args.write_jobs, study.jobs,
                       [f"segbook batch plan --gpu-hours {args.gpu_hours:g}: {len(study.jobs)} jobs, "
                        f"{study.gpu_hours:.2f} GPU-hours"])
        if args.format not in ("json", "csv"):
            print(f"\nwrote {len(study.jobs)} jobs to {args.write_jobs}")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from segbook.batch.execute import TRAINING, ExecutionOptions
    from segbook.batch.preparation import models_of, planners_of, prepare_tasks
    from segbook.batch.slurm import PrepareSlurmOptions, submit_preparation

    jobs = _matrix(args)
    entries = list({job.entry.key: job.entry for job in jobs}.values())
    if args.backend == "local":
        outcomes = prepare_tasks(entries, body=TRAINING, processes=args.processes, planners=planners_of(jobs))
        tally = {status: sum(o.status == status for o in outcomes) for status in ("prepared", "failed", "skipped")}
        print("batch prepare: " + ", ".join(f"{n} {status}" for status, n in tally.items() if n)
              + (" (skipped: not imported)" if tally["skipped"] else ""))
        return 1 if tally["failed"] else 0
    # the tasks register the checkpoint planners again from these (segbook.batch.slurm.PrepareTask)
    options = ExecutionOptions.create(registry_files=getattr(args, "registry", None) or [], processes=args.processes,
                                      weights=args.weights, plans=args.plans, normalization=args.normalization)
    prepare = PrepareSlurmOptions(partition=args.partition, time=args.time, cpus=args.cpus, mem=args.mem,
                                  account=args.account, extra_sbatch=tuple(args.extra_sbatch), prefix="--")
    submit_preparation(entries, options, prepare, dry_run=args.dry_run, planners=planners_of(jobs),
                       models=models_of(jobs))
    return 0


def _launch(jobs: list["Job"], args: argparse.Namespace, backend: str, slurm: "SlurmOptions | None" = None) -> int:
    """Run the jobs here (`run_local`) or submit them (`submit_slurm`, with `slurm`, by default the command line's
    options): the same execution options either way."""
    from segbook.batch.local import LocalOptions, run_local
    from segbook.batch.slurm import submit_slurm

    options = _options(args, backend)
    if backend == "local":
        gpus = tuple(g.strip() for g in args.gpus.split(",") if g.strip()) if args.gpus else None
        report = run_local(jobs, options, LocalOptions(gpus=gpus, workers=args.workers))
        return 0 if report.ok else 1
    submit_slurm(jobs, options, slurm or _slurm_options(args), dry_run=args.dry_run)
    return 0


def _slurm_options(args: argparse.Namespace) -> "SlurmOptions":
    """The sbatch options of the command line (None or empty where not given)."""
    from segbook.batch.slurm import PrepareSlurmOptions, SlurmOptions

    prepare = PrepareSlurmOptions(partition=args.prepare_partition, time=args.prepare_time, cpus=args.prepare_cpus,
                                  mem=args.prepare_mem, account=args.account, extra_sbatch=tuple(args.extra_sbatch))
    return SlurmOptions(partition=args.partition, time=args.time, cpus_per_job=args.cpus_per_job, mem=args.mem,
                        account=args.account, array_parallelism=args.array_parallelism,
                        extra_sbatch=tuple(args.extra_sbatch), max_timeouts=args.max_timeouts,
                        max_array_size=args.max_array_size, max_submitted=args.max_submitted, prepare=prepare)


def run_run(args: argparse.Namespace) -> int:
    return _launch(_matrix(args), args, "local")


def run_submit(args: argparse.Namespace) -> int:
    return _launch(_matrix(args), args, "slurm")


def run_retry(args: argparse.Namespace) -> int:
    from segbook.batch.retry import failed_jobs, last_run, reset_failed

    failed = failed_jobs(_matrix(args))
    if not failed:
        print("no failed jobs in the selection")
        return 0
    destinations = _destinations(last_run([s.job for s in failed]), args)
    if args.dry_run:
        print("dry run: would retry\n" + "\n".join(f"  {s.job.id}: {s.detail}; "
                                                   f"{_where(*destinations[s.job.id], args)}" for s in failed))
        return 0
    resets = reset_failed([s.job for s in failed])
    for reset in resets:
        print(f"retry {reset.job.id} (was: {reset.error}); {_where(*destinations[reset.job.id], args)}")
    groups: dict[tuple[str, "SlurmOptions | None"], list["Job"]] = {}
    for reset in resets:
        groups.setdefault(destinations[reset.job.id], []).append(reset.job)
    return max((_launch(jobs, args, backend, slurm) for (backend, slurm), jobs in groups.items()), default=0)


def _destinations(runs: dict[str, "LastRun"],
                  args: argparse.Namespace) -> dict[str, tuple[str, "SlurmOptions | None"]]:
    """Where each job goes: --backend, else where it last ran; for SLURM, the options of its last submission (where
    recorded), each one the command line gives in its place."""
    from segbook.batch.slurm import SlurmOptions

    given = _slurm_options(args)
    where = {}
    for job, run in runs.items():
        backend = args.backend or run.backend
        recorded = SlurmOptions.from_record(run.slurm) if run.slurm else SlurmOptions()
        where[job] = (backend, recorded.updated(given) if backend == "slurm" else None)
    return where


def _where(backend: str, slurm: "SlurmOptions | None", args: argparse.Namespace) -> str:
    why = "as --backend says" if args.backend else "where it last ran"
    if backend == "local":
        return f"runs here ({why})"
    shown = {key: value for key, value in vars(slurm).items() if key != "prepare" and value not in (None, ())}
    return f"goes to SLURM ({why}; {', '.join(f'{k}={v}' for k, v in shown.items()) or 'default options'})"


def run_worker(args: argparse.Namespace) -> int:
    from segbook.batch.worker import main

    return main(args.job, args.options, args.launcher)
