"""The record of SLURM submissions: which SLURM task ran which job, and where submitit keeps its files.

`submit_slurm` writes one `submission.json` per array under `$SEGBOOK_HOME/batch/slurm/<submission>/`; the job
states (`segbook.batch.matrix`) read them back. Both sides use this module, so reading a job's state never needs the
launcher that submits it (which needs the code that runs a job, which needs the matrix).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from submitit.core.utils import JobPaths

from segbook.io import atomic_write_json, now
from segbook.paths import Paths

SUBMISSION_RECORD = "submission.json"
#: The record of a preparation array (task keys <-> SLURM ids), which job states do not read.
PREPARE_RECORD = "prepare.json"


@dataclass(frozen=True)
class SubmittedTask:
    """One array task of a submission, and where submitit keeps its files."""

    submission: str
    job: str
    slurm_id: str
    folder: Path  # the executor folder, with submitit's %j

    @property
    def files(self) -> JobPaths:
        return JobPaths(self.folder, job_id=self.slurm_id, task_id=0)

    @property
    def stdout(self) -> Path:
        return self.files.stdout

    def finished(self) -> bool:
        """submitit writes the result file when the task ends (whatever squeue says for a moment after)."""
        return self.files.result_pickle.exists()


def submissions_folder(paths: Paths) -> Path:
    return paths.batch / "slurm"


def new_submission_id() -> str:
    """Starts with the time, so that records sort by it (`latest_tasks`)."""
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def write_submission(folder: Path, tasks: Sequence[SubmittedTask], parameters: dict[str, Any],
                     options: dict[str, Any], record: str = SUBMISSION_RECORD,
                     slurm: dict[str, Any] | None = None) -> None:
    """Record a submitted array: its tasks (job id, or task key for a preparation array, <-> SLURM id), sbatch
    parameters, execution options and the submission's SLURM options (`SlurmOptions`, which `batch retry` reuses)."""
    atomic_write_json(folder / record, {
        "id": tasks[0].submission, "created_at": now(), "array_job_id": tasks[0].slurm_id.split("_")[0],
        "folder": str(tasks[0].folder), "parameters": parameters, "options": options, "slurm": slurm,
        "jobs": [{"job": t.job, "slurm_id": t.slurm_id} for t in tasks]})


def latest_tasks(paths: Paths) -> dict[str, SubmittedTask]:
    """Each job's most recent SLURM task, from the submission records."""
    return {job: SubmittedTask(record["id"], job, slurm_id, Path(record["folder"]))
            for job, (record, slurm_id) in _latest_records(paths).items()}


def latest_slurm_options(paths: Paths) -> dict[str, dict[str, Any] | None]:
    """The SLURM options (`SlurmOptions` as a dict; None in records made before they were kept) each job was last
    submitted with."""
    return {job: record.get("slurm") for job, (record, _) in _latest_records(paths).items()}


def _latest_records(paths: Paths) -> dict[str, tuple[dict[str, Any], str]]:
    """{job: (the record of its latest submission, its SLURM id there)}."""
    latest = {}
    for path in sorted(submissions_folder(paths).glob(f"*/{SUBMISSION_RECORD}")):  # ids start with their time
        record = json.loads(path.read_text())
        for item in record["jobs"]:
            latest[item["job"]] = (record, item["slurm_id"])
    return latest
