"""The worker: one job, in the process that runs it, for both launchers.

`run_local` starts `segbook batch worker --launcher PID --job ID --options JSON` (`worker_command`) for each job and
reads how it ended from its exit status (`result_of`); a SLURM array task (`segbook.batch.slurm.BatchTask`) runs the
same `work` in the process submitit starts. Either way the worker, not the launcher, claims the job. A local worker
is bound to its launcher (`segbook.processes`, with SIGHUP): when the launcher dies, even killed outright, the worker
stops as on its Ctrl-C (a checkpoint at the next iteration, its claim released) and the next launcher resumes the
job. A stop
(Ctrl-C, SIGTERM) is said in one line (`stopped`), not as a traceback.
"""

from __future__ import annotations

import os
import signal
import sys

from segbook.batch.execute import ExecutionOptions, JobOutcome, run_job
from segbook.batch.jobs import Job
from segbook.batch.matrix import job_from_id, on_plans
from segbook.batch.signals import Terminated, forks_die_on_sigterm, raise_terminated
from segbook.paths import Paths
from segbook.processes import bind_to_parent
from segbook.registry import load_registry

#: Exit statuses of `segbook batch worker` by outcome; an interrupted worker exits 130 like every command, a
#: terminated one (SIGTERM) 143.
EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_BUSY = 75  # EX_TEMPFAIL: another process holds the job
EXIT_UNPREPARED = 78  # EX_CONFIG: the job's task is not prepared
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports it
EXIT_CODES = {"done": EXIT_DONE, "failed": EXIT_FAILED, "busy": EXIT_BUSY, "unprepared": EXIT_UNPREPARED}
#: How long a worker whose launcher died may take to stop at the next iteration (and save a checkpoint there) before
#: it is killed with its process group: a hung worker must not hold its GPU for good.
LAUNCHER_GONE_GRACE_S = 120.0


def worker_command(job: Job, options: ExecutionOptions) -> list[str]:
    """The command line of a worker for `job`, in this Python environment, bound to this process."""
    return [sys.executable, "-m", "segbook.cli.main", "batch", "worker", "--launcher", str(os.getpid()),
            "--job", job.id, "--options", options.to_json()]


def result_of(exit_status: int) -> str | None:
    """"done", "failed", "busy" or "unprepared" for a worker's exit status; None for a worker that was stopped
    (interrupted, terminated, killed, crashed), whose job resumes next time."""
    return {code: result for result, code in EXIT_CODES.items()}.get(exit_status)


def work(job_id: str, options: ExecutionOptions, paths: Paths | None = None, *, backend: str = "local") -> JobOutcome:
    """Run the job `job_id` names (its task from the options' registry files) and print how it ended, for the
    job's log."""
    job = job_from_id(load_registry(options.registry_files), job_id)
    # a job id names no plans: the options do
    job = on_plans([job], options.plans, options.pretrained_weights, options.normalization)[0]
    outcome = run_job(job, options, paths, backend=backend)
    message = outcome.message.removeprefix(f"{job_id}: ")  # said once, first
    print(f"segbook batch worker: {job_id}: {outcome.result} {message}".rstrip(), flush=True)
    return outcome


def stopped(job_id: str, stop: KeyboardInterrupt, launcher: int | None = None) -> int:
    """Say in one line, on stderr, why a job (or a preparation) stopped before its end; the exit status. A stop is
    ordinary (the job resumes next time): no traceback."""
    if isinstance(stop, Terminated):
        why = ("stopped by SIGTERM (scancel, a time limit reached without warning, SLURM ending the job on a node "
               "failure, or kill)")
    elif launcher is not None and os.getppid() != launcher:
        why = f"interrupted: its launcher (pid {launcher}) died"
    else:
        why = "interrupted (SIGINT: Ctrl-C, or its launcher stopping)"
    print(f"segbook batch: {job_id}: {why}; run again, it continues where it stopped", file=sys.stderr, flush=True)
    return EXIT_TERMINATED if isinstance(stop, Terminated) else EXIT_INTERRUPTED


def main(job_id: str, options_json: str, launcher: int | None = None) -> int:
    """`segbook batch worker`: run one job here; the exit status says how it ended (`EXIT_CODES`). With `launcher`,
    the worker stops when that process dies."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where the launcher's shell ignored it (`&`)
    signal.signal(signal.SIGTERM, raise_terminated)  # stop like Ctrl-C (recorded, claim released), counted
    forks_die_on_sigterm()  # but not in nnU-Net's forked pool workers, which their pools stop with SIGTERM
    try:
        if launcher is not None:
            signal.signal(signal.SIGHUP, _launcher_gone)
            bind_to_parent(launcher, signal.SIGHUP, grace_s=LAUNCHER_GONE_GRACE_S)
        return EXIT_CODES[work(job_id, ExecutionOptions.from_json(options_json)).result]
    except KeyboardInterrupt as stop:
        return stopped(job_id, stop, launcher)


def _launcher_gone(signum: int, frame: object) -> None:
    """The launcher died: stop as on its Ctrl-C (SIGINT, which the trainer answers at the next iteration). Once: the
    kernel may say it more than once, and a second SIGINT would stop training at once, without a checkpoint."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    os.kill(os.getpid(), signal.SIGINT)
