"""`submit_slurm`: the pending jobs of a matrix as SLURM job arrays that fit the cluster, through submitit, after a
CPU array that prepares their tasks.

`submit_slurm(jobs, ExecutionOptions(...), SlurmOptions(...))`, the shape of `run_local`'s arguments: how each job
runs (its GPUs too: `num_gpus` on cuda, none on the CPU), then the sbatch parameters. Before anything is
submitted: the options' ranges and recipes, the partitions (`sinfo`), the time limit against the partition's, and
the checkpoint of every pretrained job (`segbook.batch.weights`; not for a rehearsal, which reads none) are checked,
so a mistake is one line and nothing is queued. Then (`plan_submission`, which `--dry-run` prints):

1. **Preparation.** The tasks whose jobs will train and are not prepared go out as a CPU array of `PrepareTask`s
   (`SlurmOptions.prepare`: its own partition, CPUs, time and memory), one task each; a preparation that fails is
   recorded and blocks that task's jobs. The GPU arrays wait for the whole CPU array with `afterany` rather than
   `afterok`: a preparation killed outright (out of memory, a node failure) must not strand every GPU array in
   DependencyNeverSatisfied; the jobs of a task that did not get prepared stop at once instead (never planning).
   A task whose preparation an earlier submission left queued or running is not prepared again: the new arrays
   wait for that array too.
2. **Arrays that fit.** The jobs are interleaved by task (one job of each task in turn, each task's longest first)
   so that no wave of running tasks is one dataset, and cut into arrays of at most `MaxArraySize` tasks
   (`scontrol show config`, or `--max-array-size`); `--array-parallelism` is shared among the arrays in proportion
   to their size. At most `--max-submitted` jobs go out, preparation tasks included (default: what the
   controller's MaxJobCount leaves room for); the rest wait for a later `batch submit`. With less room than tasks
   to prepare, only preparations go out: a job goes out only with its task prepared or being prepared.
3. **Time and requeues.** `--time` defaults to the partition's maximum (48:00:00 where it has none). Each job's
   estimate (`segbook.batch.estimate`, at `--gpus-per-job` GPUs) says how many time limits it spans; an array may be
   requeued on timeout as often as its longest job needs, plus `REQUEUE_MARGIN`, unless `--max-timeouts` says how
   often.

Each GPU array task is a `BatchTask` (a `submitit.helpers.Checkpointable`) running the worker's `work` for its job.
SLURM's warning signal (USR2, `signal_delay_s` before the time limit, or on preemption) reaches submitit's handler
only through the trainer, which first saves a checkpoint at the next iteration boundary
(`segbook.training.trainer_parts.stopping`); submitit then requeues the task, whose next run resumes mid-epoch.
SIGTERM (scancel, a time limit without warning) stops the job the same way, without a requeue, and counts as a bad
attempt; the SIGTERM that `scontrol requeue` sends a task on its way out does not (`_terminate_unless_requeued`),
nor does the one of a node failure SLURM requeues the job after (`segbook.batch.attempts`). A stop is one line in
the task's log, not a traceback.
Submissions take turns: one at a time per batch state (`one_submission`), so that two never both send a job. An
sbatch refusal cancels the arrays this call submitted and becomes one line naming the limit or option
(`segbook.batch.cluster.submission_error`).

Files, under `$SEGBOOK_HOME/batch/slurm/<submission>.<array>/`: `submission.json` (`segbook.batch.submissions`: job
ids <-> SLURM ids, the sbatch parameters, the execution options and the `SlurmOptions`, which `batch retry` reuses;
`prepare.json` for the CPU array), and
submitit's folders `<array>_<index>/` with the task's `<array>_<index>_0_log.out` / `_log.err` (appended to across
requeues) and `_result.pkl` once it ended. States come from squeue, these result files and the run manifests, never
from sacct (see docs/slurm_testing.md).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from collections import defaultdict, deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import submitit

from segbook import claims
from segbook.batch.cluster import (ARRAY_OPTIONS, ClusterLimits, SubmissionError, format_minutes, submission_error,
                                   time_minutes)
from segbook.batch.estimate import Estimate, estimate_jobs
from segbook.batch.execute import ExecutionOptions, JobFailed, NotPrepared, record_given_up
from segbook.batch.forecast import budget
from segbook.batch.jobs import Job
from segbook.batch.matrix import JobStatus, plans_of_models, summary_line, survey
from segbook.batch.preparation import (DEFAULT_PLANNERS, models_of, planners_of, prepare_task, preparation_refused,
                                      tasks_to_prepare)
from segbook.batch.signals import forks_die_on_sigterm, raise_terminated
from segbook.batch.submissions import (PREPARE_RECORD, SubmittedTask, new_submission_id, submissions_folder,
                                      write_submission)
from segbook.batch.weights import check_weights
from segbook.batch.worker import stopped, work
from segbook.errors import SegbookError
from segbook.options import Bound, check_all
from segbook.paths import Paths
from segbook.registry import load_registry
from segbook.runs import weights_given
from segbook.squeue import LIVE_STATES, array_of, squeue_states

if TYPE_CHECKING:
    from segbook.registry import DatasetEntry

#: nnU-Net's augmentation wants about this many CPU cores per GPU.
CPUS_PER_GPU = 8
#: nnU-Net's preprocessing processes (nnUNet_def_n_proc's default): the CPUs of a preparation task (fewer where a node
#: of its partition has fewer).
PREPARE_CPUS = 8
#: The claim a submission holds (`one_submission`), in the batch state's claims.
SUBMITTING = "batch__submitting"
#: The time limit where the partition sets none.
FALLBACK_TIME = "48:00:00"
#: Requeues on timeout beyond what a job's estimate needs (estimates are estimates), and where it has none.
REQUEUE_MARGIN = 3
UNKNOWN_ESTIMATE_REQUEUES = 10
BOUNDS = {"cpus_per_job": Bound("--cpus-per-job", int, low=1),
          "array_parallelism": Bound("--array-parallelism", int, low=1),
          "max_timeouts": Bound("--max-timeouts", int, low=0),
          "max_array_size": Bound("--max-array-size", int, low=1),
          "max_submitted": Bound("--max-submitted", int, low=1)}


@dataclass(frozen=True)
class PrepareSlurmOptions:
    """sbatch parameters of the CPU array that prepares tasks (`batch prepare --backend slurm`, and the first stage
    of `batch submit`): default partition, 8 CPUs (or what a node of the partition allows, if less), the partition's
    time limit. `prefix` is how the options are named where they were given (`batch submit`'s --prepare-cpus,
    `batch prepare`'s --cpus)."""

    partition: str | None = None
    time: str | None = None
    cpus: int | None = None  # default: PREPARE_CPUS, at most what a node of the partition allows
    mem: str | None = None
    account: str | None = None
    extra_sbatch: tuple[str, ...] = ()
    prefix: str = "--prepare-"

    @property
    def options(self) -> dict[str, str]:
        """The option names to put in messages (`segbook.batch.cluster.submission_error`)."""
        return {name: f"{self.prefix}{name}" for name in ARRAY_OPTIONS}

    def parameters(self, limits: ClusterLimits) -> dict[str, Any]:
        check_all({"cpus": self.cpus}, {"cpus": Bound(self.options["cpus"], int, low=1)})
        limits.check_partition(self.partition, self.options["partition"])
        minutes = _time_limit(self.time, self.partition, limits, self.options["time"])
        cpus = limits.cpus(self.cpus, PREPARE_CPUS, self.partition, self.options["cpus"])
        return _sbatch_values("segbook-prepare", self.partition, minutes, cpus, None, self.mem, self.account,
                              self.extra_sbatch)


@dataclass(frozen=True)
class SlurmOptions:
    """sbatch parameters of every GPU array task (`--extra-sbatch` entries are "key=value" or "flag") and how the
    arrays are cut; the GPUs per task are the execution options' (`ExecutionOptions.gpus_per_job`). Each submission
    records them (`submission.json`), for `batch retry` to send a job back with them (`from_record`)."""

    partition: str | None = None
    time: str | None = None  # default: the partition's maximum (FALLBACK_TIME where it has none)
    cpus_per_job: int | None = None  # default: 8 per GPU (at most what a node allows), 1 for a CPU job
    mem: str | None = None  # sbatch --mem, e.g. "64G"; default: the cluster's
    account: str | None = None
    array_parallelism: int | None = None  # most tasks running at once, over all arrays; default: no limit
    extra_sbatch: tuple[str, ...] = ()
    max_timeouts: int | None = None  # requeues on reaching the time limit; default: from each job's estimate
    max_array_size: int | None = None  # default: the cluster's MaxArraySize
    max_submitted: int | None = None  # default: what the controller's MaxJobCount leaves room for
    prepare: PrepareSlurmOptions = field(default_factory=PrepareSlurmOptions)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "SlurmOptions":
        """The options a submission recorded (`asdict` of them, as JSON keeps it)."""
        prepare = dict(record.get("prepare") or {})
        prepare["extra_sbatch"] = tuple(prepare.get("extra_sbatch", ()))
        return cls(**{**record, "extra_sbatch": tuple(record.get("extra_sbatch", ())),
                      "prepare": PrepareSlurmOptions(**prepare)})

    def updated(self, given: "SlurmOptions") -> "SlurmOptions":
        """These options with each one `given` sets (not None, not empty) in its place: recorded options, changed
        by those given on the command line."""
        def changes(options: Any, skip: tuple[str, ...]) -> dict[str, Any]:
            return {key: value for key, value in vars(options).items()
                    if key not in skip and value is not None and value != ()}

        return replace(self, **changes(given, ("prepare",)),
                       prepare=replace(self.prepare, **changes(given.prepare, ("prefix",))))

    def check(self) -> None:
        check_all({k: v for k, v in asdict(self).items() if k != "prepare"}, BOUNDS)

    def time_limit(self, limits: ClusterLimits) -> int:
        return _time_limit(self.time, self.partition, limits, "--time")

    def parameters(self, gpus_per_job: int, limits: ClusterLimits = ClusterLimits()) -> dict[str, Any]:
        """submitit's `update_parameters` arguments, for tasks of `gpus_per_job` GPUs each (no array yet)."""
        self.check()
        limits.check_partition(self.partition)
        cpus = limits.cpus(self.cpus_per_job, max(1, CPUS_PER_GPU * gpus_per_job), self.partition, "--cpus-per-job")
        return _sbatch_values("segbook", self.partition, self.time_limit(limits), cpus, gpus_per_job or None,
                              self.mem, self.account, self.extra_sbatch)


def _sbatch_values(name: str, partition: str | None, minutes: int, cpus: int, gpus: int | None, mem: str | None,
                   account: str | None, extra_sbatch: Sequence[str]) -> dict[str, Any]:
    extra = dict(_sbatch_pair(item) for item in extra_sbatch)
    if mem:
        extra["mem"] = mem
    values = {"job_name": name, "partition": partition, "time": minutes, "cpus_per_task": cpus,
              "gpus_per_node": gpus, "account": account, "additional_parameters": extra or None}
    return {k: v for k, v in values.items() if v is not None}


def _time_limit(given: str | None, partition: str | None, limits: ClusterLimits, option: str) -> int:
    """The time limit in minutes: the one given (never above the partition's), else the partition's maximum."""
    maximum = limits.partition_time(partition)
    if given is None:
        return maximum or time_minutes(FALLBACK_TIME)
    minutes = time_minutes(given)
    if maximum is not None and minutes > maximum:
        raise SubmissionError(f"{option} {given} exceeds the time limit of partition "
                              f"{partition or limits.default_partition} ({format_minutes(maximum)}); lower it, or "
                              "leave it out to use the partition's maximum")
    return minutes


def _sbatch_pair(item: str) -> tuple[str, str | bool]:
    import re

    key, sep, value = item.lstrip("-").partition("=")
    if not re.fullmatch(r"[a-z][a-z0-9-]*", key):
        raise SegbookError(f"--extra-sbatch {item!r}: expected an sbatch option like qos=high or --exclusive")
    return key, value if sep else True


# --- what runs in the tasks ---------------------------------------------------------------------------------------

class BatchTask(submitit.helpers.Checkpointable):
    """A GPU array task: run one job. Checkpointable, so SLURM's timeout or preemption signal requeues it whole
    (after the trainer saved a checkpoint at the next iteration); the rerun resumes the run where it stopped."""

    def __init__(self, options: ExecutionOptions, paths: Paths):
        self.options = options
        self.paths = paths

    def __call__(self, job_id: str) -> dict[str, Any]:
        _fit_processes_to_allocation(self.options)
        _terminate_unless_requeued()
        try:
            outcome = work(job_id, self.options, self.paths, backend="slurm")
        except KeyboardInterrupt as stop:  # Terminated too: a stop is one line in the task's log, not a traceback
            raise SystemExit(stopped(job_id, stop)) from None
        if outcome.result == "failed":
            raise JobFailed(outcome.message)  # the task ends FAILED in SLURM; the manifest has the details
        if outcome.result == "unprepared":
            raise NotPrepared(outcome.message)
        return asdict(outcome)


class PrepareTask(submitit.helpers.Checkpointable):
    """A CPU array task: prepare one task (`segbook.batch.preparation`). It ends COMPLETED even when the
    preparation failed: the failure is recorded and blocks that task's jobs, whose GPU tasks stop at once.

    `planners` are named as the submitting process registered them; the checkpoint planners among them
    (`--plans checkpoint`, `--normalization checkpoint`) exist only in a process that read the checkpoint, so the
    task registers them again from its options and the jobs' `models` (`registered_planners`), reading the files
    itself."""

    def __init__(self, options: ExecutionOptions, paths: Paths, planners: Sequence[str] = DEFAULT_PLANNERS,
                 models: Sequence[str] = ()):
        self.options = options
        self.paths = paths
        self.planners = tuple(planners)
        self.models = tuple(models)

    def __call__(self, task: str) -> dict[str, Any]:
        _terminate_unless_requeued()
        entry = load_registry(self.options.registry_files).get(task)
        processes = self.options.processes or len(os.sched_getaffinity(0))
        try:
            problem = registered_planners(self.planners, self.models, self.options)
            if problem is not None:
                return asdict(preparation_refused(entry, self.paths, problem))
            return asdict(prepare_task(entry, self.paths, processes=processes, body=self.options.body,
                                       planners=self.planners))
        except KeyboardInterrupt as stop:
            raise SystemExit(stopped(f"preparation of {task}", stop)) from None


def registered_planners(planners: Sequence[str], models: Sequence[str], options: ExecutionOptions) -> str | None:
    """Register in this process the planners of `models`' jobs on the options' plans and normalisation
    (`segbook.batch.matrix.plans_of_models`, the files read here); why one of `planners` cannot be (None when all
    are): a file gone or no longer planned as when the jobs were submitted (another file at its path)."""
    from segbook.backbones import PLANNERS

    try:
        plans_of_models(models, options.plans, options.pretrained_weights, options.normalization)
    except SegbookError as error:
        return f"the jobs' checkpoint planners cannot be made again here: {error}"
    missing = [planner for planner in planners if planner not in PLANNERS]
    if missing:
        files = ", ".join(f"{model}={weights_given(options.pretrained_weights, model)}" for model in models)
        return (f"planner(s) {', '.join(missing)} of the submitted jobs are not those of their checkpoints now "
                f"({files}): a file changed since submission; submit the jobs again")
    return None


def _terminate_unless_requeued() -> None:
    """SIGTERM (scancel, a time limit reached without warning) stops the task as `Terminated`, an attempt that ended
    badly; submitit itself only logs it. Except once submitit has answered SLURM's warning signal: its requeue
    (`scontrol requeue`) makes SLURM send the task SIGTERM while it is on its way out, which must not turn a requeue
    into a bad attempt."""
    requeue = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint_and_try_requeue
    requeuing = False

    def on_warning(signum: int, frame: Any) -> None:
        nonlocal requeuing
        requeuing = True
        requeue(signum, frame)

    def on_term(signum: int, frame: Any) -> None:
        if not requeuing:
            raise_terminated(signum, frame)

    if callable(requeue):
        signal.signal(signal.SIGUSR2, on_warning)
    signal.signal(signal.SIGTERM, on_term)
    forks_die_on_sigterm()  # nnU-Net's pools stop their forked workers with SIGTERM: those must not raise


def _fit_processes_to_allocation(options: ExecutionOptions) -> None:
    """The environment comes from the submitting shell, whose core count (and so nnU-Net's process defaults) is
    not the job's: cap nnU-Net's worker processes by the CPUs SLURM gave this task."""
    cpus = len(os.sched_getaffinity(0))
    os.environ["nnUNet_def_n_proc"] = str(min(int(os.environ.get("nnUNet_def_n_proc") or 8), cpus))
    if options.data_workers is None:
        current = int(os.environ.get("nnUNet_n_proc_DA") or 12)
        os.environ["nnUNet_n_proc_DA"] = str(min(current, cpus - 1))


# --- planning a submission ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ArrayPlan:
    """One GPU array: its jobs in index order, its share of --array-parallelism, its requeues on timeout."""

    jobs: list[Job]
    parallelism: int
    max_timeouts: int


@dataclass(frozen=True)
class SubmissionPlan:
    """What a submission sends: the tasks to prepare, the GPU arrays, and the jobs left for a later submission."""

    prepare: list["DatasetEntry"]
    arrays: list[ArrayPlan]
    held_back: list[Job]
    time_minutes: int
    hours: dict[str, float | None]  # each job's estimated hours on its GPUs (None: no estimate)
    requeues: dict[str, int | None]  # the requeues on timeout each job needs by its estimate
    waits_for: list[str] = field(default_factory=list)  # earlier preparation arrays still queued or running

    def dependency(self, prepare_array: str | None) -> dict[str, str]:
        """sbatch's dependency of the GPU arrays: every preparation array their tasks wait for (`afterany`)."""
        arrays = [*self.waits_for, *([prepare_array] if prepare_array else [])]
        return {"dependency": "afterany:" + ":".join(arrays)} if arrays else {}

    @property
    def jobs(self) -> int:
        return sum(len(array.jobs) for array in self.arrays)


def interleave(jobs: Sequence[Job], hours: dict[str, float | None]) -> list[Job]:
    """One job of each task in turn, in the tasks' order, each task's longest job first: no wave of jobs is one
    task, and the longest jobs start early."""
    by_task: dict[str, deque[Job]] = defaultdict(deque)
    for job in sorted(jobs, key=lambda j: -(hours.get(j.id) or 0.0)):
        by_task[job.entry.key].append(job)
    order = list(dict.fromkeys(job.entry.key for job in jobs))
    queues = [by_task[key] for key in order]
    interleaved = []
    while queues:
        interleaved += [queue.popleft() for queue in queues]
        queues = [queue for queue in queues if queue]
    return interleaved


def share_parallelism(total: int | None, sizes: Sequence[int]) -> list[int]:
    """Each array's share of `total` running tasks, in proportion to its size and at least 1 (largest remainders
    first); no limit (`total` None): each array's own size."""
    if total is None:
        return list(sizes)
    exact = [total * size / sum(sizes) for size in sizes]
    shares = [max(1, math.floor(value)) for value in exact]
    for index in sorted(range(len(sizes)), key=lambda i: exact[i] - math.floor(exact[i]), reverse=True):
        if sum(shares) >= total:
            break
        shares[index] += 1
    return [min(share, size) for share, size in zip(shares, sizes)]


def plan_submission(todo: Sequence[Job], prepare: Sequence["DatasetEntry"], estimates: dict[str, Estimate | None],
                    epochs_done: dict[str, int], options: ExecutionOptions, slurm: SlurmOptions,
                    limits: ClusterLimits, room: int, preparing: Mapping[str, str] | None = None) -> SubmissionPlan:
    """The arrays for `todo` (module docstring), given each job's estimate and epochs trained, and `room`: how many
    jobs (preparation tasks included) may go out now. `prepare`: the tasks to prepare first; `preparing`: {task:
    SLURM id} of preparations an earlier submission left queued or running, which jobs wait for instead.

    With less room than tasks to prepare, only preparations go out; a job goes out only once its task is prepared,
    or being prepared, so that none starts on an unprepared task. The rest is held back for a later submission.
    """
    preparing = preparing or {}
    minutes = slurm.time_limit(limits)
    gpus = max(1, options.gpus_per_job)
    hours = {job.id: None if estimates.get(job.id) is None else
             estimates[job.id].remaining_gpu_hours(epochs_done.get(job.id, 0)) / gpus for job in todo}
    requeues = {key: None if value is None else max(0, math.ceil(value * 60 / minutes) - 1)
                for key, value in hours.items()}
    prepare, unready = list(prepare)[:room], {entry.key for entry in list(prepare)[room:]}
    ordered = interleave(todo, hours)
    ready = [job for job in ordered if job.entry.key not in unready]
    fitting = max(0, room - len(prepare))
    sent, held_back = ready[:fitting], ready[fitting:] + [job for job in ordered if job.entry.key in unready]
    size = slurm.max_array_size or limits.max_array_size
    chunks = [sent[i:i + size] for i in range(0, len(sent), size)]
    shares = share_parallelism(slurm.array_parallelism, [len(chunk) for chunk in chunks])
    arrays = [ArrayPlan(chunk, share, _allowed_requeues(chunk, requeues, slurm.max_timeouts))
              for chunk, share in zip(chunks, shares)]
    tasks = {job.entry.key for job in sent}
    waits_for = sorted({array_of(slurm_id) for task, slurm_id in preparing.items() if task in tasks})
    return SubmissionPlan(prepare, arrays, held_back, minutes, hours, requeues, waits_for)


def _allowed_requeues(jobs: Sequence[Job], requeues: dict[str, int | None], given: int | None) -> int:
    if given is not None:
        return given
    needed = [requeues[job.id] for job in jobs]
    if any(value is None for value in needed):
        return UNKNOWN_ESTIMATE_REQUEUES
    return max(needed) + REQUEUE_MARGIN


# --- submitting ---------------------------------------------------------------------------------------------------

def submit_slurm(jobs: Iterable[Job], options: ExecutionOptions, slurm: SlurmOptions = SlurmOptions(), *,
                 paths: Paths | None = None, dry_run: bool = False,
                 say: Callable[[str], None] = print) -> list[SubmittedTask]:
    """Submit the matrix's pending jobs that no SLURM task is already queued or running for (module docstring).

    Done, running, failed and blocked jobs are skipped, so submitting again submits only what is left. Everything
    that can be checked before submitting is (options, recipes, partitions, time limit, checkpoints). Returns the
    submitted GPU tasks (none on a dry run, which prints the sbatch scripts and every array's jobs instead).
    """
    jobs = list(jobs)
    options.validate(jobs)
    limits = ClusterLimits.read()
    parameters = slurm.parameters(options.gpus_per_job, limits)
    prepare_parameters = slurm.prepare.parameters(limits)
    paths = paths or Paths.from_env()
    with contextlib.nullcontext() if dry_run else one_submission(paths):
        statuses = survey(jobs, paths, weights=options.pretrained_weights)
        record_given_up(statuses, paths)
        todo = _to_submit(statuses, say)
        if not todo:
            return []
        if options.body.reads_weights:  # a rehearsal reads none (segbook.batch.rehearsal)
            check_weights(todo, options.weights_for, paths, say)
        estimates = estimate_jobs(todo, lambda job: budget(job, options, paths), paths)
        epochs_done = {s.job.id: s.epochs_done for s in statuses}
        room = slurm.max_submitted or _controller_room(limits)
        preparing = _queued_preparations(paths)
        prepare = [entry for entry in tasks_to_prepare(todo, paths, options.body) if entry.key not in preparing]
        plan = plan_submission(todo, prepare, estimates, epochs_done, options, slurm, limits, room, preparing)
        submission = new_submission_id()
        if dry_run:
            _print_dry_run(plan, submissions_folder(paths) / submission, parameters, prepare_parameters, say)
            return []
        paths.export()
        tasks = _submit(plan, options, slurm, paths, submission, parameters, prepare_parameters, planners_of(todo),
                        models_of(todo), say)
    if plan.held_back:
        say(f"{len(plan.held_back)} job(s) not submitted: at most {room} may go out now (--max-submitted, or the "
            "room the controller's MaxJobCount leaves); submit again as jobs end")
    return tasks


@contextlib.contextmanager
def one_submission(paths: Paths) -> Iterator[None]:
    """One submission at a time per batch state: a submission reads which jobs are queued, done or prepared, then
    sends the others, so two at once would each send every job. The second is refused, naming the first; the claim
    of a submitter killed outright is taken over (`segbook.claims`)."""
    claim = claims.try_claim(paths.claims, SUBMITTING)
    if not isinstance(claim, claims.Claim):
        raise SegbookError(f"another `segbook batch submit` is submitting from {paths.batch} ({claim.describe()}); "
                           "wait for it to end, then submit again: it sends only what is left")
    with claim.held():
        yield


def _to_submit(statuses: list[JobStatus], say: Callable[[str], None]) -> list[Job]:
    unknown = sum(s.slurm_id is not None and s.slurm_state is None for s in statuses)
    if unknown:
        raise SegbookError(f"squeue did not answer: cannot tell whether {unknown} job(s) submitted before are still "
                           "queued; submit again when it does")
    todo = [s.job for s in statuses if s.state == "pending" and not s.slurm_live]
    queued = sum(s.state == "pending" and s.slurm_live for s in statuses)
    say(f"{summary_line(statuses)}" + (f" ({queued} pending already queued in SLURM)" if queued else "")
        + f"; {len(todo)} to submit")
    return todo


def _controller_room(limits: ClusterLimits) -> int:
    """How many more jobs the controller can hold: MaxJobCount less the jobs it holds now (finished ones count
    until MinJobAge has passed)."""
    try:
        listing = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%i"], capture_output=True,
                                 text=True, timeout=60)
        held = len(listing.stdout.splitlines()) if listing.returncode == 0 else 0
    except (OSError, subprocess.TimeoutExpired):
        held = 0
    return max(0, limits.max_job_count - held)


def _submit(plan: SubmissionPlan, options: ExecutionOptions, slurm: SlurmOptions, paths: Paths, submission: str,
            parameters: dict[str, Any], prepare_parameters: dict[str, Any], planners: Sequence[str],
            models: Sequence[str], say: Callable[[str], None]) -> list[SubmittedTask]:
    """The preparation array, then the GPU arrays waiting for it (and for preparations still queued from earlier
    submissions); on a refusal, cancel what this call sent and say why."""
    submitted: list[str] = []
    folders: list[Path] = []
    tasks: list[SubmittedTask] = []
    try:
        prepare_array = None
        if plan.prepare:
            prepare_array = _submit_preparation(plan.prepare, options, slurm.prepare, paths, submission,
                                                prepare_parameters, folders, planners, models)
            submitted.append(prepare_array)
            say(f"submitted the preparation of {len(plan.prepare)} task(s) as SLURM array {prepare_array}")
        dependency = plan.dependency(prepare_array)
        for number, array in enumerate(plan.arrays):
            sent = _submit_array(plan, number, options, slurm, paths, submission, parameters, dependency, folders)
            submitted.append(array_of(sent[0].slurm_id))
            tasks += sent
    except SubmissionError:
        _cancel(submitted, folders)
        raise
    if plan.arrays:
        say(f"submitted {len(tasks)} job(s) as {len(plan.arrays)} SLURM array(s) "
            f"{', '.join(submitted[-len(plan.arrays):])}"
            + (f" after preparation array(s) {dependency['dependency'].removeprefix('afterany:')}" if dependency
               else "")
            + f" ({submission}); logs: {submissions_folder(paths)}/{submission}.aNNN/<array>_<index>/")
    return tasks


def _submit_preparation(entries: Sequence["DatasetEntry"], options: ExecutionOptions, prepare: PrepareSlurmOptions,
                        paths: Paths, submission: str, parameters: dict[str, Any], folders: list[Path],
                        planners: Sequence[str], models: Sequence[str]) -> str:
    """The CPU array preparing `entries`, recorded in its `prepare.json`; its SLURM array id."""
    folder = submissions_folder(paths) / f"{submission}.prepare"
    folders.append(folder)
    sent = _map_array(folder, 0, parameters, PrepareTask(options, paths, planners, models),
                      [entry.key for entry in entries],
                      f"the preparation array ({len(entries)} tasks)", prepare.options)
    write_submission(folder, [SubmittedTask(f"{submission}.prepare", e.key, t.job_id, folder / "%j")
                              for e, t in zip(entries, sent)], parameters, asdict(options), record=PREPARE_RECORD)
    return array_of(sent[0].job_id)


def _submit_array(plan: SubmissionPlan, number: int, options: ExecutionOptions, slurm: SlurmOptions, paths: Paths,
                  submission: str, parameters: dict[str, Any], dependency: dict[str, str],
                  folders: list[Path]) -> list[SubmittedTask]:
    """GPU array `number` of the plan, recorded in its `submission.json` (with `slurm`, for `batch retry`)."""
    array = plan.arrays[number]
    name = f"{submission}.a{number:03d}"
    folder = submissions_folder(paths) / name
    folders.append(folder)
    values = {**parameters, "array_parallelism": array.parallelism,
              "additional_parameters": {**parameters.get("additional_parameters", {}), **dependency}}
    sent = _map_array(folder, array.max_timeouts, values, BatchTask(options, paths), [job.id for job in array.jobs],
                      f"array {number + 1} of {len(plan.arrays)} ({len(array.jobs)} jobs)")
    tasks = [SubmittedTask(name, job.id, task.job_id, folder / "%j") for job, task in zip(array.jobs, sent)]
    write_submission(folder, tasks, values, asdict(options), slurm=asdict(slurm))
    return tasks


def _queued_preparations(paths: Paths) -> dict[str, str]:
    """{task: SLURM array task} of the preparations earlier submissions sent that are still queued or running: jobs
    submitted now wait for them rather than preparing their tasks a second time."""
    latest: dict[str, SubmittedTask] = {}
    for path in sorted(submissions_folder(paths).glob(f"*/{PREPARE_RECORD}")):  # ids start with their time
        record = json.loads(path.read_text())
        for item in record["jobs"]:
            latest[item["job"]] = SubmittedTask(record["id"], item["job"], item["slurm_id"], Path(record["folder"]))
    if not latest:
        return {}
    queue = squeue_states({array_of(task.slurm_id) for task in latest.values()}) or {}
    return {key: task.slurm_id for key, task in latest.items()
            if queue.get(task.slurm_id) in LIVE_STATES and not task.finished()}


def _map_array(folder: Path, max_timeouts: int, parameters: dict[str, Any], task: Any, items: list[str],
               what: str, options: dict[str, str] = ARRAY_OPTIONS) -> list[Any]:
    """One array through submitit; sbatch's refusal as a `SubmissionError` naming `options` (submitit's own print of
    it muted)."""
    executor = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=max_timeouts)
    executor.update_parameters(**parameters)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return executor.map_array(task, items)
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as error:
        raise submission_error(str(error), what, options) from None


def _cancel(arrays: list[str], folders: list[Path]) -> None:
    """Take back what a refused submission had sent, so that nothing half-submitted stays queued or recorded."""
    if arrays:
        subprocess.run(["scancel", *arrays], capture_output=True, timeout=60)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def _print_dry_run(plan: SubmissionPlan, folder: Path, parameters: dict[str, Any], prepare_parameters: dict[str, Any],
                   say: Callable[[str], None]) -> None:
    from submitit.slurm.slurm import _make_sbatch_string

    command = f"{sys.executable} -u -m submitit.core._submit "
    dependency = plan.dependency("<preparation array>" if plan.prepare else None)
    say(f"dry run: {plan.jobs} job(s) in {len(plan.arrays)} array(s)"
        + (f" after a preparation array of {len(plan.prepare)} task(s)" if plan.prepare else "")
        + f"; time limit {format_minutes(plan.time_minutes)}"
        + (f"; {len(plan.held_back)} job(s) held back (--max-submitted)" if plan.held_back else ""))
    if plan.prepare:
        script = _make_sbatch_string(command=command + str(folder) + ".prepare/%j", folder=f"{folder}.prepare/%j",
                                     map_count=len(plan.prepare), **prepare_parameters)
        say(f"the preparation array's sbatch script:\n{script}")
        say("preparation index -> task:\n" + "\n".join(f"  {i:>5}  {e.key}" for i, e in enumerate(plan.prepare)))
    for number, array in enumerate(plan.arrays):
        values = {**parameters, "array_parallelism": array.parallelism,
                  "additional_parameters": {**parameters.get("additional_parameters", {}), **dependency}}
        if number == 0:
            script = _make_sbatch_string(command=command + f"{folder}.a000/%j", folder=f"{folder}.a000/%j",
                                         map_count=len(array.jobs), **values)
            say(f"array 1's sbatch script (the others differ in --array and their folder):\n{script}")
        say(f"array {number + 1} of {len(plan.arrays)}: {len(array.jobs)} job(s), at most {array.parallelism} at "
            f"once, up to {array.max_timeouts} requeue(s) on timeout; index -> job (estimated hours, requeues it "
            "needs):\n" + "\n".join(f"  {i:>5}  {job.id}  ({_hours(plan.hours[job.id])}, "
                                    f"{_count(plan.requeues[job.id])})" for i, job in enumerate(array.jobs)))


def _hours(value: float | None) -> str:
    return "no estimate" if value is None else f"{value:.1f} h"


def _count(value: int | None) -> str:
    return "?" if value is None else str(value)


def submit_preparation(entries: Sequence["DatasetEntry"], options: ExecutionOptions,
                       prepare: PrepareSlurmOptions = PrepareSlurmOptions(), *, paths: Paths | None = None,
                       dry_run: bool = False, planners: Sequence[str] = DEFAULT_PLANNERS,
                       models: Sequence[str] = (), say: Callable[[str], None] = print) -> list[SubmittedTask]:
    """`segbook batch prepare --backend slurm`: the tasks as a CPU array of `PrepareTask`s, nothing waiting on it."""
    limits = ClusterLimits.read()
    parameters = prepare.parameters(limits)
    paths = paths or Paths.from_env()
    entries = list(entries)
    submission = new_submission_id() + ".prepare"
    folder = submissions_folder(paths) / submission
    if dry_run:
        from submitit.slurm.slurm import _make_sbatch_string

        script = _make_sbatch_string(command=f"{sys.executable} -u -m submitit.core._submit {folder}/%j",
                                     folder=f"{folder}/%j", map_count=len(entries), **parameters)
        say(f"dry run: would submit this sbatch script (array of {len(entries)}):\n{script}")
        say("array index -> task:\n" + "\n".join(f"  {i:>5}  {e.key}" for i, e in enumerate(entries)))
        return []
    paths.export()
    sent = _map_array(folder, 0, parameters, PrepareTask(options, paths, planners, models), [e.key for e in entries],
                      f"the preparation array ({len(entries)} tasks)", prepare.options)
    tasks = [SubmittedTask(submission, e.key, t.job_id, folder / "%j") for e, t in zip(entries, sent)]
    write_submission(folder, tasks, parameters, asdict(options), record=PREPARE_RECORD)
    say(f"submitted the preparation of {len(entries)} task(s) as SLURM array {sent[0].job_id.split('_')[0]}; "
        f"logs: {folder}/<array>_<index>/; `segbook batch status` shows the outcome per task")
    return tasks
