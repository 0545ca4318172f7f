"""A rehearsal: the whole batch machinery with no-op bodies, to try a matrix against a cluster (array sizes,
limits, dependencies, claims, attempts, states) before spending GPU-hours on it, and to test it at full size.

`ExecutionOptions(body=REHEARSAL)` (or `body="noop"`, its name; the Python API: `tests/test_batch_full.py` and
`scripts/rehearse_matrix.py` use it) is the batch's body (`segbook.batch.jobs.JobBody`) that replaces exactly two
things:

- preparing a task plans and preprocesses nothing (`segbook.batch.preparation` records it prepared, under the
  dataset's claim as a real preparation), so a task needs no more data than its `dataset.json`;
- a job's training creates the run's manifest, marks it running, records its epochs without computing them and
  marks it finished, through the same manifest code a trainer uses; its evaluation writes a summary marked
  `"rehearsal": true`.

It reads no weights either, so `submit_slurm` does not read the checkpoints of its pretrained jobs: they need only
exist, as the job states require (a placeholder file will do).

Everything around them is the real code: claims and attempts, the prepare stage and its records, the preparation
check of every job, arrays, dependencies, requeues and states. A rehearsal writes run folders as real jobs do, so
give it a SEGBOOK_HOME and nnUNet_results of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from segbook.batch.jobs import Job
from segbook.batch.preparation import prepare_command, read_records
from segbook.io import atomic_write_json, now
from segbook.paths import Paths
from segbook.runs import identity_fields, summary_path
from segbook.training.manifest import RunManifest

if TYPE_CHECKING:
    from segbook.registry import DatasetEntry


class Rehearsal:
    """The no-op `segbook.batch.jobs.JobBody` (the module docstring says what it does and what it leaves real)."""

    name = "noop"
    reads_weights = False
    done = "rehearsed (nothing trained)"

    def prepare(self, entry: "DatasetEntry", paths: Paths, processes: int | None, planners: Sequence[str],
                say: Callable[[str], None]) -> str:
        return "rehearsed (nothing planned)"

    def unprepared(self, entry: "DatasetEntry", paths: Paths, folds: Iterable[str],
                   planners: Sequence[str]) -> str | None:
        """A rehearsed task is ready once its preparation is recorded: it has no plans to check."""
        record = read_records(paths).get(entry.key) or {}
        return None if record.get("status") == "prepared" else \
            f"{entry.key} is not prepared; run {prepare_command(entry)}"

    def train(self, job: Job, options: Any, paths: Paths, request: dict[str, Any]) -> None:
        """The manifest a training would leave: created, running, its epochs recorded without computing them,
        finished."""
        folder = job.folder(paths)
        manifest = RunManifest.load(folder)
        if manifest is None:
            folder.mkdir(parents=True, exist_ok=True)
            manifest = RunManifest.create(folder, identity_fields(job.spec), options.settings_for(job), request)
        if manifest.status == "finished":
            return
        manifest.data.setdefault("started_at", now())
        manifest.set_status("running")
        manifest.save()
        for epoch in range(manifest.epochs_done, manifest.settings.epochs or 1):
            manifest.record_epoch({"epoch": epoch, "train_loss": 0.0, "learning_rates": {}, "seconds": 0.0})
        manifest.data["finished_at"] = now()
        manifest.set_status("finished")
        manifest.save()

    def evaluate(self, job: Job, options: Any, paths: Paths) -> None:
        """An evaluation summary marked as a rehearsal's, with no cases."""
        atomic_write_json(summary_path(job.folder(paths)),
                          {"run": identity_fields(job.spec), "rehearsal": True, "num_cases": 0, "labels": {},
                           "foreground_mean": {}, "created_at": now()})


REHEARSAL = Rehearsal()
