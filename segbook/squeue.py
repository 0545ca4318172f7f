"""Live SLURM job states from `squeue`, the one source that works without SLURM's accounting database.

`sacct` needs slurmdbd, which many clusters (and our one-node test cluster) lack, and submitit takes its states from
sacct, so segbook never asks submitit for a state: `squeue --states=all` lists pending and running jobs, and finished
ones for as long as slurmctld keeps them (MinJobAge, 5 min by default). A job it no longer lists has ended.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Iterable

#: squeue states of a job that still runs or will run (a requeued job goes back to PENDING).
LIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
                         "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "PREEMPTED"})
#: Of those, the states in which it runs (the others wait: pending, requeued, suspended).
RUNNING_STATES = frozenset({"CONFIGURING", "RUNNING", "COMPLETING", "RESIZING", "SIGNALING", "STAGE_OUT"})
SQUEUE_TIMEOUT_S = 60


def slurm_available() -> bool:
    return shutil.which("squeue") is not None


def squeue_states(job_ids: Iterable[str]) -> dict[str, str] | None:
    """{job id: state} for the given jobs and arrays ("12" lists every task "12_0", "12_1", ...).

    Jobs squeue does not know are absent from the answer. None when squeue is missing or fails (slurmctld down):
    callers must then fall back on what the files say.
    """
    ids = sorted({str(job_id) for job_id in job_ids})
    if not ids:
        return {}
    if not slurm_available():
        return None
    try:
        listing = subprocess.run(["squeue", "--noheader", "--array", "--states=all", "--format=%i %T",
                                  f"--jobs={','.join(ids)}"], capture_output=True, text=True,
                                 timeout=SQUEUE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if listing.returncode != 0:
        # One unknown id makes squeue fail (several unknown ids do not): nothing it knows is live.
        return {} if "Invalid job id" in listing.stderr else None
    return dict(line.split()[:2] for line in listing.stdout.splitlines() if len(line.split()) >= 2)


def array_of(slurm_id: str) -> str:
    """The id to ask squeue about: an array task "12_3" is listed under its array "12"."""
    return slurm_id.split("_")[0]


def own_slurm_job() -> tuple[str | None, int]:
    """This process's SLURM job ("12_3" for an array task) and how often SLURM has restarted (requeued) it."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")
    return job, int(os.environ.get("SLURM_RESTART_COUNT") or 0)
