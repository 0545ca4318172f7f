"""The batch's value types: a job, and the body that does a batch's work on its tasks and jobs.

A leaf of `segbook.batch`: the modules that prepare, rehearse, survey, estimate and run jobs import it, and it imports
none of them, so none of them needs another's types.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol, Sequence

from segbook.paths import Paths
from segbook.runs import RunSpec

if TYPE_CHECKING:
    from segbook.registry import DatasetEntry


@dataclass(frozen=True)
class Job:
    """One run of the matrix: what to train (the spec) on which registered task (the entry)."""

    spec: RunSpec
    entry: "DatasetEntry"

    @property
    def id(self) -> str:
        return self.spec.job_id

    def folder(self, paths: Paths) -> Path:
        return self.spec.folder(paths.results)


class JobBody(Protocol):
    """What a batch does to prepare its tasks and to run its jobs: the real work (`segbook.batch.execute.TRAINING`:
    plan, train, evaluate) or a rehearsal that does none of it (`segbook.batch.rehearsal.REHEARSAL`). The launchers
    hand it to every stage; a worker or SLURM task finds it by `name` in the options it reads back
    (`segbook.batch.execute.BODIES`). Everything around it (claims, attempts, records, states) is the same for both.
    """

    #: The name the batch's options carry it under.
    name: str
    #: Whether its pretrained jobs read their checkpoints (so a launcher checks them before submitting).
    reads_weights: bool
    #: What `run_job` reports of a job it took to the end.
    done: str

    def prepare(self, entry: "DatasetEntry", paths: Paths, processes: int | None, planners: Sequence[str],
                say: Callable[[str], None]) -> str:
        """Prepare one task, under its dataset's claim; what was done."""

    def unprepared(self, entry: "DatasetEntry", paths: Paths, folds: Iterable[str],
                   planners: Sequence[str]) -> str | None:
        """Why the task is not ready for training jobs of `folds` on `planners`' plans (None when it is), naming
        the command that prepares it."""

    def train(self, job: Job, options: Any, paths: Paths, request: dict[str, Any]) -> None:
        """Train (or resume) the job's run; `options` are the batch's `segbook.batch.execute.ExecutionOptions`,
        `request` what the run records of who asked for it."""

    def evaluate(self, job: Job, options: Any, paths: Paths) -> None:
        """Evaluate the job's trained run."""
