"""A rehearsal: the whole batch machinery with no-op bodies, to try a matrix against a cluster (array sizes,
limits, dependencies, claims, attempts, states) before spending GPU-hours on it, and to test it at full size.

`ExecutionOptions(body="noop")` (the Python API; `tests/test_batch_full.py` and `scripts/rehearse_matrix.py` use
it) replaces exactly two things:

- preparing a task plans and preprocesses nothing (`segbook.batch.preparation` records it prepared, under the
  dataset's claim as a real preparation), so a task needs no more data than its `dataset.json`;
- a job's training and evaluation become `rehearse_job`: create the run's manifest, mark it running, record its
  epochs without computing them, mark it finished and write an evaluation summary marked `"rehearsal": true`,
  through the same manifest code a trainer uses.

It reads no weights either, so `submit_slurm` does not read the checkpoints of its pretrained jobs: they need only
exist, as the job states require (a placeholder file will do).

Everything around them is the real code: claims and attempts, the prepare stage and its records, the preparation
check of every job, arrays, dependencies, requeues and states. A rehearsal writes run folders as real jobs do, so
give it a SEGBOOK_HOME and nnUNet_results of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from segbook.io import atomic_write_json, now
from segbook.runs import identity_fields, summary_path
from segbook.training.manifest import RunManifest

if TYPE_CHECKING:
    from segbook.batch.matrix import Job
    from segbook.training.settings import TrainingSettings

BODIES = ("train", "noop")


def rehearse_job(job: "Job", folder: Path, settings: "TrainingSettings", request: dict[str, Any]) -> str:
    """The no-op job body: the manifest a training would leave, then an evaluation summary."""
    manifest = RunManifest.load(folder)
    if manifest is None:
        folder.mkdir(parents=True, exist_ok=True)
        manifest = RunManifest.create(folder, identity_fields(job.spec), settings, request)
    if manifest.status != "finished":
        manifest.data.setdefault("started_at", now())
        manifest.set_status("running")
        manifest.save()
        for epoch in range(manifest.epochs_done, manifest.settings.epochs or 1):
            manifest.record_epoch({"epoch": epoch, "train_loss": 0.0, "learning_rates": {}, "seconds": 0.0})
        manifest.data["finished_at"] = now()
        manifest.set_status("finished")
        manifest.save()
    atomic_write_json(summary_path(folder), {"run": identity_fields(job.spec), "rehearsal": True, "num_cases": 0,
                                             "labels": {}, "foreground_mean": {}, "created_at": now()})
    return "rehearsed (nothing trained)"
