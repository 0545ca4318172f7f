"""Smoke tests of the one-node SLURM test cluster through submitit (scripts/slurm_cluster.sh, issue #7)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import submitit

from slurm_support import SlurmCluster, ensure_slurm_cluster, queue_states, wait_for, wait_for_results

pytestmark = pytest.mark.slurm

# The jobs unpickle the functions below; this module is not importable there (pytest put tests/ on sys.path,
# the job's Python does not have it), so cloudpickle must carry their code instead of a reference.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    return ensure_slurm_cluster()


def _executor(cluster: SlurmCluster, folder: Path, **parameters: object) -> submitit.SlurmExecutor:
    executor = submitit.SlurmExecutor(folder=folder / "%j")
    # Tiny jobs: the node's cores are shared with everyone else's work.
    executor.update_parameters(**{"partition": cluster.partition, "time": 2, "cpus_per_task": 1, "mem": "500MB",
                                  **parameters})
    return executor


def seeded_sum(index: int) -> dict[str, object]:
    """Something real to compute, plus where it ran."""
    total = float(np.random.default_rng(index).random(1000).sum())
    return {"sum": total, "python": sys.executable, "task": os.environ.get("SLURM_ARRAY_TASK_ID")}


def test_array_of_three_jobs(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    jobs = _executor(slurm_cluster, tmp_path).map_array(seeded_sum, [0, 1, 2])

    array_ids = {job.job_id.split("_")[0] for job in jobs}
    assert len(array_ids) == 1, f"one array, not {array_ids}"
    results = wait_for_results(jobs, timeout_s=60)

    for index, (job, result) in enumerate(zip(jobs, results)):
        assert result["sum"] == pytest.approx(float(np.random.default_rng(index).random(1000).sum()))
        # The job ran this interpreter (the venv reached it) as task `index` of the array.
        assert result["python"] == sys.executable and result["task"] == str(index)
        assert job.paths.stdout.exists() and job.paths.stderr.exists()
        assert job.paths.submitted_pickle.exists() and job.paths.result_pickle.exists()
    # Without sacct, squeue is where finished jobs' states are read. A job writes its result just before it
    # ends, so squeue may still say RUNNING or COMPLETING for a moment.
    array_id = array_ids.pop()
    completed = {job.job_id: "COMPLETED" for job in jobs}
    wait_for(lambda: queue_states(array_id) == completed, 120, f"squeue to show array {array_id} completed")


def test_scancel_running_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job = _executor(slurm_cluster, tmp_path).submit(time.sleep, 300)

    wait_for(lambda: queue_states(job.job_id).get(job.job_id) == "RUNNING", 30, f"job {job.job_id} to run")
    running = subprocess.run(["squeue", "--noheader", "--format=%i %T"], capture_output=True, text=True, check=True)
    assert f"{job.job_id} RUNNING" in running.stdout.splitlines()

    subprocess.run(["scancel", job.job_id], check=True)
    # squeue without --states lists pending, running and completing jobs only: the job leaves that queue.
    wait_for(
        lambda: not subprocess.run(
            ["squeue", "--noheader", f"--jobs={job.job_id}"], capture_output=True, text=True, check=True
        ).stdout.strip(),
        30,
        f"job {job.job_id} to leave the queue",
    )
    assert queue_states(job.job_id) == {job.job_id: "CANCELLED"}
    assert not job.paths.result_pickle.exists()


class CountTo(submitit.helpers.Checkpointable):
    """Counts one step a second, saving its progress to `progress` so that a requeued run resumes there."""

    def __init__(self, progress: Path) -> None:
        self.progress = progress

    def __call__(self, steps: int) -> dict[str, int]:
        state = json.loads(self.progress.read_text()) if self.progress.exists() else {"done": 0, "runs": 0}
        state["runs"] += 1
        while state["done"] < steps:
            time.sleep(1)
            state["done"] += 1
            self.progress.write_text(json.dumps(state))
        return state


def test_checkpointable_job_requeues_on_preemption(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    progress = tmp_path / "progress.json"
    # submitit asks SLURM for its warning signal (USR2) 90 s before the time limit: with the 2 minutes of the other
    # tests it comes 30 s into a run, which a loaded machine reaches, and requeues the job a second time.
    job = _executor(slurm_cluster, tmp_path, time=10).submit(CountTo(progress), 6)

    wait_for(progress.exists, 30, f"job {job.job_id} to make progress")
    # A preemption as submitit sees it: SIGTERM (ignored), then the USR2 on which it checkpoints the callable
    # and requeues the job with `scontrol requeue`.
    for signal_name in ("TERM", "USR2"):
        subprocess.run(["scancel", f"--signal={signal_name}", job.job_id], check=True)
    wait_for(lambda: queue_states(job.job_id).get(job.job_id) == "PENDING", 30, f"job {job.job_id} to requeue")

    (result,) = wait_for_results([job], timeout_s=60)
    assert result["done"] == 6 and result["runs"] == 2
    assert "Requeued job" in (job.stdout() or "")
