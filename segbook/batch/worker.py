"""The worker: one job, in the process that runs it, for both launchers.

`run_local` starts `segbook batch worker --job ID --options JSON` (`worker_command`) for each job and reads how it
ended from its exit status (`result_of`); a SLURM array task (`segbook.batch.slurm.BatchTask`) runs the same `work`
in the process submitit starts. Either way the worker, not the launcher, claims the job: a launcher killed outright
leaves no job claimed by a dead process.
"""

from __future__ import annotations

import signal
import sys

from segbook.batch.execute import ExecutionOptions, JobOutcome, run_job
from segbook.batch.matrix import Job, job_from_id
from segbook.batch.signals import Terminated, raise_terminated
from segbook.paths import Paths
from segbook.registry import load_registry

#: Exit statuses of `segbook batch worker` by outcome; an interrupted worker exits 130 like every command, a
#: terminated one (SIGTERM) 143.
EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_BUSY = 75  # EX_TEMPFAIL: another process holds the job
EXIT_UNPREPARED = 78  # EX_CONFIG: the job's task is not prepared
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports it
EXIT_CODES = {"done": EXIT_DONE, "failed": EXIT_FAILED, "busy": EXIT_BUSY, "unprepared": EXIT_UNPREPARED}


def worker_command(job: Job, options: ExecutionOptions) -> list[str]:
    """The command line of a worker for `job`, in this Python environment."""
    return [sys.executable, "-m", "segbook.cli.main", "batch", "worker", "--job", job.id,
            "--options", options.to_json()]


def result_of(exit_status: int) -> str | None:
    """"done", "failed", "busy" or "unprepared" for a worker's exit status; None for a worker that was stopped
    (interrupted, terminated, killed, crashed), whose job resumes next time."""
    return {code: result for result, code in EXIT_CODES.items()}.get(exit_status)


def work(job_id: str, options: ExecutionOptions, paths: Paths | None = None, *, backend: str = "local") -> JobOutcome:
    """Run the job `job_id` names (its task from the options' registry files) and print how it ended, for the
    job's log."""
    job = job_from_id(load_registry(options.registry_files), job_id)
    outcome = run_job(job, options, paths, backend=backend)
    message = outcome.message.removeprefix(f"{job_id}: ")  # said once, first
    print(f"segbook batch worker: {job_id}: {outcome.result} {message}".rstrip(), flush=True)
    return outcome


def main(job_id: str, options_json: str) -> int:
    """`segbook batch worker`: run one job here; the exit status says how it ended (`EXIT_CODES`)."""
    signal.signal(signal.SIGTERM, raise_terminated)  # stop like Ctrl-C (recorded, claim released), counted
    try:
        return EXIT_CODES[work(job_id, ExecutionOptions.from_json(options_json)).result]
    except Terminated:
        print(f"segbook batch worker: {job_id}: terminated (SIGTERM)", flush=True)
        return EXIT_TERMINATED
