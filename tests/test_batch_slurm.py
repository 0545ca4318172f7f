"""`segbook batch submit` against the real one-node SLURM test cluster (scripts/slurm_cluster.sh), on the CPU.

States are checked against squeue, never sacct (which needs slurmdbd, absent here; docs/slurm_testing.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import planned_tiny_task, run_segbook, tiny_spec, use_planned_task
from slurm_support import FINAL_STATES, ensure_slurm_cluster, queue_states, wait_for

from segbook.claims import claim_records
from segbook.batch.matrix import build_matrix
from segbook.paths import Paths
from segbook.registry import load_registry
from segbook.training.manifest import RunManifest

pytestmark = pytest.mark.slurm

SLURM = ["--device", "cpu", "--gpus-per-job", "0", "--cpus-per-job", "1", "--array-parallelism", "2", "--time", "15"]
TINY = ["--iters-per-epoch", "2", "--val-iters-per-epoch", "1", "--checkpoint-every", "1"]
WAIT_S = 300


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """The cluster (or a skip), and a tiny synthetic task, planned, with a tiny "pretrained" checkpoint; the jobs
    inherit this environment (sbatch --export=ALL)."""
    cluster = ensure_slurm_cluster()
    with planned_tiny_task(tmp_path_factory.mktemp("batch_slurm"), tiny_spec(name="TinySlurm"), dataset_id=991,
                           seed=5) as task:
        task.cluster = cluster
        yield task


@pytest.fixture
def fresh(task, tmp_path, monkeypatch):
    return use_planned_task(task, tmp_path, monkeypatch)


def _segbook(*args: str) -> str:
    return run_segbook("batch", *args, timeout=300).stdout


def _selection(task, init: str = "pretrained,scratch", recipes: tuple[str, ...] = ()) -> list[str]:
    """The tiny task's jobs of `init`; `recipes`: the --recipes and --recipe-file options, when not the default."""
    return ["--registry", str(task.registry_file), "--tasks", task.entry.key, "--models", "tiny", "--init", init,
            "--weights", str(task.weights), *recipes]


def _status(task, init: str = "pretrained,scratch", recipes: tuple[str, ...] = ()) -> dict[str, dict]:
    jobs = json.loads(_segbook("status", *_selection(task, init, recipes), "--format", "json"))["jobs"]
    return {job["init"]: job for job in jobs}


def _submissions(paths: Paths) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((paths.batch / "slurm").glob("*/submission.json"))]


def _wait_until_done(task, paths: Paths, init: str, timeout_s: float = WAIT_S,
                     recipes: tuple[str, ...] = ()) -> dict[str, dict]:
    """Poll `batch status` until every job is done; fail with the log when a job's task ended without that."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = _status(task, init, recipes)
        if all(job["state"] == "done" for job in status.values()):
            return status
        for job in status.values():
            ended = job["slurm"] in FINAL_STATES and job["state"] != "done"
            if ended or time.monotonic() > deadline:
                log = Path(job["log"]) if job["log"] else None
                text = log.read_text()[-3000:] + log.with_suffix(".err").read_text()[-3000:] if log else ""
                pytest.fail(f"{job['job']} is {job['state']} (SLURM {job['slurm']}) after "
                            f"{timeout_s - deadline + time.monotonic():.0f} s:\n{text}")
        time.sleep(1)


def _run_folder(task, paths: Paths, init: str) -> Path:
    (job,) = build_matrix(load_registry([task.registry_file]), task.entry.key, models="tiny", inits=init)
    return job.folder(paths)


def _epochs(manifest: RunManifest) -> list[int]:
    """The recorded epochs. A run killed just after nnU-Net saved a checkpoint, before the trainer recorded that
    epoch in run.json, resumes after it: the record then lacks that one epoch."""
    return [e["epoch"] for e in manifest.data["epochs"]]


def _wait_for_checkpoint(folder: Path) -> None:
    def trained_an_epoch() -> bool:
        manifest = RunManifest.load(folder)
        return bool(manifest and manifest.data["epochs"]) and (folder / "checkpoint_latest.pth").is_file()

    wait_for(trained_an_epoch, WAIT_S, f"an epoch and a checkpoint in {folder}")


def test_array_runs_every_job_and_resubmitting_submits_nothing(task, fresh):
    args = [*_selection(task), *SLURM, "--epochs", "2", *TINY]
    assert "2 to submit" in _segbook("submit", *args)
    (record,) = _submissions(fresh)
    array = record["array_job_id"]
    assert sorted(j["slurm_id"] for j in record["jobs"]) == [f"{array}_0", f"{array}_1"]

    status = _wait_until_done(task, fresh, "pretrained,scratch")
    completed = {f"{array}_0": "COMPLETED", f"{array}_1": "COMPLETED"}
    wait_for(lambda: queue_states(array) == completed, 60, f"squeue to show array {array} completed")
    for init, job in _status(task).items():
        assert (job["state"], job["slurm"], job["epochs"]) == ("done", "COMPLETED", "2/2")
        assert queue_states(job["slurm_id"])[job["slurm_id"]] == job["slurm"]
        assert "done trained and evaluated" in Path(job["log"]).read_text()
        summary = _run_folder(task, fresh, init) / "evaluation" / "summary.json"
        assert json.loads(summary.read_text())["num_cases"] == task.entry.test_cases
    assert {j["init"]: j["slurm_id"] for j in status.values()} == {
        "pretrained": f"{array}_0", "scratch": f"{array}_1"}

    assert "0 to submit" in _segbook("submit", *args)
    assert len(_submissions(fresh)) == 1


def test_cancelled_job_resumes_from_its_checkpoint_when_resubmitted(task, fresh):
    """scancel sends SIGTERM: the trainer saves a checkpoint at the next iteration boundary (issue 14, item 3) and
    the attempt counts as ended badly (item 4); the task's log says so in one line (issue 22); a resubmission
    resumes where that checkpoint stands."""
    args = [*_selection(task, "scratch"), *SLURM, "--epochs", "12", *TINY]
    _segbook("submit", *args)
    folder = _run_folder(task, fresh, "scratch")
    _wait_for_checkpoint(folder)
    job = _status(task, "scratch")["scratch"]
    slurm_id = job["slurm_id"]
    assert job["state"] == "running" and job["slurm"] == queue_states(slurm_id)[slurm_id] == "RUNNING"

    subprocess.run(["scancel", slurm_id], check=True)
    wait_for(lambda: queue_states(slurm_id).get(slurm_id) == "CANCELLED", 60, f"{slurm_id} to be cancelled")
    wait_for(lambda: _status(task, "scratch")["scratch"]["state"] != "running", 60, "the job to stop running")
    job = _status(task, "scratch")["scratch"]
    manifest = RunManifest.load(folder)
    stops = [e for e in manifest.data["events"] if e["event"] == "stopped_at_boundary"]
    assert [e["signal"] for e in stops] == ["SIGTERM"]
    epoch, iteration = manifest.resume_point()
    assert (stops[0]["epoch"], stops[0]["iteration"]) == (epoch, iteration)
    assert 1 <= len(manifest.data["epochs"]) == epoch < 12
    where = f"resumes in epoch {epoch + 1} after iteration {iteration}" if iteration else f"resumes after epoch {epoch}"
    assert job["state"] == "pending" and job["detail"].startswith(where + "; attempt 1 terminated by SIGTERM")
    assert (job["attempts"], job["bad_endings"]) == (1, 1) and job["last_ending"].startswith("terminated")
    assert job["slurm"] == queue_states(slurm_id)[slurm_id] == "CANCELLED"
    errors = Path(job["log"]).with_suffix(".err").read_text()
    assert "Traceback" not in errors, errors[-3000:]  # an ordinary stop is one line, not a traceback (issue 22)
    (said,) = [line for line in errors.splitlines() if line.startswith("segbook batch: ")]
    assert said.startswith(f"segbook batch: {job['job']}: stopped by SIGTERM (scancel, ")

    assert "1 to submit" in _segbook("submit", *args)
    job = _wait_until_done(task, fresh, "scratch")["scratch"]
    assert job["slurm_id"] != slurm_id and (job["attempts"], job["bad_endings"]) == (2, 1)
    manifest = RunManifest.load(folder)
    (resumed,) = [e for e in manifest.data["events"] if e["event"] == "resumed"]
    assert (resumed["from_epoch"], resumed.get("from_iteration", 0)) == (epoch, iteration)
    assert manifest.status == "finished" and _epochs(manifest) == list(range(12))  # each epoch recorded once
    wait_for(lambda: queue_states(job["slurm_id"]).get(job["slurm_id"]) == "COMPLETED", 60, "squeue COMPLETED")
    assert _status(task, "scratch")["scratch"]["slurm"] == "COMPLETED"


def _wait_for_attempt(task, number: int) -> dict:
    """The scratch job once its attempt `number` trains (its claim taken, its manifest running again)."""
    def training() -> bool:
        job = _status(task, "scratch")["scratch"]
        return job["state"] == "running" and job["attempts"] == number

    wait_for(training, WAIT_S, f"attempt {number} to run")
    return _status(task, "scratch")["scratch"]


def test_killed_and_cancelled_attempts_are_recorded_until_the_job_fails_at_max_attempts(task, fresh):
    """Issue 14, item 4: an attempt killed outright (SIGKILL, as the out-of-memory killer does) and one cancelled
    (scancel: SIGTERM) are recorded with their numbers; the next submission retries, the last one fails the job."""
    args = [*_selection(task, "scratch"), *SLURM, "--epochs", "60", *TINY, "--max-attempts", "2"]
    assert "1 to submit" in _segbook("submit", *args)
    folder = _run_folder(task, fresh, "scratch")
    _wait_for_checkpoint(folder)
    first = _wait_for_attempt(task, 1)
    (claim,) = claim_records(fresh.claims, first["job"])
    assert claim["slurm_job"] == first["slurm_id"]
    os.kill(claim["pid"], signal.SIGKILL)  # the training process, which could release nothing
    wait_for(lambda: queue_states(first["slurm_id"])[first["slurm_id"]] in FINAL_STATES, 60, "the task to end")
    job = _status(task, "scratch")["scratch"]
    assert job["state"] == "pending" and (job["attempts"], job["bad_endings"]) == (1, 1)
    assert job["last_ending"] == f"killed (SLURM: {job['slurm']})" and job["slurm"] != "COMPLETED"
    assert f"attempt 1 {job['last_ending']}" in job["detail"]
    assert RunManifest.load(folder).status == "running"  # what the killed process left; the claim knows better

    assert "1 to submit" in _segbook("submit", *args)
    second = _wait_for_attempt(task, 2)
    assert second["slurm_id"] != first["slurm_id"]
    wait_for(lambda: any(e["event"] == "resumed" for e in RunManifest.load(folder).data["events"]), 60,
             "attempt 2 to resume")
    (asked,) = [e["request"] for e in RunManifest.load(folder).data["events"] if e["event"] == "continue_requested"]
    assert asked["attempt"] == 2 and asked["previous_attempt_ended"].startswith("killed (SLURM: ")
    assert "killed by signal 9 (SIGKILL)" in asked["previous_attempt_ended"]  # scontrol's exit code, in words
    subprocess.run(["scancel", second["slurm_id"]], check=True)
    wait_for(lambda: _status(task, "scratch")["scratch"]["state"] != "running", 60, "attempt 2 to stop")

    job = _status(task, "scratch")["scratch"]
    assert job["state"] == "failed" and (job["attempts"], job["bad_endings"]) == (2, 2)
    assert job["detail"] == ("gave up after 2 attempt(s) that ended badly (--max-attempts 2); last: terminated by "
                             "SIGTERM (scancel, a time limit reached without warning, or kill)")
    assert RunManifest.load(folder).status == "interrupted"
    assert "0 to submit" in _segbook("submit", *args) and len(_submissions(fresh)) == 2
    given_up = RunManifest.load(folder)  # the submission that found the job given up said so in run.json
    assert given_up.status == "failed" and given_up.data["error"]["type"] == "AttemptsExhausted"
    assert "gave up after 2 attempt(s)" in given_up.data["error"]["message"]
    table = _segbook("status", *_selection(task, "scratch"))
    (row,) = [line for line in table.splitlines() if line.startswith(task.entry.key)]
    assert row.split()[4:7] == ["failed", f"{RunManifest.load(folder).epochs_done}/60", "2"]
    assert "gave up after 2 attempt(s)" in row


def test_status_follows_squeue_while_held_and_cancelled_and_dry_run_submits_nothing(task, fresh):
    args = [*_selection(task), *SLURM, "--epochs", "2", *TINY]
    dry = _segbook("submit", *args, "--dry-run")
    assert "#SBATCH --array=0-1%2" in dry and "#SBATCH --cpus-per-task=1" in dry
    assert f"{task.entry.key}__tiny__scratch__fold_all" in dry and not _submissions(fresh)

    held = [*args, "--extra-sbatch=--hold"]  # pending in SLURM until released: nothing runs
    _segbook("submit", *held)
    (record,) = _submissions(fresh)
    array = record["array_job_id"]
    try:
        wait_for(lambda: set(queue_states(array).values()) == {"PENDING"}, 30, f"array {array} to be pending")
        for job in _status(task).values():
            assert job["state"] == "pending" and "queued in SLURM" in job["detail"]
            assert job["slurm"] == queue_states(array)[job["slurm_id"]] == "PENDING"
        assert "0 to submit" in _segbook("submit", *held) and len(_submissions(fresh)) == 1
    finally:
        subprocess.run(["scancel", array], check=True)
    wait_for(lambda: set(queue_states(array).values()) == {"CANCELLED"}, 30, f"array {array} to be cancelled")
    for job in _status(task).values():
        assert (job["state"], job["slurm"]) == ("pending", "CANCELLED") and "queued" not in job["detail"]

    assert "2 to submit" in _segbook("submit", *held)  # cancelled, not done: submitted again
    newest = _submissions(fresh)[-1]["array_job_id"]
    subprocess.run(["scancel", newest], check=True)
    assert newest != array


def test_submissions_the_cluster_refuses_are_one_line_naming_the_option_and_leave_nothing(task, fresh):
    """Issue 14, item 2: a partition sinfo does not list, or more CPUs than its node has (issue 22), is refused
    before sbatch; what sbatch itself refuses (more memory than the node has) comes back as one line naming the
    option, with no traceback."""
    args = [*_selection(task), *SLURM, "--epochs", "2", *TINY]
    unknown = run_segbook("batch", "submit", *args, "--partition", "nosuch", check=False)
    assert (unknown.returncode, unknown.stderr) == (
        2, f"segbook: error: --partition nosuch: no such partition; sinfo lists {task.cluster.partition}\n")
    cpus = run_segbook("batch", "submit", *args, "--cpus-per-job", "64", check=False)
    assert cpus.returncode == 2 and cpus.stderr.count("\n") == 1, cpus.stderr
    assert cpus.stderr.startswith("segbook: error: --cpus-per-job 64 exceeds the CPUs a task may have on a node of "
                                  f"partition {task.cluster.partition} (")
    refused = run_segbook("batch", "submit", *args, "--mem", "900G", check=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith("segbook: error: sbatch refused array 1 of 1 (2 jobs): ")
    assert "lower --mem" in refused.stderr and "Memory specification can not be satisfied" in refused.stderr
    assert not _submissions(fresh)
    assert _status(task)["scratch"]["state"] == "pending"


def test_preempted_job_requeues_and_resumes_without_reapplying_weights(task, fresh):
    args = [*_selection(task, "pretrained"), *SLURM, "--epochs", "12", *TINY]
    _segbook("submit", *args)
    folder = _run_folder(task, fresh, "pretrained")
    _wait_for_checkpoint(folder)
    slurm_id = _status(task, "pretrained")["pretrained"]["slurm_id"]
    # A preemption as submitit handles it: USR2 -> checkpoint() pickles the task again, requeue, exit.
    subprocess.run(["scancel", "--signal=USR2", slurm_id], check=True)
    job = _wait_until_done(task, fresh, "pretrained")["pretrained"]
    assert job["slurm_id"] == slurm_id  # the same SLURM job, requeued
    manifest = RunManifest.load(folder)
    events = [e["event"] for e in manifest.data["events"]]
    assert events.count("pretrained_weights_loaded") == 1
    assert events.index("interrupted") < events.index("resumed")
    assert _epochs(manifest)[-1] == 11
    assert "Requeued" in Path(job["log"]).read_text()
    first, second = claim_records(fresh.claims, job["job"])
    assert first["outcome"] == "SystemExit" and second["outcome"] == "done"  # released on the way out, taken again


def test_a_user_recipe_reaches_the_slurm_task(task, fresh, tmp_path, monkeypatch):
    recipe = {"name": "mine", "description": "a user's recipe", "source": "a test", "init": "pretrained",
              "optimizer": {"lr": 3e-3}, "groups": {"head_multiplier": 2},
              "budget": {"epochs": 2, "iterations_per_epoch": 2}}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)  # given relative, recorded absolute: the task may start anywhere
    recipes = ("--recipes", "mine", "--recipe-file", "mine.yaml")
    args = [*_selection(task, "pretrained", recipes), *SLURM, "--val-iters-per-epoch", "1", "--checkpoint-every", "1"]
    assert "1 to submit" in _segbook("submit", *args)
    (record,) = _submissions(fresh)
    assert record["options"]["recipe_files"] == [str(tmp_path / "mine.yaml")]
    assert record["jobs"][0]["job"] == f"{task.entry.key}__tiny__pretrained__mine__fold_all"

    job = _wait_until_done(task, fresh, "pretrained", recipes=recipes)["pretrained"]
    assert (job["recipe"], job["epochs"]) == ("mine", "2/2")
    (run,) = build_matrix(load_registry([task.registry_file]), task.entry.key, models="tiny", inits="pretrained",
                          recipes="mine", recipe_files=["mine.yaml"])
    manifest = RunManifest.load(run.folder(fresh))
    assert manifest.recipe.name == "mine" and manifest.recipe.optimizer.lr == 3e-3
    assert manifest.data["request"]["backend"] == "slurm"


def _slow_sbatch(folder: Path, called: Path, then: str) -> dict[str, str]:
    """An environment whose `sbatch` first marks `called`, sleeps, then runs `then` (a shell command): a submission
    caught in the middle of sending its arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "sbatch"
    script.write_text(f"#!/bin/bash\ntouch {called}\nsleep 5\n{then}\n")
    script.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}


def _submit_in_background(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "segbook.cli.main", "batch", "submit", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_one_submission_at_a_time_and_a_submitter_killed_outright_blocks_nothing(task, fresh, tmp_path):
    """Issue 22: two `batch submit` at once on one matrix each submitted every job. The second is refused (exit 2,
    naming the first) while the first sends its arrays; a submitter killed outright leaves its claim to the next."""
    args = [*_selection(task), *SLURM, "--epochs", "2", *TINY, "--extra-sbatch=--hold"]
    called = tmp_path / "sbatch_called"
    first = _submit_in_background(args, _slow_sbatch(tmp_path / "slow", called, 'exec /usr/bin/sbatch "$@"'))
    wait_for(called.exists, 120, "the first submission to call sbatch")
    second = run_segbook("batch", "submit", *args, check=False)
    out, err = first.communicate(timeout=120)
    arrays = [record["array_job_id"] for record in _submissions(fresh)]
    try:
        assert first.returncode == 0 and "2 to submit" in out, out + err
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stdout + second.stderr
        assert second.stderr.startswith("segbook: error: ") and f"pid {first.pid}" in second.stderr
        assert "submit" in second.stderr and "#SBATCH" not in second.stdout
        assert len(arrays) == 1  # every job went to SLURM once
    finally:
        subprocess.run(["scancel", *arrays], check=True)
    wait_for(lambda: set(queue_states(arrays[0]).values()) == {"CANCELLED"}, 30, "the array to be cancelled")

    called.unlink()
    killed = _submit_in_background(args, _slow_sbatch(tmp_path / "stuck", called, "exit 1"))
    wait_for(called.exists, 120, "the next submission to call sbatch")
    os.killpg(killed.pid, signal.SIGKILL)  # kill -9 mid-submission: its claim stays behind, unreleased
    killed.wait()
    again = run_segbook("batch", "submit", *args)
    assert "2 to submit" in again.stdout
    newest = _submissions(fresh)[-1]["array_job_id"]
    subprocess.run(["scancel", newest], check=True)
    assert newest not in arrays


def test_a_node_failure_slurm_requeues_is_a_requeue_not_a_bad_attempt(task, fresh):
    """Issue 22: a node marked down kills its jobs (SIGTERM, then SIGKILL after KillWait) and SLURM requeues them
    itself; the attempt ended by SIGTERM (or was killed), but it is a requeue, not a failure: not counted against
    --max-attempts, neither by `batch status` while the job waits to run again (held here, to look) nor by the
    next attempt."""
    args = [*_selection(task, "scratch"), *SLURM, "--epochs", "8", *TINY, "--max-attempts", "1"]
    _segbook("submit", *args)
    folder = _run_folder(task, fresh, "scratch")
    _wait_for_checkpoint(folder)
    slurm_id = _status(task, "scratch")["scratch"]["slurm_id"]
    others = _others_running(slurm_id)
    if others:  # a node marked down kills every job on it
        pytest.skip(f"other jobs run on the test cluster's node ({', '.join(others)}): not marking it down")
    node = task.cluster.node
    try:
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=down", "reason=segbook-test"], check=True)
        wait_for(lambda: queue_states(slurm_id).get(slurm_id) == "PENDING", 30, f"SLURM to requeue {slurm_id}")
        subprocess.run(["scontrol", "hold", slurm_id], check=True)  # it would start again 10 s later
    finally:  # the test cluster returns a node to service by itself (ReturnToService=2); make sure of it
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True)
    try:
        wait_for(lambda: _status(task, "scratch")["scratch"]["state"] != "running", 60, "the attempt to end")
        job = _status(task, "scratch")["scratch"]
        assert (job["state"], job["attempts"], job["bad_endings"], job["slurm"]) == ("pending", 1, 0, "PENDING"), job
        assert job["last_ending"].startswith("requeued by SLURM (a node failure"), job
    finally:
        subprocess.run(["scontrol", "release", slurm_id], check=True)
    job = _wait_until_done(task, fresh, "scratch")["scratch"]
    assert job["slurm_id"] == slurm_id  # the same SLURM job, requeued by SLURM
    assert (job["attempts"], job["bad_endings"], job["last_ending"]) == (2, 0, "done")
    manifest = RunManifest.load(folder)
    (asked,) = [e["request"] for e in manifest.data["events"] if e["event"] == "continue_requested"]
    assert asked["attempt"] == 2 and asked["previous_attempt_ended"].startswith("requeued by SLURM"), asked
    first, second = claim_records(fresh.claims, job["job"])
    assert first["slurm_restart"] == 0 and second["slurm_restart"] == 1 and second["outcome"] == "done"


def _others_running(mine: str) -> list[str]:
    listing = subprocess.run(["squeue", "--noheader", "--states=RUNNING", "--format=%i"], capture_output=True,
                             text=True, timeout=30, check=True)
    return [job for job in listing.stdout.split() if job != mine]


def test_retry_sends_a_job_back_to_slurm_with_the_options_it_was_submitted_with(task, fresh):
    """Issue 22: `batch retry` used to train on this machine (the login node) whatever the job ran on. A job that
    failed on SLURM goes back to SLURM with its submission's sbatch options, unless options say otherwise."""
    submitted = [*SLURM, "--mem", "300M"]
    args = [*_selection(task, "scratch"), "--epochs", "60", *TINY, "--max-attempts", "1"]
    assert "1 to submit" in _segbook("submit", *args, *submitted)
    folder = _run_folder(task, fresh, "scratch")
    _wait_for_checkpoint(folder)
    slurm_id = _status(task, "scratch")["scratch"]["slurm_id"]
    subprocess.run(["scancel", slurm_id], check=True)
    wait_for(lambda: queue_states(slurm_id).get(slurm_id) == "CANCELLED", 60, f"{slurm_id} to be cancelled")
    wait_for(lambda: _status(task, "scratch")["scratch"]["state"] == "failed", 60, "the job to fail")

    help_text = _segbook("retry", "--help")
    assert "default: where each job last ran" in " ".join(help_text.split())
    dry = _segbook("retry", "--failed", *args, "--device", "cpu", "--gpus-per-job", "0", "--dry-run")
    assert "to SLURM" in dry and len(_submissions(fresh)) == 1
    retried = _segbook("retry", "--failed", *args, "--device", "cpu", "--gpus-per-job", "0",
                       "--array-parallelism", "1")
    try:
        assert "submitted 1 job(s)" in retried and "running 1 on" not in retried, retried
        first, second = _submissions(fresh)
        assert second["slurm"] == {**first["slurm"], "array_parallelism": 1}  # given here: it replaces the 2
        assert (second["parameters"]["time"], second["parameters"]["cpus_per_task"]) == (15, 1)
        assert second["parameters"]["additional_parameters"]["mem"] == "300M"
    finally:
        subprocess.run(["scancel", *[record["array_job_id"] for record in _submissions(fresh)]], check=True)
