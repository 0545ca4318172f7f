"""`submit_slurm`: the pending jobs of a matrix as one SLURM job array, through submitit.

`submit_slurm(jobs, ExecutionOptions(...), SlurmOptions(...))`, the shape of `run_local`'s arguments: how each job
runs (its GPUs too: `num_gpus` on cuda, none on the CPU), then the sbatch parameters. Each array task is a
`BatchTask` (a `submitit.helpers.Checkpointable`): it runs the worker (`segbook.batch.worker.work`) for its job.
On timeout or preemption SLURM sends USR2; submitit then pickles the task again (`checkpoint()` returns a
DelayedSubmission of the task itself), requeues it and exits, and the requeued run claims the job again and resumes
the run from its latest checkpoint (the manifest records "interrupted", then "resumed").

Files, under `$SEGBOOK_HOME/batch/slurm/<submission>/`: `submission.json` (`segbook.batch.submissions`: job ids
<-> SLURM ids, the sbatch parameters and the execution options), and submitit's folders `<array>_<index>/` with the
task's `<array>_<index>_0_log.out` / `_log.err` (appended to across requeues) and `_result.pkl` once it ended.
States come from squeue, these result files and the run manifests, never from sacct (see docs/slurm_testing.md).
"""

from __future__ import annotations

import math
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import submitit

from segbook.batch.execute import ExecutionOptions, JobFailed
from segbook.batch.matrix import Job, summary_line, survey
from segbook.batch.submissions import SubmittedTask, submissions_folder, write_submission
from segbook.batch.worker import work
from segbook.errors import SegbookError
from segbook.options import Bound, check_all
from segbook.paths import Paths

#: nnU-Net's augmentation wants about this many CPU cores per GPU.
CPUS_PER_GPU = 8
BOUNDS = {"cpus_per_job": Bound("--cpus-per-job", int, low=1),
          "array_parallelism": Bound("--array-parallelism", int, low=1),
          "max_timeouts": Bound("--max-timeouts", int, low=0)}


@dataclass(frozen=True)
class SlurmOptions:
    """sbatch parameters of every task of the array (`--extra-sbatch` entries are "key=value" or "flag"); the
    GPUs per task are the execution options' (`ExecutionOptions.gpus_per_job`)."""

    partition: str | None = None
    time: str = "48:00:00"
    cpus_per_job: int | None = None  # default: 8 per GPU, 1 for a CPU job
    mem: str | None = None  # sbatch --mem, e.g. "64G"; default: the cluster's
    account: str | None = None
    array_parallelism: int | None = None
    extra_sbatch: tuple[str, ...] = ()
    max_timeouts: int = 10  # requeues after reaching the time limit (preemptions do not count)

    def parameters(self, gpus_per_job: int) -> dict[str, Any]:
        """submitit's `update_parameters` arguments, for tasks of `gpus_per_job` GPUs each."""
        check_all(asdict(self), BOUNDS)
        extra = dict(_sbatch_pair(item) for item in self.extra_sbatch)
        if self.mem:
            extra["mem"] = self.mem
        values = {"job_name": "segbook", "partition": self.partition, "time": time_minutes(self.time),
                  "cpus_per_task": self.cpus_per_job or max(1, CPUS_PER_GPU * gpus_per_job),
                  "gpus_per_node": gpus_per_job or None, "account": self.account,
                  "array_parallelism": self.array_parallelism, "additional_parameters": extra or None}
        return {k: v for k, v in values.items() if v is not None}


def _sbatch_pair(item: str) -> tuple[str, str | bool]:
    key, sep, value = item.lstrip("-").partition("=")
    if not re.fullmatch(r"[a-z][a-z0-9-]*", key):
        raise SegbookError(f"--extra-sbatch {item!r}: expected an sbatch option like qos=high or --exclusive")
    return key, value if sep else True


def time_minutes(text: str) -> int:
    """SLURM's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in whole minutes."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise SegbookError(f"--time {text!r}: expected a SLURM time such as 48:00:00, 2-00:00:00 or 90 (minutes)")
    days, first, second, third = (int(g) if g else None for g in match.groups())
    if days is not None:  # D-H[:M[:S]]
        seconds = ((days * 24 + first) * 60 + (second or 0)) * 60 + (third or 0)
    elif third is not None:  # H:M:S
        seconds = (first * 60 + second) * 60 + third
    else:  # M or M:S
        seconds = first * 60 + (second or 0)
    if seconds <= 0:
        raise SegbookError(f"--time {text!r} must be positive")
    return math.ceil(seconds / 60)


class BatchTask(submitit.helpers.Checkpointable):
    """An array task: run one job. Checkpointable, so SLURM's timeout or preemption signal requeues it whole;
    the rerun resumes the run from its latest checkpoint (nnU-Net saves one every `checkpoint_every` epochs)."""

    def __init__(self, options: ExecutionOptions, paths: Paths):
        self.options = options
        self.paths = paths

    def __call__(self, job_id: str) -> dict[str, Any]:
        _fit_processes_to_allocation(self.options)
        outcome = work(job_id, self.options, self.paths, backend="slurm")
        if outcome.result == "failed":
            raise JobFailed(outcome.message)  # the task ends FAILED in SLURM; the manifest has the details
        return asdict(outcome)


def _fit_processes_to_allocation(options: ExecutionOptions) -> None:
    """The environment comes from the submitting shell, whose core count (and so nnU-Net's process defaults) is
    not the job's: cap nnU-Net's worker processes by the CPUs SLURM gave this task."""
    cpus = len(os.sched_getaffinity(0))
    os.environ["nnUNet_def_n_proc"] = str(min(int(os.environ.get("nnUNet_def_n_proc") or 8), cpus))
    if options.data_workers is None:
        current = int(os.environ.get("nnUNet_n_proc_DA") or 12)
        os.environ["nnUNet_n_proc_DA"] = str(min(current, cpus - 1))


def submit_slurm(jobs: Iterable[Job], options: ExecutionOptions, slurm: SlurmOptions = SlurmOptions(), *,
                 paths: Paths | None = None, dry_run: bool = False,
                 say: Callable[[str], None] = print) -> list[SubmittedTask]:
    """Submit the matrix's pending jobs that no SLURM task is already queued or running for, as one array.

    Done, running, failed and blocked jobs are skipped, so submitting again submits only what is left. Options out
    of range and recipes that do not fit their jobs are refused before anything is submitted. Returns the submitted
    tasks (none on a dry run, which prints the sbatch script and the jobs instead).
    """
    jobs = list(jobs)
    options.validate(jobs)
    parameters = slurm.parameters(options.gpus_per_job)
    paths = paths or Paths.from_env()
    statuses = survey(jobs, paths, weights=options.pretrained_weights)
    unknown = sum(s.slurm_id is not None and s.slurm_state is None for s in statuses)
    if unknown:
        raise SegbookError(f"squeue did not answer: cannot tell whether {unknown} job(s) submitted before are still "
                           "queued; submit again when it does")
    todo = [s.job for s in statuses if s.state == "pending" and not s.slurm_live]
    queued = sum(s.state == "pending" and s.slurm_live for s in statuses)
    say(f"{summary_line(statuses)}" + (f" ({queued} pending already queued in SLURM)" if queued else "")
        + f"; {len(todo)} to submit")
    if not todo:
        return []
    submission = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
    folder = submissions_folder(paths) / submission
    if dry_run:
        _print_dry_run(todo, folder, parameters, say)
        return []
    paths.export()
    executor = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=slurm.max_timeouts)
    executor.update_parameters(**parameters)
    submitted = executor.map_array(BatchTask(options, paths), [job.id for job in todo])
    tasks = [SubmittedTask(submission, job.id, task.job_id, folder / "%j") for job, task in zip(todo, submitted)]
    write_submission(folder, tasks, parameters, asdict(options))
    say(f"submitted {len(tasks)} job(s) as SLURM array {tasks[0].slurm_id.split('_')[0]} ({submission}); "
        f"logs: {folder}/<array>_<index>/<array>_<index>_0_log.out")
    return tasks


def _print_dry_run(jobs: list[Job], folder: Path, parameters: dict[str, Any], say: Callable[[str], None]) -> None:
    from submitit.slurm.slurm import _make_sbatch_string

    script = _make_sbatch_string(command="python -u -m submitit.core._submit " + str(folder / "%j"),
                                 folder=folder / "%j", map_count=len(jobs), **parameters)
    say(f"dry run: would submit this sbatch script (array of {len(jobs)}):\n{script}")
    say("array index -> job:\n" + "\n".join(f"  {i:>5}  {job.id}" for i, job in enumerate(jobs)))
