"""`segbook batch retry`: which jobs of a selection failed, where they ran, and making them pending again.

A failed job is not run again by `run` or `submit` (it would fail the same way, and its error would be lost);
resetting it keeps the error in a "retry" event of its manifest. A failed training then resumes from its latest
checkpoint (or, with none, starts again), a failed evaluation is redone without training again. The reset is a claim
of the job that starts its count of bad attempts again (`segbook.batch.attempts`), so a job that was given up after
--max-attempts gets that many again. A retried job goes back where its latest attempt ran (`last_run`): a job of a
SLURM cluster never ends up training on the login node `batch retry` is typed on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from segbook.batch.attempts import RESET, info_for, last_backend, reset_count
from segbook.batch.jobs import Job
from segbook.batch.matrix import JobStatus, survey
from segbook.batch.submissions import latest_slurm_options
from segbook.claims import Claim, latest, try_claim
from segbook.paths import Paths
from segbook.training.manifest import RunManifest, failure


@dataclass(frozen=True)
class Reset:
    """A failed job made pending again, and the error it had."""

    job: Job
    error: str


@dataclass(frozen=True)
class LastRun:
    """Where a job's latest attempt ran ("local" or "slurm"), and the SLURM options (`SlurmOptions` as a dict) of its
    latest submission, if it had one that recorded them."""

    backend: str
    slurm: dict[str, Any] | None


def last_run(jobs: Iterable[Job], paths: Paths | None = None) -> dict[str, LastRun]:
    """Where each job ran last, by job id; "local" for a job no attempt of `segbook batch` started."""
    paths = paths or Paths.from_env()
    recorded = latest_slurm_options(paths)
    return {job.id: LastRun(last_backend(latest(paths.claims / job.id)[1]) or "local", recorded.get(job.id))
            for job in jobs}


def failed_jobs(jobs: Iterable[Job], paths: Paths | None = None) -> list[JobStatus]:
    """The jobs that are failed now, with their errors (`JobStatus.detail`)."""
    return [status for status in survey(jobs, paths) if status.state == "failed"]


def reset_failed(jobs: Iterable[Job], paths: Paths | None = None) -> list[Reset]:
    """Make every failed job of `jobs` pending again; those that are not failed, or that another process holds, are
    left as they are (and out of the answer)."""
    resets = [(job, retry_failed(job, paths)) for job in jobs]
    return [Reset(job, error) for job, error in resets if error is not None]


def retry_failed(job: Job, paths: Paths | None = None) -> str | None:
    """Make a failed job pending again; returns the error it had (None when it had none, or is held)."""
    paths = paths or Paths.from_env()
    claim = try_claim(paths.claims, job.id, info=info_for(paths.claims / job.id, RESET))
    if not isinstance(claim, Claim):
        return None
    with claim.held():
        claim.outcome = "reset for retry"
        manifest = RunManifest.load(job.folder(paths), history=False)
        error = (failure(manifest) if manifest is not None else None) or claim.record.info.get("gave_up")
        if error is None:
            return None
        reset_count(claim)
        if manifest is None:
            return error
        if manifest.status == "failed":
            manifest.data.update(status="created", error=None)
        elif "evaluation_error" in manifest.data:
            del manifest.data["evaluation_error"]
        manifest.event("retry", previous_error=error)
        manifest.save()
    return error
