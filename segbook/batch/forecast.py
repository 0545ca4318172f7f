"""`segbook batch plan`: what a matrix costs: each job's state and GPU-hours, and the totals by state.

A started run is estimated with the settings it was created with (its `run.json`), a new one with the execution
options' settings and its recipe's budget (`ExecutionOptions.settings_for`), so a matrix of several recipes is
costed recipe by recipe, and a job of another budget (`--budgets`) at its own epochs (`by_budget` totals them per
budget). Every seed is a job of its own, costed in full; a job on a training fraction costs what
the whole train split does (`estimate_job`). `left_gpu_hours` is what remains: nothing for a done job; the epochs
not trained yet and the prediction for the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from segbook.batch.estimate import DEFAULT_ASSUMED_TFLOPS, Estimate, estimate_jobs
from segbook.batch.execute import ExecutionOptions
from segbook.batch.jobs import Job
from segbook.batch.matrix import STATES, JobStatus, in_states, survey
from segbook.paths import Paths
from segbook.training.manifest import RunManifest
from segbook.training.settings import TrainingSettings


@dataclass(frozen=True)
class JobCost:
    """A job's state and its estimate (None when its task has neither plans nor a reference patch)."""

    status: JobStatus
    estimate: Estimate | None

    @property
    def gpu_hours(self) -> float | None:
        return None if self.estimate is None else self.estimate.gpu_hours

    @property
    def left_gpu_hours(self) -> float | None:
        if self.estimate is None:
            return None
        return 0.0 if self.status.state == "done" else self.estimate.remaining_gpu_hours(self.status.epochs_done)

    def row(self, full: bool = False, recipe: bool = False, time_minutes: int | None = None,
            gpus: int = 1, variants: bool = False) -> dict[str, Any]:
        """The status row (`full`: every field, as JSON has it) with the patch, batch size and GPU-hours; with a
        SLURM time limit, the requeues the job needs to finish what is left of it on `gpus` GPUs."""
        row = self.status.record() if full else self.status.row(recipe, variants)
        if self.estimate is None:
            row = {**row, "patch": "", "batch": "", "gpu_hours": None, "left_gpu_hours": None}
        else:
            geometry = self.estimate.geometry
            patch = "x".join(map(str, geometry.patch)) + ("" if geometry.source == "plans" else " (ref)")
            row = {**row, "patch": patch, "batch": geometry.batch_size, "gpu_hours": round(self.gpu_hours, 2),
                   "left_gpu_hours": round(self.left_gpu_hours, 2)}
        if time_minutes:
            row["requeues"] = "" if self.left_gpu_hours is None else \
                max(0, math.ceil(self.left_gpu_hours / gpus * 60 / time_minutes) - 1)
        return row


@dataclass(frozen=True)
class Forecast:
    """The cost of every job of a matrix, in its order."""

    jobs: list[JobCost]

    def in_states(self, states: str | Sequence[str] | None) -> list[JobCost]:
        """The jobs in `states` ("failed,running" or a list; None: all of them)."""
        wanted = {status.job.id for status in in_states([c.status for c in self.jobs], states)}
        return [c for c in self.jobs if c.status.job.id in wanted]

    def by_budget(self) -> list[dict[str, Any]]:
        """One row per budget the jobs train (epochs, as estimated: a started run's recorded, a new one's from its
        name, the options or its recipe), smallest first: its jobs, GPU-hours and what is left of them. Jobs
        without an estimate are counted under budget None."""
        budgets: dict[int | None, list[JobCost]] = {}
        for cost in self.jobs:
            budgets.setdefault(None if cost.estimate is None else cost.estimate.epochs, []).append(cost)
        return [{"budget_epochs": epochs, "jobs": len(members),
                 "gpu_hours": round(sum(c.gpu_hours or 0.0 for c in members), 2),
                 "left_gpu_hours": round(sum(c.left_gpu_hours or 0.0 for c in members), 2)}
                for epochs, members in sorted(budgets.items(), key=lambda item: (item[0] is None, item[0] or 0))]

    def totals(self) -> list[dict[str, Any]]:
        """One row per state, then "total": the jobs, their GPU-hours and what is left of them."""
        rows = []
        for state in (*STATES, "total"):
            members = [c for c in self.jobs if state in (c.status.state, "total")]
            rows.append({"state": state, "jobs": len(members),
                         "gpu_hours": round(sum(c.gpu_hours or 0.0 for c in members), 2),
                         "left_gpu_hours": round(sum(c.left_gpu_hours or 0.0 for c in members), 2)})
        return rows


def forecast(jobs: Iterable[Job], options: ExecutionOptions, paths: Paths | None = None,
             assumed_tflops: float = DEFAULT_ASSUMED_TFLOPS) -> Forecast:
    """Each job's state (as `survey` says, with the options' weights) and its GPU-hours at `assumed_tflops`."""
    paths = paths or Paths.from_env()
    jobs = list(jobs)
    statuses = survey(jobs, paths, weights=options.pretrained_weights)
    estimates = estimate_jobs(jobs, lambda job: budget(job, options, paths), paths, assumed_tflops)
    return Forecast([JobCost(status, estimates[status.job.id]) for status in statuses])


def budget(job: Job, options: ExecutionOptions, paths: Paths) -> TrainingSettings:
    """A started run keeps the settings it was created with; a new one gets the options' and its recipe's."""
    manifest = RunManifest.load(job.folder(paths), history=False)
    return manifest.settings if manifest is not None else options.settings_for(job)
