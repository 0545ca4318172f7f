"""`segbook batch`: the job matrix, job states, GPU-hour estimates, claims, and the local runner end to end (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import planned_tiny_task, run_segbook, tiny_spec, use_planned_task

from segbook import claims
from segbook.batch.estimate import ForwardFlops, estimate_job, estimate_jobs, task_geometry
from segbook.batch.execute import ExecutionOptions
from segbook.batch.local import slots_for
from segbook.batch.matrix import MatrixError, build_matrix, job_from_id, job_status, survey
from segbook.batch.slurm import SlurmOptions, time_minutes
from segbook.errors import SegbookError
from segbook.paths import Paths
from segbook.registry import load_registry
from segbook.training.manifest import RunManifest
from segbook.training.settings import TrainingSettings

BUDGET = ["--epochs", "2", "--iters-per-epoch", "2", "--val-iters-per-epoch", "1", "--checkpoint-every", "1"]


# --- the matrix ---------------------------------------------------------------------------------------------------

def test_matrix_of_the_whole_study_and_its_filters():
    registry = load_registry()
    jobs = build_matrix(registry)
    assert len(jobs) == len(registry) * 7  # nnU-Net scratch + 3 STU-Net sizes x 2 initialisations
    assert not [j for j in jobs if j.spec.model == "nnunet" and j.spec.init == "pretrained"]
    assert len({j.id for j in jobs}) == len(jobs)
    assert all(job_from_id(registry, j.id) == j for j in jobs)

    two = build_matrix(registry, "613,004", models="large,nnunet", inits="pretrained,scratch", folds="all,0")
    assert [j.entry.paper_task for j in two][::6] == ["613", "004"]
    assert len(two) == 2 * 3 * 2 and {j.spec.fold for j in two} == {"all", "0"}
    mri = build_matrix(registry, modality="MRI", models="base", inits="scratch")
    assert mri and {j.entry.modality for j in mri} == {"MRI"}
    assert len(mri) == len(registry.select(modality="MRI"))
    small_lesions = build_matrix(registry, scale="small", target="lesion", models="nnunet")
    assert {(j.entry.scale, j.entry.target) for j in small_lesions} == {("small", "Lesion")}
    assert build_matrix(registry, "613", modality="MRI") == []  # 613 is CT
    with pytest.raises(MatrixError, match="unknown model"):
        build_matrix(registry, models="base,gigantic")
    with pytest.raises(MatrixError, match="not a job id"):
        job_from_id(registry, "Task613_COVID-19-20__base")


# --- job states from hand-made run folders ------------------------------------------------------------------------

def _manifest(job, paths: Paths, status: str, epochs: int = 0, **extra) -> Path:
    folder = job.folder(paths)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = RunManifest(folder, {"status": status, "settings": {"epochs": 5},
                                    "epochs": [{"epoch": e} for e in range(epochs)], "events": [], **extra})
    manifest.save()
    return folder


def test_job_states_from_run_folders_claims_and_weights(segbook_home):
    registry = load_registry()
    paths = Paths.from_env()
    scratch, pretrained = build_matrix(registry, "009", models="base", inits="scratch,pretrained")
    state = lambda job, **kw: job_status(job, paths, **kw)  # noqa: E731

    assert state(scratch).state == "blocked" and "data missing" in state(scratch).detail
    raw = paths.raw / scratch.entry.nnunet_name
    raw.mkdir(parents=True)
    (raw / "dataset.json").write_text("{}")
    assert (state(scratch).state, state(scratch).detail) == ("pending", "new")

    assert state(pretrained).state == "blocked" and "weights missing" in state(pretrained).detail
    weights = segbook_home / "base.model"
    assert "not found" in state(pretrained, weights=weights).detail
    weights.write_bytes(b"x")
    assert state(pretrained, weights=weights).state == "pending"
    paths.weights.mkdir(parents=True)
    (paths.weights / "base_ep4k.model").write_bytes(b"x")  # the official checkpoint, cached
    assert state(pretrained).state == "pending"
    (paths.weights / "base_ep4k.model").unlink()
    folder = _manifest(pretrained, paths, "interrupted", epochs=3)
    assert state(pretrained).detail.startswith("weights missing")  # no checkpoint: it would start afresh
    (folder / "checkpoint_latest.pth").write_bytes(b"")
    status = state(pretrained)  # resumes: the weights are in the checkpoint already
    assert (status.state, status.detail, status.epochs_done, status.epochs_total) == (
        "pending", "resumes after epoch 3", 3, 5)

    folder = _manifest(scratch, paths, "running", epochs=1)
    assert state(scratch).detail == "restarts (no checkpoint yet)"  # its process is gone: no claim
    claim = claims.try_claim(paths.claims, scratch.id)
    assert state(scratch).state == "running" and f"pid {os.getpid()}" in state(scratch).detail
    claim.release("done")
    assert state(scratch).state == "pending"

    _manifest(scratch, paths, "failed", error={"type": "RuntimeError", "message": "CUDA out of memory"})
    assert (state(scratch).state, state(scratch).detail) == ("failed", "RuntimeError: CUDA out of memory")
    _manifest(scratch, paths, "finished", epochs=5)
    assert (state(scratch).state, state(scratch).detail) == ("pending", "evaluate only")
    _manifest(scratch, paths, "finished", epochs=5,
              evaluation_error={"type": "EvaluationError", "message": "no test cases"})
    assert state(scratch).state == "failed" and state(scratch).detail.startswith("evaluation: EvaluationError")
    (folder / "evaluation").mkdir()
    (folder / "evaluation" / "summary.json").write_text("{}")
    assert state(scratch).state == "done"
    assert [s.state for s in survey([scratch, pretrained], paths)] == ["done", "pending"]


# --- estimates ----------------------------------------------------------------------------------------------------

def test_estimates_grow_with_model_and_budget_and_totals_add_up(segbook_home):
    registry = load_registry()
    paths = Paths.from_env()
    jobs = build_matrix(registry, "009,004", models="tiny,base,large,huge,nnunet", inits="scratch")
    budget = TrainingSettings()
    estimates = estimate_jobs(jobs, lambda job: budget, paths)
    for task in ("Task009_Spleen", "Task004_Hippocampus"):
        hours = [estimates[j.id].gpu_hours for j in jobs if j.entry.key == task and j.spec.model != "nnunet"]
        assert hours == sorted(hours) and len(set(hours)) == 4  # tiny < base < large < huge
    spleen = next(j for j in jobs if j.entry.key == "Task009_Spleen" and j.spec.model == "large")
    geometry = task_geometry(spleen.entry, paths)
    assert geometry.source == "reference" and list(geometry.patch) == spleen.entry.reference_patch_size
    flops = ForwardFlops()
    one = estimate_job(spleen, budget, geometry, flops)
    twice = estimate_job(spleen, TrainingSettings(epochs=2000), geometry, flops)
    longer = estimate_job(spleen, TrainingSettings(iterations_per_epoch=500), geometry, flops)
    assert twice.training_flops == 2 * one.training_flops and twice.gpu_hours > one.gpu_hours
    assert longer.training_flops == 2 * one.training_flops and longer.validation_flops == one.validation_flops
    assert one.training_flops == 3 * one.forward_flops * 2 * 250 * 1000
    assert one.remaining_gpu_hours(500) == pytest.approx(
        one.hours(0.5 * (one.training_flops + one.validation_flops) + one.prediction_flops))
    # The documented calibration: nnU-Net's network, 128^3, batch 2, 1000 x 250 iterations: about 10 GPU-hours.
    cubic = next(e for e in registry if e.reference_patch_size == [128, 128, 128] and len(e.labels) == 2)
    (nnunet,) = build_matrix(registry, cubic.key, models="nnunet")
    assert 9 < estimate_job(nnunet, budget, task_geometry(cubic, paths), flops).gpu_hours < 12
    assert (paths.batch / "flops.json").is_file()  # counted once, cached

    result = run_segbook("batch", "plan", "--tasks", "009,004", "--models", "base,nnunet", "--format", "json")
    plan = json.loads(result.stdout)
    total = next(t for t in plan["totals"] if t["state"] == "total")
    assert total["jobs"] == len(plan["jobs"]) == 6
    assert total["gpu_hours"] == pytest.approx(sum(j["gpu_hours"] for j in plan["jobs"]), abs=0.02)
    assert all(j["state"] == "blocked" and j["patch"].endswith("(ref)") for j in plan["jobs"])


# --- options ------------------------------------------------------------------------------------------------------

def test_options_for_workers_and_sbatch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    options = ExecutionOptions.create(registry_files=["mine.yaml"], weights="w.model", device="cpu",
                                      settings=TrainingSettings(epochs=3), pretrained_settings=TrainingSettings(lr=1))
    assert options.registry_files == (str(tmp_path / "mine.yaml"),) and options.weights == str(tmp_path / "w.model")
    assert ExecutionOptions.from_json(options.to_json()) == options

    assert [time_minutes(t) for t in ("48:00:00", "2-00:00:00", "90", "1:30", "1-2", "0:0:59")] == [
        2880, 2880, 90, 2, 1560, 1]
    with pytest.raises(SegbookError, match="SLURM time"):
        time_minutes("two days")
    parameters = SlurmOptions(partition="gpu", gpus_per_job=2, mem="64G", account="lab",
                              extra_sbatch=("--qos=high", "exclusive")).parameters()
    assert parameters == {"job_name": "segbook", "partition": "gpu", "time": 2880, "cpus_per_task": 16,
                          "gpus_per_node": 2, "account": "lab",
                          "additional_parameters": {"qos": "high", "exclusive": True, "mem": "64G"}}
    assert SlurmOptions(gpus_per_job=0).parameters()["cpus_per_task"] == 1
    with pytest.raises(SegbookError, match="extra-sbatch"):
        SlurmOptions(extra_sbatch=("--Bad Option",)).parameters()

    assert slots_for("cpu", None, 1, 3) == ["", "", ""]
    assert slots_for("cuda", ["0", "1", "2", "3", "4"], 2, None) == ["0,1", "2,3"]
    with pytest.raises(SegbookError, match="--gpus-per-job"):
        slots_for("cuda", ["0"], 2, None)
    assert slots_for("cuda", ["0", "1", "2"], 1, 2) == ["0", "1"]
    with pytest.raises(SegbookError, match="--gpus is for"):
        slots_for("cpu", ["0"], 1, None)


# --- claims -------------------------------------------------------------------------------------------------------

def test_claim_is_exclusive_released_and_reclaimed(tmp_path):
    claim = claims.try_claim(tmp_path, "job")
    assert isinstance(claim, claims.Claim) and claim.generation == 0
    again = claims.try_claim(tmp_path, "job")
    assert isinstance(again, claims.ClaimRecord) and again.pid == os.getpid()  # held by a live process: by us
    assert claims.holder(tmp_path / "job") == claim.record
    claim.release("done")
    assert claims.holder(tmp_path / "job") is None
    second = claims.try_claim(tmp_path, "job")
    assert isinstance(second, claims.Claim) and second.generation == 1
    assert [c["outcome"] for c in claims.claim_records(tmp_path, "job")] == ["done", None]


def test_concurrent_threads_exactly_one_wins(tmp_path):
    barrier = threading.Barrier(16)
    results = []

    def claim() -> None:
        barrier.wait()
        results.append(claims.try_claim(tmp_path, "job"))

    threads = [threading.Thread(target=claim) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(isinstance(r, claims.Claim) for r in results) == 1
    assert len(os.listdir(tmp_path / "job")) == 1


CLAIMER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from segbook import claims
    root, start, finish = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    print("ready", flush=True)
    while not start.exists():
        time.sleep(0.01)
    result = claims.try_claim(root, "job")
    print("won" if isinstance(result, claims.Claim) else "lost", flush=True)
    while not finish.exists():  # stay alive: a holder that exits is gone, and may be taken over
        time.sleep(0.05)
""")


def test_concurrent_processes_exactly_one_wins(tmp_path):
    start, finish = tmp_path / "start", tmp_path / "finish"
    processes = [subprocess.Popen([sys.executable, "-c", CLAIMER, str(tmp_path / "claims"), str(start),
                                   str(finish)], stdout=subprocess.PIPE, text=True) for _ in range(6)]
    assert [p.stdout.readline().strip() for p in processes] == ["ready"] * 6  # all at the start line
    start.touch()
    answers = [p.stdout.readline().strip() for p in processes]
    finish.touch()
    for process in processes:
        process.wait(timeout=30)
    assert sorted(answers) == ["lost"] * 5 + ["won"]


def test_gone_holders_are_taken_over_live_ones_never(tmp_path, monkeypatch):
    dead = subprocess.run([sys.executable, "-c", "import sys, os; from pathlib import Path; "
                           "from segbook import claims; claims.try_claim(Path(sys.argv[1]), 'job'); "
                           "os._exit(0)", str(tmp_path)], check=True)  # exits without releasing
    assert dead.returncode == 0
    (record,) = claims.claim_records(tmp_path, "job")
    assert not record["released"]
    taken = claims.try_claim(tmp_path, "job")
    assert isinstance(taken, claims.Claim) and taken.generation == 1

    taken.release("done")
    live = subprocess.Popen([sys.executable, "-c", CLAIMER, str(tmp_path), str(tmp_path), str(tmp_path / "end")],
                            stdout=subprocess.PIPE, text=True)
    assert [live.stdout.readline().strip() for _ in range(2)] == ["ready", "won"]
    path = claims.latest(tmp_path / "job")[2]
    stale_heartbeat = {**json.loads(path.read_text()), "heartbeat": time.time() - 10 * claims.HEARTBEAT_TIMEOUT_S}
    path.write_text(json.dumps(stale_heartbeat))
    held = claims.try_claim(tmp_path, "job")
    assert isinstance(held, claims.ClaimRecord) and held.pid == live.pid  # its pid lives: the heartbeat is moot
    (tmp_path / "end").touch()
    live.wait(timeout=30)
    assert isinstance(claims.try_claim(tmp_path, "job"), claims.Claim)  # gone now

    # Holders elsewhere: SLURM's word when there is one, else the heartbeat.
    far = claims.ClaimRecord(job="job", token="t", host="another-node", pid=1, pid_start=None, slurm_job="12_0",
                             slurm_restart=0, created_at="", heartbeat=time.time())
    assert claims.gone_reason(far, {"12_0": "RUNNING"}) is None
    assert "CANCELLED" in claims.gone_reason(far, {"12_0": "CANCELLED"})
    assert "no longer in squeue" in claims.gone_reason(far, {})
    outside = replace(far, slurm_job=None)
    assert claims.gone_reason(outside, None) is None
    old = replace(outside, heartbeat=time.time() - claims.HEARTBEAT_TIMEOUT_S - 5)
    assert "no heartbeat" in claims.gone_reason(old, None)
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "12")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # we are 12_0 requeued: 12_0's earlier run has ended
    assert "earlier run" in claims.gone_reason(far, {"12_0": "RUNNING"})


def test_a_holder_taken_over_notices_and_stops(tmp_path):
    claim = claims.try_claim(tmp_path, "job")
    lost = threading.Event()
    with claim.held(interval_s=0.05, on_lost=lost.set):
        newer = claims._path(tmp_path / "job", 1)
        newer.write_text(json.dumps({**json.loads(claim.path.read_text()), "pid": 1}))
        assert lost.wait(5)
    assert claim.lost() and not claim.beat()
    assert not json.loads(claim.path.read_text())["released"]  # a lost claim is not ours to write


# --- the local runner, end to end on the CPU ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A tiny synthetic CT task, imported and planned, and a tiny "pretrained" checkpoint, shared by the module."""
    with planned_tiny_task(tmp_path_factory.mktemp("batch"), tiny_spec(), seed=3) as task:
        yield task


@pytest.fixture
def fresh(task, tmp_path, monkeypatch):
    return use_planned_task(task, tmp_path, monkeypatch)


def _matrix_args(task, *extra: str, weights: Path | None = None) -> list[str]:
    return ["--registry", str(task.registry_file), "--tasks", task.entry.key, "--models", "tiny",
            "--weights", str(weights or task.weights), *extra]


def _jobs(task):
    return build_matrix(load_registry([task.registry_file]), task.entry.key, models="tiny")


def _events(folder: Path) -> list[str]:
    return [e["event"] for e in RunManifest.load(folder).data["events"]]


def test_local_run_trains_and_evaluates_every_job_once(task, fresh):
    result = run_segbook("batch", "run", *_matrix_args(task, "--device", "cpu", "--workers", "1", *BUDGET))
    assert "2 done" in result.stdout, result.stdout
    for status in survey(_jobs(task), fresh):
        assert (status.state, status.epochs_done) == ("done", 2)
        folder = status.job.folder(fresh)
        assert json.loads((folder / "evaluation" / "summary.json").read_text())["num_cases"] == 2
        assert RunManifest.load(folder).data["request"]["via"] == "segbook batch"
    pretrained = next(j for j in _jobs(task) if j.spec.init == "pretrained").folder(fresh)
    assert _events(pretrained).count("pretrained_weights_loaded") == 1
    assert (fresh.batch / "logs" / f"{_jobs(task)[0].id}.log").is_file()

    started = time.monotonic()
    again = run_segbook("batch", "run", *_matrix_args(task, "--device", "cpu", *BUDGET))
    assert "nothing to run" in again.stdout and "start" not in again.stdout
    assert time.monotonic() - started < 30


def test_a_failing_job_is_recorded_the_others_finish_and_retry_runs_it(task, fresh):
    broken = task.root / "broken.model"
    broken.write_bytes(b"not a checkpoint")
    result = run_segbook("batch", "run", *_matrix_args(task, "--device", "cpu", *BUDGET, weights=broken), check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 done, 1 failed" in result.stdout
    by_init = {s.job.spec.init: s for s in survey(_jobs(task), fresh)}
    assert by_init["scratch"].state == "done" and by_init["pretrained"].state == "failed"
    manifest = RunManifest.load(by_init["pretrained"].job.folder(fresh))
    assert manifest.status == "failed" and manifest.data["error"]["stage"] == "train"
    status = json.loads(run_segbook("batch", "status", *_matrix_args(task), "--format", "json").stdout)
    assert [t["jobs"] for t in status["totals"]] == [1, 0, 1, 0, 0, 2]

    retried = run_segbook("batch", "retry", "--failed", *_matrix_args(task, "--device", "cpu", *BUDGET))
    assert "retry Task990_Tiny__tiny__pretrained__fold_all" in retried.stdout and "1 done" in retried.stdout
    assert all(s.state == "done" for s in survey(_jobs(task), fresh))
    manifest = RunManifest.load(by_init["pretrained"].job.folder(fresh))
    previous = manifest.data["request"]["previous_attempt"]  # it had no checkpoint: started again, history kept
    assert previous["error"] is None and [e["event"] for e in previous["events"]][-2:] == ["failed", "retry"]
    assert manifest.settings.weights == str(task.weights.resolve())


def test_ctrl_c_stops_cleanly_and_the_next_run_resumes(task, fresh):
    (job,) = [j for j in _jobs(task) if j.spec.init == "pretrained"]
    folder = job.folder(fresh)
    budget = ["--epochs", "12", "--iters-per-epoch", "2", "--val-iters-per-epoch", "1", "--checkpoint-every", "1"]
    command = [sys.executable, "-m", "segbook.cli.main", "batch", "run", *_matrix_args(task), "--init",
               "pretrained", "--device", "cpu", *budget]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (folder / "checkpoint_latest.pth").is_file() or not RunManifest.load(folder).data["epochs"]:
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.stdout.read()
        time.sleep(0.2)
    launcher.send_signal(signal.SIGINT)  # to the launcher only, as a terminal's Ctrl-C would reach it
    output, _ = launcher.communicate(timeout=120)
    assert launcher.returncode == 130, output
    assert "stopping" in output and "1 stopped" in output
    manifest = RunManifest.load(folder)
    assert manifest.status == "interrupted" and 1 <= len(manifest.data["epochs"]) < 12
    (record, *_) = claims.claim_records(fresh.claims, job.id)
    assert record["released"] and record["outcome"] == "KeyboardInterrupt"
    assert job_status(job, fresh).state == "pending"

    run_segbook("batch", "run", *_matrix_args(task), "--init", "pretrained", "--device", "cpu", *budget)
    manifest = RunManifest.load(folder)
    (resumed,) = [e for e in manifest.data["events"] if e["event"] == "resumed"]
    # A stop just after nnU-Net saved a checkpoint, before the trainer recorded that epoch, skips it in the record.
    assert set(range(resumed["from_epoch"], 12)) <= {e["epoch"] for e in manifest.data["epochs"]}
    assert manifest.status == "finished" and _events(folder).count("pretrained_weights_loaded") == 1
    assert job_status(job, fresh).state == "done"
