"""`segbook batch` on this machine at the size of the study (issue #14), end to end on the CPU: preparation as a
stage of its own, jobs that never plan, attempts that end badly (kill -9, SIGTERM) counted up to --max-attempts,
checkpoints refused before anything starts, and the cross-validation splits written once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from helpers import (descendants, planned_tiny_task, prepare_synthetic_task, run_segbook, tiny_spec, use_planned_task,
                     wait_until_gone, write_payload_checkpoint)

from segbook import claims
from segbook.batch.execute import ExecutionOptions
from segbook.batch.local import worker_log
from segbook.batch.matrix import build_matrix, job_status
from segbook.batch.preparation import read_records
from segbook.batch.worker import EXIT_UNPREPARED, worker_command
from segbook.data.folders import preprocessed_folder, raw_folder
from segbook.data.split import read_split
from segbook.paths import Paths
from segbook.plan import plan_states, plan_task, preprocessed_version
from segbook.registry import load_registry
from segbook.training.checkpoints import read_run_checkpoint
from segbook.training.manifest import RunManifest
from segbook.training.trainer_parts.data import SPLITS, TooFewCasesForFolds, write_crossval_splits
from stunet import create_stunet, write_official_checkpoint

if TYPE_CHECKING:
    from segbook.registry import DatasetEntry

# Every test here plans a task with nnU-Net, and most train or spawn workers and launchers.
pytestmark = pytest.mark.slow

TINY = ["--models", "tiny", "--init", "scratch"]


def _status(registry_files: list[Path], *args: str) -> dict[str, dict]:
    """`segbook batch status --format json`, by job id."""
    registries = [arg for path in registry_files for arg in ("--registry", str(path))]
    result = run_segbook("batch", "status", *registries, *args, "--format", "json")
    return {job["job"]: job for job in json.loads(result.stdout)["jobs"]}


# --- preparation --------------------------------------------------------------------------------------------------

@pytest.fixture
def imported(tmp_path, segbook_home, monkeypatch) -> tuple[Paths, Path, "DatasetEntry"]:
    """A tiny task imported, not planned: (paths, its registry file, its entry)."""
    monkeypatch.setenv("nnUNet_def_n_proc", "1")
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    registry_file, entry = prepare_synthetic_task(tmp_path / "good", tiny_spec(), dataset_id=990, plan=False)
    return Paths.from_env(), registry_file, entry


@pytest.fixture
def broken(tmp_path, imported) -> tuple[Path, "DatasetEntry"]:
    """A second tiny task imported, one of whose training images is damaged after the import: its preparation
    fails (in nnU-Net's fingerprint)."""
    registry_file, entry = prepare_synthetic_task(tmp_path / "bad", tiny_spec("Broken", seed=1), dataset_id=991,
                                                  plan=False)
    damaged = sorted((raw_folder(entry, imported[0]) / "imagesTr").iterdir())[0]
    damaged.write_bytes(b"not an image" * 100)
    return registry_file, entry


def test_prepare_plans_and_splits_each_task_once_and_a_failure_blocks_only_its_own_jobs(imported, broken):
    (paths, good_file, good), (bad_file, bad) = imported, broken
    registries = ["--registry", str(good_file), "--registry", str(bad_file)]
    selection = [*registries, "--tasks", f"{good.key},{bad.key}", *TINY, "--folds", "0,1,2"]
    first = run_segbook("batch", "prepare", *selection, check=False)
    assert first.returncode == 1, first.stdout + first.stderr
    assert f"[1/2] {good.key}: prepared: planned and preprocessed in" in first.stdout
    assert "cross-validation splits written" in first.stdout
    assert f"[2/2] {bad.key}: failed: " in first.stdout and "batch prepare: 1 prepared, 1 failed" in first.stdout

    # The good task: planned once for its three jobs, and nnU-Net's five folds over exactly its training cases.
    assert plan_states(good, paths) == {"default": "preprocessed"}
    splits = json.loads((preprocessed_folder(good, paths) / SPLITS).read_text())
    train_ids = sorted(read_split(raw_folder(good, paths)).train)
    assert len(splits) == 5 and sorted(c for fold in splits for c in fold["val"]) == train_ids
    assert all(sorted(fold["train"] + fold["val"]) == train_ids for fold in splits)
    records = read_records(paths)
    assert records[good.key]["status"] == "prepared" and len(records[good.key]["history"]) == 1
    assert records[bad.key]["status"] == "failed" and plan_states(bad, paths) == {}

    states = _status([good_file, bad_file], *selection[4:])
    assert {job["state"] for job_id, job in states.items() if job_id.startswith(good.key)} == {"pending"}
    blocked = [job for job_id, job in states.items() if job_id.startswith(bad.key)]
    assert len(blocked) == 3 and {job["state"] for job in blocked} == {"blocked"}
    assert all(job["detail"].startswith("preparation failed: ") and
               f"`segbook batch prepare --tasks {bad.key}`" in job["detail"] for job in blocked)

    # A second preparation of the good task does nothing: same plans version, same splits file.
    before = (preprocessed_version(good.nnunet_name, paths), (preprocessed_folder(good, paths) / SPLITS).stat())
    again = run_segbook("batch", "prepare", "--registry", str(good_file), "--tasks", good.key, *TINY,
                        "--folds", "0,1,2")
    assert f"{good.key}: prepared: plans up to date (" in again.stdout and "splits written" not in again.stdout
    after = (preprocessed_version(good.nnunet_name, paths), (preprocessed_folder(good, paths) / SPLITS).stat())
    assert after[0] == before[0] and (after[1].st_ino, after[1].st_mtime_ns) == (before[1].st_ino,
                                                                                before[1].st_mtime_ns)
    assert len(read_records(paths)[good.key]["history"]) == 2


def test_a_job_whose_task_is_not_prepared_stops_at_once_naming_the_command_and_never_plans(imported):
    paths, good_file, good = imported
    (job,) = build_matrix(load_registry([good_file]), good.key, models="tiny", inits="scratch", folds="0")
    worker = subprocess.run(worker_command(job, ExecutionOptions.create(registry_files=[good_file], device="cpu")),
                            capture_output=True, text=True, timeout=120)
    assert worker.returncode == EXIT_UNPREPARED, worker.stdout + worker.stderr
    assert f"{job.id}: unprepared {good.key} is not prepared (it is not planned); run `segbook batch prepare " \
           f"--tasks {good.key}`" in worker.stdout
    assert plan_states(good, paths) == {} and not preprocessed_folder(good, paths).exists()
    assert not job.folder(paths).exists()  # its run untouched
    (record,) = claims.claim_records(paths.claims, job.id)
    assert record["released"] and record["outcome"] == "unprepared"

    # Planned, but without the splits a cross-validation fold needs: still not prepared (fold "all" is).
    plan_task(good, paths, num_processes=1, progress=False)
    worker = subprocess.run(worker.args, capture_output=True, text=True, timeout=120)
    assert worker.returncode == EXIT_UNPREPARED and f"has no cross-validation splits ({SPLITS})" in worker.stdout
    assert not (preprocessed_folder(good, paths) / SPLITS).exists()


def test_folds_writing_the_splits_at_once_never_tear_the_file_and_keep_one_that_exists(imported):
    """`segbook finetune --fold N` on a task planned but not prepared writes the splits itself: folds that start
    together must never leave (or let a reader see) a torn file, and none rewrites a file that exists."""
    paths, _, good = imported
    plan = plan_task(good, paths, num_processes=1, progress=False)
    path = preprocessed_folder(good, paths) / SPLITS
    seen: list[str] = []
    done = threading.Event()

    def read_while_written() -> None:
        while not done.is_set():
            with contextlib.suppress(FileNotFoundError):
                seen.append(path.read_text())

    reader = threading.Thread(target=read_while_written)
    reader.start()
    try:
        for _ in range(10):
            path.unlink(missing_ok=True)
            start = threading.Barrier(4)
            writers = [threading.Thread(target=lambda: (start.wait(), write_crossval_splits(path.parent,
                                                                                            plan.data_folder)))
                       for _ in range(4)]
            for writer in writers:
                writer.start()
            for writer in writers:
                writer.join()
    finally:
        done.set()
        reader.join()
    assert seen and all(len(json.loads(text)) == 5 for text in seen)  # never empty, never half a file
    assert not [p.name for p in path.parent.iterdir() if p.name.startswith(f".{SPLITS}")]  # no temporary left

    mine = [{"train": ["a"], "val": ["b"]}]  # a split someone wrote on purpose
    path.write_text(json.dumps(mine))
    assert write_crossval_splits(path.parent, plan.data_folder) is False and json.loads(path.read_text()) == mine


def test_batch_run_prepares_before_any_worker_starts_and_the_folds_share_the_splits(imported):
    paths, good_file, good = imported
    budget = ["--epochs", "1", "--iters-per-epoch", "1", "--val-iters-per-epoch", "1", "--checkpoint-every", "1"]
    result = run_segbook("batch", "run", "--registry", str(good_file), "--tasks", good.key, *TINY, "--folds", "0,1",
                         "--device", "cpu", "--workers", "2", *budget)
    lines = result.stdout.splitlines()
    prepared = next(i for i, line in enumerate(lines) if f"{good.key}: prepared: planned and preprocessed" in line)
    started = [i for i, line in enumerate(lines) if " start  " in line]
    assert len(started) == 2 and prepared < min(started), result.stdout
    assert "cross-validation splits written" in lines[prepared] and "2 done" in result.stdout
    for job in build_matrix(load_registry([good_file]), good.key, models="tiny", inits="scratch", folds="0,1"):
        manifest = RunManifest.load(job.folder(paths))
        assert manifest.status == "finished" and manifest.data["preprocessed"]["version"] == \
            preprocessed_version(good.nnunet_name, paths)
        log = next(job.folder(paths).glob("training_log_*.txt")).read_text()
        assert f"wrote {SPLITS}" not in log  # the fold read the prepared splits; no job planned or split
        assert "planning" not in (paths.batch / "logs" / f"{job.id}.log").read_text()


# --- attempts with the local launcher -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A tiny task imported and planned (fold "all" needs nothing more), and a tiny "pretrained" checkpoint."""
    with planned_tiny_task(tmp_path_factory.mktemp("local"), tiny_spec(), seed=5) as task:
        yield task


@pytest.fixture
def fresh(task, tmp_path, monkeypatch) -> Paths:
    return use_planned_task(task, tmp_path, monkeypatch)


def _selection(task, *extra: str) -> list[str]:
    return ["--registry", str(task.registry_file), "--tasks", task.entry.key, *TINY, *extra]


def _launch(task, *args: str) -> subprocess.Popen:
    """`segbook batch run` in the background."""
    command = [sys.executable, "-m", "segbook.cli.main", "batch", "run", *_selection(task, "--device", "cpu"), *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)


def _worker_once_trained(paths: Paths, job, launcher: subprocess.Popen, epochs: int) -> int:
    """The pid of the worker holding the job, once its run has recorded `epochs` epochs and saved a checkpoint."""
    folder, deadline = job.folder(paths), time.monotonic() + 240
    while True:
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.stdout.read()
        manifest = RunManifest.load(folder, history=False)
        if manifest is not None and manifest.epochs_done >= epochs and manifest.data.get("checkpoint"):
            return claims.latest(paths.claims / job.id)[1].pid
        time.sleep(0.2)


def _job(task):
    (job,) = build_matrix(load_registry([task.registry_file]), task.entry.key, models="tiny", inits="scratch")
    return job


def _record(job, paths: Paths) -> dict:
    """What `batch status --format json` says of the job, read here."""
    return job_status(job, paths).record()


def test_a_worker_killed_outright_is_recorded_counted_and_the_job_resumes(task, fresh):
    job, budget = _job(task), ["--epochs", "5", "--iters-per-epoch", "2", "--val-iters-per-epoch", "1",
                               "--checkpoint-every", "2"]
    launcher = _launch(task, *budget)
    os.kill(_worker_once_trained(fresh, job, launcher, epochs=3), signal.SIGKILL)  # as the out-of-memory killer
    output, _ = launcher.communicate(timeout=120)
    killed = "the worker got SIGKILL, from the out-of-memory killer or kill -9"
    assert launcher.returncode == 1 and f"[killed]  {job.id} after" in output and killed in output, output
    assert "batch run: 1 killed" in output

    manifest = RunManifest.load(job.folder(fresh))
    (ended,) = [e for e in manifest.data["events"] if e["event"] == "attempt_ended"]
    assert manifest.status == "interrupted" and (ended["attempt"], ended["ending"]) == (1, f"killed ({killed})")
    saved = read_run_checkpoint(job.folder(fresh) / "checkpoint_latest.pth")["current_epoch"]
    status = _status([task.registry_file], *_selection(task)[2:])[job.id]
    assert (status["state"], status["attempts"], status["bad_endings"]) == ("pending", 1, 1)
    assert status["detail"] == f"resumes after epoch {saved}; attempt 1 killed ({killed})"

    again = run_segbook("batch", "run", *_selection(task, "--device", "cpu"), *budget)
    assert "batch run: 1 done" in again.stdout
    manifest = RunManifest.load(job.folder(fresh))
    (requested,) = [e["request"] for e in manifest.data["events"] if e["event"] == "continue_requested"]
    assert (requested["attempt"], requested["previous_attempt_ended"]) == (2, f"killed ({killed})")
    (resumed,) = [e for e in manifest.data["events"] if e["event"] == "resumed"]
    assert resumed["from_epoch"] == saved and [e["epoch"] for e in manifest.data["epochs"]] == list(range(5))
    status = _record(job, fresh)
    assert (status["state"], status["attempts"], status["bad_endings"], status["last_ending"]) == ("done", 2, 1,
                                                                                                  "done")


def test_a_launcher_killed_outright_takes_its_worker_along_and_the_next_run_resumes_the_job(task, fresh):
    """Issue 22: kill -9 of `batch run` (not its process group: the out-of-memory killer, or `kill -9 PID`). Its
    worker stops as on the launcher's Ctrl-C (a checkpoint at the next iteration, its claim released) within
    seconds, and the worker's augmentation workers with it; the next run resumes the job, and the launcher's death
    does not count against the job's attempts."""
    job, budget = _job(task), ["--epochs", "6", "--iters-per-epoch", "3", "--val-iters-per-epoch", "1",
                               "--checkpoint-every", "1", "--data-workers", "1"]
    launcher = _launch(task, *budget)
    worker = _worker_once_trained(fresh, job, launcher, epochs=1)
    below = [worker, *descendants(worker)]
    assert len(below) >= 3, below  # the worker and nnU-Net's augmentation workers (training, validation)
    try:
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        # Within the next iteration, the checkpoint and the exit (seconds; the interpreter's exit with torch loaded
        # alone took 6 s on 2 busy cores); without a launcher, workers used to train on to the end.
        assert not wait_until_gone(below, 30), "processes outlived the launcher killed outright"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker, signal.SIGKILL)  # on failure: leave nothing training
    manifest = RunManifest.load(job.folder(fresh))
    (stop,) = [e for e in manifest.data["events"] if e["event"] == "stopped_at_boundary"]
    assert manifest.status == "interrupted" and stop["signal"] == "SIGINT" and manifest.epochs_done < 6
    (record,) = claims.claim_records(fresh.claims, job.id)
    assert record["released"] and record["outcome"] == "KeyboardInterrupt" and record["info"]["backend"] == "local"
    assert f"interrupted: its launcher (pid {launcher.pid}) died" in worker_log(fresh, job).read_text()

    again = run_segbook("batch", "run", *_selection(task, "--device", "cpu"), *budget)
    assert "batch run: 1 done" in again.stdout
    manifest = RunManifest.load(job.folder(fresh))
    (resumed,) = [e for e in manifest.data["events"] if e["event"] == "resumed"]
    assert (resumed["from_epoch"], resumed.get("from_iteration", 0)) == (stop["epoch"], stop["iteration"])
    assert manifest.status == "finished" and [e["epoch"] for e in manifest.data["epochs"]] == list(range(6))
    status = _record(job, fresh)
    assert (status["state"], status["attempts"], status["bad_endings"]) == ("done", 2, 0)


def test_after_max_attempts_bad_endings_a_job_is_failed_left_alone_until_retry_counts_again(task, fresh):
    job, budget = _job(task), ["--epochs", "3", "--iters-per-epoch", "3", "--val-iters-per-epoch", "1",
                               "--checkpoint-every", "1", "--max-attempts", "1"]
    launcher = _launch(task, *budget)
    os.kill(_worker_once_trained(fresh, job, launcher, epochs=1), signal.SIGTERM)  # scancel's signal
    output, _ = launcher.communicate(timeout=120)
    assert launcher.returncode == 1 and f"[killed]  {job.id}" in output, output
    assert "the worker was terminated by SIGTERM" in output

    manifest = RunManifest.load(job.folder(fresh))
    (stop,) = [e for e in manifest.data["events"] if e["event"] == "stopped_at_boundary"]  # saved where it was
    assert stop["signal"] == "SIGTERM" and manifest.data["checkpoint"]["iteration"] == stop["iteration"]
    reason = ("gave up after 1 attempt(s) that ended badly (--max-attempts 1); last: terminated by SIGTERM (scancel, "
              "a time limit reached without warning, or kill)")
    assert manifest.status == "failed" and manifest.data["error"]["message"] == reason
    status = _record(job, fresh)
    assert (status["state"], status["detail"], status["attempts"]) == ("failed", f"AttemptsExhausted: {reason}", 1)

    generations = claims.claim_records(fresh.claims, job.id)
    again = run_segbook("batch", "run", *_selection(task, "--device", "cpu"), *budget)
    assert "1 failed" in again.stdout and "nothing to run" in again.stdout
    assert claims.claim_records(fresh.claims, job.id) == generations  # left alone: not even claimed

    retried = run_segbook("batch", "retry", "--failed", *_selection(task, "--device", "cpu"), *budget)
    assert f"retry {job.id} (was: AttemptsExhausted: {reason}); runs here (where it last ran)" in retried.stdout
    assert "1 done" in retried.stdout
    manifest = RunManifest.load(job.folder(fresh))
    (resumed,) = [e for e in manifest.data["events"] if e["event"] == "resumed"]
    assert (resumed["from_epoch"], resumed.get("from_iteration", 0)) == (stop["epoch"], stop["iteration"])
    assert manifest.status == "finished" and [e["epoch"] for e in manifest.data["epochs"]] == [0, 1, 2]
    status = _record(job, fresh)
    assert (status["state"], status["attempts"], status["bad_endings"]) == ("done", 2, 0)


# --- checkpoints checked before anything starts -------------------------------------------------------------------

def test_bad_weights_are_refused_before_anything_is_prepared_started_or_submitted(task, fresh, tmp_path):
    marker = tmp_path / "payload_ran"
    truncated = tmp_path / "truncated.model"
    truncated.write_bytes(task.weights.read_bytes()[:20000])
    expected = {
        truncated: f"{truncated} is corrupt or not a checkpoint",
        write_payload_checkpoint(tmp_path / "payload.model", marker): "would import and run `posix.system`",
        write_official_checkpoint(create_stunet("small", 1, 105).state_dict(), tmp_path / "small.model"):
            "holds STU-Net small (widths 16..256"}
    selection = ["--registry", str(task.registry_file), "--tasks", task.entry.key, "--models", "tiny", "--init",
                 "pretrained"]
    for command in (["run", "--device", "cpu"], ["submit", "--dry-run"]):
        for weights, message in expected.items():
            result = run_segbook("batch", *command, *selection, "--weights", str(weights), check=False)
            error = result.stderr.strip()
            assert result.returncode == 2 and error.startswith("segbook: error: ") and message in error, error
            assert len(error.splitlines()) == 1 and (weights != truncated or "refused" not in error.replace(
                str(tmp_path), "TMP"))  # corrupt, not a safety refusal
            assert "#SBATCH" not in result.stdout and " start " not in result.stdout
    assert not marker.exists() and not fresh.results.exists() and not fresh.claims.exists()
    assert not fresh.batch.exists()  # no preparation record, no submission

    dry = run_segbook("batch", "submit", "--dry-run", *selection, "--weights", str(task.weights)).stdout
    script = dry[dry.index("#!/bin/bash"):]
    assert "srun --unbuffered --output " in script and f" {sys.executable} -u -m submitit.core._submit " in script
    assert " python " not in script  # the interpreter that will run, not whichever `python` a node finds first


# --- a dataset's folders while its runs are live ------------------------------------------------------------------

def test_neither_plan_force_nor_a_reimport_replaces_the_data_of_a_live_run(imported, tmp_path):
    paths, registry_file, entry = imported
    plan_task(entry, paths, num_processes=1, progress=False)
    version = preprocessed_version(entry.nnunet_name, paths)
    data = preprocessed_folder(entry, paths), raw_folder(entry, paths)
    inodes = [folder.stat().st_ino for folder in data]
    trainer = subprocess.Popen([sys.executable, "-m", "segbook.cli.main", "finetune", "--registry", str(registry_file),
                                "--task", entry.key, "--model", "tiny", "--device", "cpu", "--epochs", "100",
                                "--iters-per-epoch", "2", "--val-iters-per-epoch", "1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    folder = build_matrix(load_registry([registry_file]), entry.key, models="tiny", inits="scratch")[0].folder(paths)
    try:
        deadline = time.monotonic() + 120
        while (RunManifest.load(folder, history=False) or RunManifest(folder, {})).status != "running":
            assert trainer.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        source = next((tmp_path / "good" / "synthetic_source").iterdir())
        for command, action in ((["plan", "--task", entry.key, "--force"], "Planning"),
                                (["data", "import", "--task", entry.key, "--from", str(source), "--force"],
                                 "Importing")):
            refused = run_segbook(*command, "--registry", str(registry_file), check=False)
            assert refused.returncode == 2, refused.stdout + refused.stderr
            assert refused.stderr.startswith(f"segbook: error: {action} {entry.key} again would replace the data "
                                             f"under 1 live run(s) of {entry.nnunet_name}: {entry.key}__tiny__"
                                             "scratch__fold_all (claimed by "), refused.stderr
            assert f"pid {trainer.pid}" in refused.stderr
            assert [f.stat().st_ino for f in data] == inodes and preprocessed_version(entry.nnunet_name, paths) == \
                version
            assert not [p.name for p in paths.preprocessed.iterdir() if p.name.startswith(".")]  # no staged copy
        assert trainer.poll() is None  # it trained on, undisturbed
    finally:
        os.killpg(trainer.pid, signal.SIGINT)
        trainer.wait(timeout=120)
    assert RunManifest.load(folder).status == "interrupted"
    run_segbook("plan", "--task", entry.key, "--force", "--registry", str(registry_file))  # no live run now
    assert preprocessed_version(entry.nnunet_name, paths) != version


def test_a_task_with_fewer_cases_than_folds_gets_no_splits_and_says_why(tmp_path):
    """sklearn's KFold cannot split 3 cases 5 ways: the split is refused in words (fold all still trains), and
    nothing is written."""
    data = tmp_path / "nnUNetPlans_3d_fullres"
    data.mkdir()
    for case in ("a", "b", "c"):  # nnU-Net's blosc2 layout, as get_identifiers lists it
        (data / f"{case}.b2nd").write_bytes(b"")
        (data / f"{case}_seg.b2nd").write_bytes(b"")
    with pytest.raises(TooFewCasesForFolds, match="3 training case.*at least 5; train fold all"):
        write_crossval_splits(tmp_path, data)
    assert not (tmp_path / SPLITS).exists()
