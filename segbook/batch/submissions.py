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
                     options: dict[str, Any], record: str = SUBMISSION_RECORD) -> None:
    """Record a submitted array: its tasks (job id, or task key for a preparation array, <-> SLURM id), sbatch
    parameters and execution options."""
    atomic_write_json(folder / record, {
        "id": tasks[0].submission, "created_at": now(), "array_job_id": tasks[0].slurm_id.split("_")[0],
        "folder": str(tasks[0].folder), "parameters": parameters, "options": options,
        "jobs": [{"job": t.job, "slurm_id": t.slurm_id} for t in tasks]})


def latest_tasks(paths: Paths) -> dict[str, SubmittedTask]:
    """Each job's most recent SLURM task, from the submission records."""
    records = sorted(submissions_folder(paths).glob(f"*/{SUBMISSION_RECORD}"))
    tasks = {}
    for path in records:  # submission ids start with their time: later ones win
        record = json.loads(path.read_text())
        folder = Path(record["folder"])
        for item in record["jobs"]:
            tasks[item["job"]] = SubmittedTask(record["id"], item["job"], item["slurm_id"], folder)
    return tasks
