"""`segbook batch`: the job matrix (recipes included), job states, GPU-hour estimates, claims, retries, the worker,
and the local runner end to end (CPU)."""

from __future__ import annotations

import ast
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
import yaml
from helpers import planned_tiny_task, run_segbook, tiny_spec, use_planned_task

import segbook.batch.matrix
import segbook.training.manifest
from segbook import claims
from segbook.batch.estimate import ForwardFlops, estimate_job, estimate_jobs, task_geometry
from segbook.batch.execute import TRAINING, ExecutionOptions
from segbook.batch.forecast import forecast
from segbook.batch.local import LocalOptions
from segbook.batch.matrix import (MatrixError, build_matrix, in_states, job_from_id, job_status, several_recipes,
                                  survey)
from segbook.batch.rehearsal import REHEARSAL
from segbook.batch.retry import failed_jobs, reset_failed
from segbook.batch.slurm import SlurmOptions, submit_slurm, time_minutes
from segbook.batch.worker import EXIT_BUSY, EXIT_FAILED, result_of, worker_command
from segbook.errors import SegbookError
from segbook.options import OptionError
from segbook.paths import Paths
from segbook.recipes import RecipeError
from segbook.cli.main import main
from segbook.registry import load_registry
from segbook.runs import ANY_MODEL, RunIdentityError, parse_weights, weights_given
from segbook.training.manifest import RunManifest
from segbook.training.settings import TrainingSettings

BUDGET = ["--epochs", "2", "--iters-per-epoch", "2", "--val-iters-per-epoch", "1", "--checkpoint-every", "1"]
#: A user's recipe: SegBook's groups at another rate, with a tiny budget of its own.
MINE = {"name": "mine", "description": "a user's recipe", "source": "a test", "init": "pretrained",
        "optimizer": {"lr": 3e-3}, "groups": {"head_multiplier": 2}, "budget": {"epochs": 2, "iterations_per_epoch": 2}}


def _recipe_file(folder: Path) -> Path:
    path = folder / "recipes" / "mine.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(MINE))
    return path


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


def test_recipes_are_an_axis_of_the_pretrained_jobs():
    registry = load_registry()
    default = build_matrix(registry, "613,004")
    three = build_matrix(registry, "613,004", recipes="segbook,heads-only,llrd")
    assert len(three) == 2 * (3 * 3 + 3 + 1)  # per task: 3 sizes x 3 recipes pretrained, 3 sizes + nnU-Net scratch
    assert {j.spec.recipe for j in three if j.spec.init == "scratch"} == {"scratch"}
    assert [j.id for j in three if j.spec.recipe in ("segbook", "scratch")] == [j.id for j in default]
    assert default[0].id == "Task613_COVID-19-20__base__pretrained__fold_all"  # the ids SegBook always had
    assert three[1].id == "Task613_COVID-19-20__base__pretrained__heads-only__fold_all"
    assert three[2].spec.trainer == "SegbookTrainer_base_pretrained_llrd"
    assert len({j.id for j in three}) == len(three) and all(job_from_id(registry, j.id) == j for j in three)
    assert several_recipes(three) and not several_recipes(default)

    every = build_matrix(registry, "613", models="large", recipes="all")
    assert [j.spec.recipe for j in every] == ["segbook", "stunet-official", "heads-only", "frozen-encoder", "llrd",
                                              "warmup", "lora", "primus", "scratch"]
    assert build_matrix(registry, "613", models="nnunet", recipes="llrd")[0].spec.recipe == "scratch"

    with pytest.raises(RecipeError, match="unknown recipe 'nope'; known: segbook"):
        build_matrix(registry, "613", recipes="segbook,nope")
    with pytest.raises(RecipeError, match="base pretrained jobs: recipe 'scratch' is for scratch runs"):
        build_matrix(registry, "613", recipes="scratch")
    with pytest.raises(MatrixError, match="no recipe given"):
        build_matrix(registry, "613", recipes=" , ")
    warmup = build_matrix(registry, "613", models="large", recipes="warmup")
    ExecutionOptions(num_gpus=1).validate(warmup)
    with pytest.raises(RecipeError, match=r"large pretrained jobs of 2 GPUs \(--gpus-per-job\): recipe 'warmup' "
                                          "changes what trains between phases, which nnU-Net's DDP"):
        ExecutionOptions(num_gpus=2).validate(warmup)


@pytest.mark.slow
def test_an_unknown_or_unfitting_recipe_is_refused_before_anything_is_written(segbook_home, tmp_path):
    cases = [(["run", "--recipes", "segbook,nope"], "unknown recipe 'nope'; known: segbook"),
             (["submit", "--recipes", "scratch", "--dry-run"], "recipe 'scratch' is for scratch runs"),
             (["submit", "--recipes", "warmup", "--gpus-per-job", "2"], "DDP (--num-gpus > 1) cannot follow"),
             (["plan", "--recipes", "llrd", "--recipe-file", str(tmp_path / "missing.yaml")],
              "cannot read recipe file")]
    for args, message in cases:
        result = run_segbook("batch", *args, "--tasks", "009", "--models", "large", check=False)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "segbook: error: " in result.stderr and message in result.stderr, result.stderr
    assert not segbook_home.exists()  # no claims, logs, submissions, FLOP counts

    with pytest.raises(RecipeError, match="DDP"):  # the API refuses it as early: before asking squeue
        submit_slurm(build_matrix(load_registry(), "009", models="large", recipes="warmup"),
                     ExecutionOptions(num_gpus=2), SlurmOptions())
    assert not segbook_home.exists()


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
    assert "not found" in state(pretrained, weights=parse_weights(weights)).detail
    weights.write_bytes(b"x")
    assert state(pretrained, weights=parse_weights(weights)).state == "pending"
    assert state(pretrained, weights=parse_weights([f"base={weights}"])).state == "pending"
    assert "weights missing" in state(pretrained, weights=parse_weights([f"large={weights}"])).detail  # not base's
    paths.weights.mkdir(parents=True)
    (paths.weights / "base_ep4k.model").write_bytes(b"x")  # the official checkpoint, cached
    assert state(pretrained).state == "pending"
    (paths.weights / "base_ep4k.model").unlink()
    folder = _manifest(pretrained, paths, "interrupted", epochs=3)
    assert state(pretrained).detail.startswith("weights missing")  # no checkpoint: it would start afresh
    (folder / "checkpoint_latest.pth").write_bytes(b"")
    status = state(pretrained)  # resumes: the weights are in the checkpoint already
    assert (status.state, status.detail, status.epochs_done, status.epochs_total) == (
        "pending", "resumes from its latest checkpoint", 3, 5)
    # Where the checkpoint stands, as the trainer recorded it: not the epochs recorded after it.
    _manifest(pretrained, paths, "interrupted", epochs=3, checkpoint={"epoch": 2, "iteration": 0})
    assert (state(pretrained).detail, state(pretrained).epochs_done) == ("resumes after epoch 2", 3)
    _manifest(pretrained, paths, "interrupted", epochs=3, checkpoint={"epoch": 3, "iteration": 7})
    assert state(pretrained).detail == "resumes in epoch 4 after iteration 7"

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


def test_status_reads_each_run_json_without_its_history(segbook_home, monkeypatch):
    paths = Paths.from_env()
    (job,) = build_matrix(load_registry(), "009", models="base", inits="scratch")
    (paths.raw / job.entry.nnunet_name).mkdir(parents=True)
    (paths.raw / job.entry.nnunet_name / "dataset.json").write_text("{}")
    folder = _manifest(job, paths, "interrupted", epochs=40, checkpoint={"epoch": 40, "iteration": 0})
    (folder / "checkpoint_latest.pth").write_bytes(b"")
    assert len((folder / "epochs.jsonl").read_text().splitlines()) == 40

    def unread(*args, **kwargs):
        raise AssertionError("the survey read a run's per-epoch history")

    monkeypatch.setattr(segbook.training.manifest, "read_history", unread)
    (status,) = survey([job], paths)
    assert (status.state, status.epochs_done, status.detail) == ("pending", 40, "resumes after epoch 40")


@pytest.mark.slow
def test_the_status_table_cuts_a_long_detail_and_json_keeps_it_whole(segbook_home):
    paths = Paths.from_env()
    (job,) = build_matrix(load_registry(), "009", models="base", inits="scratch")
    message = "CUDA out of memory. Tried to allocate 2.00 GiB; " * 10  # a real error can run to 500 characters
    _manifest(job, paths, "failed", error={"type": "OutOfMemoryError", "message": message})
    args = ["--tasks", "009", "--models", "base", "--init", "scratch"]
    table = run_segbook("batch", "status", *args).stdout
    (line,) = [line for line in table.splitlines() if line.startswith("Task009_Spleen")]
    assert len(line) < 2 * segbook.batch.matrix.DETAIL_WIDTH and line.endswith("...") and "failed" in line
    (record,) = json.loads(run_segbook("batch", "status", *args, "--format", "json").stdout)["jobs"]
    assert record["detail"] == f"OutOfMemoryError: {message}"


# --- estimates ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
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


# --- the cost of a matrix: `batch plan` ---------------------------------------------------------------------------

def test_forecast_costs_each_recipe_with_its_budget_and_totals_add_up(segbook_home, tmp_path):
    mine = _recipe_file(tmp_path)
    paths = Paths.from_env()
    jobs = build_matrix(load_registry(), "009", models="base,nnunet", recipes="segbook,mine", recipe_files=[mine])
    options = ExecutionOptions.create(recipe_files=[mine])
    plan = forecast(jobs, options, paths)
    costs = {(c.status.job.spec.model, c.status.job.spec.recipe): c for c in plan.jobs}
    assert {key: c.estimate.epochs for key, c in costs.items()} == {
        ("base", "segbook"): 1000, ("base", "mine"): 2, ("base", "scratch"): 1000, ("nnunet", "scratch"): 1000}
    segbook, own = costs["base", "segbook"].estimate, costs["base", "mine"].estimate
    assert own.training_flops == pytest.approx(segbook.training_flops * (2 * 2) / (1000 * 250))  # its budget
    assert own.prediction_flops == segbook.prediction_flops

    # A done run costs nothing more; the totals add up every job, by state.
    done = costs["base", "scratch"].status.job
    _manifest(done, paths, "finished", epochs=5)
    (done.folder(paths) / "evaluation").mkdir()
    (done.folder(paths) / "evaluation" / "summary.json").write_text("{}")
    plan = forecast(jobs, options, paths)
    totals = {row["state"]: row for row in plan.totals()}
    assert (totals["done"]["jobs"], totals["blocked"]["jobs"], totals["total"]["jobs"]) == (1, 3, 4)
    assert totals["done"]["left_gpu_hours"] == 0 and totals["done"]["gpu_hours"] > 0
    assert totals["total"]["gpu_hours"] == round(sum(c.gpu_hours for c in plan.jobs), 2)
    assert totals["total"]["left_gpu_hours"] == round(sum(c.gpu_hours for c in plan.jobs
                                                          if c.status.state != "done"), 2)
    (done_cost,) = plan.in_states("done")
    assert done_cost.status.job == done and done_cost.estimate.epochs == 5  # its recorded settings, not today's
    row = done_cost.row(recipe=True)
    assert (row["recipe"], row["state"], row["left_gpu_hours"], row["patch"]) == ("scratch", "done", 0.0,
                                                                                  "64x192x160 (ref)")
    assert "recipe" not in done_cost.row() and done_cost.row(full=True)["job"] == done.id
    assert [s.job for s in in_states([c.status for c in plan.jobs], "done,failed")] == [done]


# --- options ------------------------------------------------------------------------------------------------------

def test_weights_are_given_for_every_model_or_per_model_and_checked(tmp_path, monkeypatch):
    """`--weights FILE` starts every pretrained job from FILE; `--weights MODEL=FILE` only that model's, so one batch
    mixes backbones (STU-Net from its cached checkpoint, ResEnc-L from an nnssl file)."""
    monkeypatch.chdir(tmp_path)
    weights = parse_weights(["resenc-l=openmind.pth", "all.model"])
    assert weights == {"resenc-l": str(tmp_path / "openmind.pth"), ANY_MODEL: str(tmp_path / "all.model")}
    assert weights_given(weights, "resenc-l") == str(tmp_path / "openmind.pth")
    assert weights_given(weights, "large") == str(tmp_path / "all.model")
    assert weights_given(parse_weights(["resenc-l=x.pth"]), "large") is None  # large: its cached checkpoint
    assert parse_weights("dir/a=b.model") == {ANY_MODEL: str(tmp_path / "dir" / "a=b.model")}  # a path, not a model
    with pytest.raises(RunIdentityError, match="unknown model 'resenc-xl'"):
        parse_weights(["resenc-xl=x.pth"])
    with pytest.raises(RunIdentityError, match="model large given more than once"):
        parse_weights(["large=a.model", "large=b.model"])
    options = ExecutionOptions.create(weights=["resenc-l=openmind.pth"])
    assert ExecutionOptions.from_json(options.to_json()) == options
    recorded = json.loads(options.to_json()) | {"weights": str(tmp_path / "old.model")}  # a record made before
    assert ExecutionOptions.from_json(json.dumps(recorded)).weights == {ANY_MODEL: str(tmp_path / "old.model")}


def test_a_batch_refuses_an_unknown_model_in_weights_before_writing(segbook_home, capsys):
    code = main(["batch", "plan", "--tasks", "613", "--models", "large", "--weights", "larg=x.model"])
    error = capsys.readouterr().err
    assert code == 2 and "segbook: error: --weights larg=x.model: unknown model 'larg'" in error
    assert not segbook_home.exists()



def test_options_for_workers_and_sbatch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SEGBOOK_RECIPES", "env.yaml")
    options = ExecutionOptions.create(registry_files=["mine.yaml"], recipe_files=["recipes/mine.yaml"],
                                      weights="w.model", device="cpu", settings=TrainingSettings(epochs=3),
                                      pretrained_settings=TrainingSettings(lr=1))
    assert options.registry_files == (str(tmp_path / "mine.yaml"),)
    assert options.weights == {ANY_MODEL: str(tmp_path / "w.model")}
    assert options.recipe_files == (str(tmp_path / "env.yaml"), str(tmp_path / "recipes" / "mine.yaml"))
    assert ExecutionOptions.from_json(options.to_json()) == options
    assert options.gpus_per_job == 0 and ExecutionOptions(num_gpus=2).gpus_per_job == 2
    with pytest.raises(OptionError, match="--gpus-per-job 2 needs --device cuda"):
        ExecutionOptions(device="cpu", num_gpus=2).validate()
    with pytest.raises(OptionError, match="--gpus-per-job must be an integer >= 1, got 0"):
        ExecutionOptions(num_gpus=0).validate()
    with pytest.raises(OptionError, match="--max-attempts must be an integer >= 1, got 0"):
        ExecutionOptions(max_attempts=0).validate()
    with pytest.raises(OptionError, match="threads must be an integer >= 1, got 0"):
        ExecutionOptions(threads=0).validate()
    assert ExecutionOptions.from_json(ExecutionOptions(threads=2).to_json()).threads == 2
    with pytest.raises(OptionError, match="unknown job body 'sleep'; choose one of train, noop"):
        ExecutionOptions(body="sleep").validate()
    rehearsal = ExecutionOptions(body="noop")  # the body is an object, named in the JSON a worker reads back
    assert rehearsal.body is REHEARSAL and json.loads(rehearsal.to_json())["body"] == "noop"
    assert ExecutionOptions.from_json(rehearsal.to_json()).body is REHEARSAL and ExecutionOptions().body is TRAINING

    assert [time_minutes(t) for t in ("48:00:00", "2-00:00:00", "90", "1:30", "1-2", "0:0:59")] == [
        2880, 2880, 90, 2, 1560, 1]
    with pytest.raises(SegbookError, match="SLURM time"):
        time_minutes("two days")
    slurm = SlurmOptions(partition="gpu", mem="64G", account="lab", extra_sbatch=("--qos=high", "exclusive"))
    assert slurm.parameters(ExecutionOptions(num_gpus=2).gpus_per_job) == {
        "job_name": "segbook", "partition": "gpu", "time": 2880, "cpus_per_task": 16, "gpus_per_node": 2,
        "account": "lab", "additional_parameters": {"qos": "high", "exclusive": True, "mem": "64G"}}
    cpu = SlurmOptions().parameters(options.gpus_per_job)
    assert cpu["cpus_per_task"] == 1 and "gpus_per_node" not in cpu
    with pytest.raises(SegbookError, match="extra-sbatch"):
        SlurmOptions(extra_sbatch=("--Bad Option",)).parameters(1)
    with pytest.raises(OptionError, match="--array-parallelism must be an integer >= 1"):
        SlurmOptions(array_parallelism=0).parameters(1)

    cuda = lambda gpus: ExecutionOptions(device="cuda", num_gpus=gpus)  # noqa: E731
    assert LocalOptions(workers=3).slots(options) == ["", "", ""]
    assert LocalOptions(gpus=("0", "1", "2", "3", "4")).slots(cuda(2)) == ["0,1", "2,3"]
    with pytest.raises(SegbookError, match="--gpus-per-job"):
        LocalOptions(gpus=("0",)).slots(cuda(2))
    assert LocalOptions(gpus=("0", "1", "2"), workers=2).slots(cuda(1)) == ["0", "1"]
    with pytest.raises(SegbookError, match="--gpus is for"):
        LocalOptions(gpus=("0",)).slots(options)
    with pytest.raises(OptionError, match="--workers must be an integer >= 1"):
        LocalOptions(workers=0).slots(options)


# --- failed jobs and retries, and the worker's exit statuses ------------------------------------------------------

def test_failed_jobs_are_found_and_reset_with_their_errors_kept(segbook_home):
    paths = Paths.from_env()
    trained, evaluated, new = build_matrix(load_registry(), "009", models="base", inits="pretrained",
                                           recipes="segbook,llrd,heads-only")
    _manifest(trained, paths, "failed", epochs=2, error={"type": "RuntimeError", "message": "CUDA out of memory"})
    _manifest(evaluated, paths, "finished", epochs=5,
              evaluation_error={"type": "EvaluationError", "message": "no test cases"})
    failed = failed_jobs([trained, evaluated, new], paths)
    assert [(s.job, s.detail) for s in failed] == [(trained, "RuntimeError: CUDA out of memory"),
                                                   (evaluated, "evaluation: EvaluationError: no test cases")]

    held = claims.try_claim(paths.claims, evaluated.id)  # a live holder: its job is not touched
    (reset,) = reset_failed([trained, evaluated, new], paths)
    assert (reset.job, reset.error) == (trained, "RuntimeError: CUDA out of memory")
    manifest = RunManifest.load(trained.folder(paths))
    assert (manifest.status, manifest.data["error"]) == ("created", None)
    assert manifest.data["events"][-1]["previous_error"] == "RuntimeError: CUDA out of memory"
    assert failed_jobs([trained, evaluated, new], paths) == []  # the held one is running

    held.release("done")
    assert [s.job for s in failed_jobs([trained, evaluated, new], paths)] == [evaluated]
    assert [(r.job, r.error) for r in reset_failed([trained, evaluated, new], paths)] == [
        (evaluated, "evaluation: EvaluationError: no test cases")]
    manifest = RunManifest.load(evaluated.folder(paths))
    assert manifest.status == "finished" and "evaluation_error" not in manifest.data
    assert failed_jobs([trained, evaluated, new], paths) == []


def test_the_worker_says_how_its_job_ended_in_its_exit_status(segbook_home):
    paths = Paths.from_env()
    registry = load_registry()
    (job,) = build_matrix(registry, "009", models="base", inits="pretrained", recipes="llrd")
    options = ExecutionOptions(device="cpu")
    command = worker_command(job, options)
    assert command[-4:] == ["--job", "Task009_Spleen__base__pretrained__llrd__fold_all", "--options",
                            options.to_json()]

    held = claims.try_claim(paths.claims, job.id)
    busy = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert busy.returncode == EXIT_BUSY and result_of(busy.returncode) == "busy", busy.stderr
    assert f"{job.id}: busy" in busy.stdout and f"pid {os.getpid()}" in busy.stdout
    held.release("done")

    _manifest(job, paths, "failed", error={"type": "RuntimeError", "message": "CUDA out of memory"})
    failed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert failed.returncode == EXIT_FAILED and result_of(failed.returncode) == "failed", failed.stderr
    assert "failed earlier (RuntimeError: CUDA out of memory)" in failed.stdout
    assert (result_of(0), result_of(130), result_of(-9)) == ("done", None, None)


def test_a_duplicate_that_finds_its_job_done_or_failed_claims_nothing_and_counts_no_attempt(segbook_home):
    """Issue 22: a job submitted twice runs twice in SLURM; the duplicate that finds it done (or failed, waiting for
    `batch retry`) must not take a claim, which would count an attempt."""
    paths = Paths.from_env()
    (job,) = build_matrix(load_registry(), "009", models="base", inits="scratch")
    folder = _manifest(job, paths, "finished", epochs=5)
    (folder / "evaluation").mkdir()
    (folder / "evaluation" / "summary.json").write_text("{}")
    command = worker_command(job, ExecutionOptions(device="cpu"))
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and f"{job.id}: done already done" in done.stdout, done.stdout + done.stderr
    assert claims.claim_records(paths.claims, job.id) == [] and job_status(job, paths).attempts.count == 0

    _manifest(job, paths, "failed", error={"type": "RuntimeError", "message": "CUDA out of memory"})
    failed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert failed.returncode == EXIT_FAILED and "failed earlier (RuntimeError: CUDA out of memory)" in failed.stdout
    assert claims.claim_records(paths.claims, job.id) == []


# --- module structure ---------------------------------------------------------------------------------------------

#: segbook.batch's modules, each importing (at the top, inside a function, or for type checking only) only modules
#: listed before it (as in tests/test_imports.py).
BATCH_LAYERS = ("signals", "cluster", "submissions", "attempts", "jobs", "preparation", "rehearsal", "matrix",
                "estimate", "weights", "execute", "retry", "worker", "forecast", "planner", "local", "slurm")


def _batch_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("segbook.batch."):
            names.add(node.module.removeprefix("segbook.batch."))
        elif isinstance(node, ast.Import):
            names |= {a.name.removeprefix("segbook.batch.") for a in node.names if a.name.startswith("segbook.batch.")}
    return names


def test_batch_modules_import_each_other_without_cycles():
    folder = Path(segbook.batch.matrix.__file__).parent
    assert {p.stem for p in folder.glob("*.py")} - {"__init__"} == set(BATCH_LAYERS)
    for index, module in enumerate(BATCH_LAYERS):
        assert _batch_imports(folder / f"{module}.py") <= set(BATCH_LAYERS[:index]), module


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_user_recipe_reaches_the_worker_and_plan_shows_each_recipe(task, fresh, tmp_path, monkeypatch):
    _recipe_file(tmp_path)
    monkeypatch.chdir(tmp_path)  # a relative --recipe-file: the workers get it as an absolute path
    args = [*_matrix_args(task), "--init", "pretrained", "--recipe-file", "recipes/mine.yaml"]
    plan = run_segbook("batch", "plan", *args, "--recipes", "segbook,mine").stdout
    header = plan.splitlines()[0].split()
    assert header[:5] == ["task", "model", "init", "recipe", "fold"], plan
    assert "segbook" in plan and "mine" in plan and "pretrained__mine" not in plan

    result = run_segbook("batch", "run", *args, "--recipes", "mine", "--device", "cpu", "--val-iters-per-epoch", "1",
                         "--checkpoint-every", "1")
    assert "1 done" in result.stdout, result.stdout
    (job,) = build_matrix(load_registry([task.registry_file]), task.entry.key, models="tiny", inits="pretrained",
                          recipes="mine", recipe_files=[tmp_path / "recipes" / "mine.yaml"])
    assert job.id == f"{task.entry.key}__tiny__pretrained__mine__fold_all" and job_status(job, fresh).state == "done"
    manifest = RunManifest.load(job.folder(fresh))
    assert manifest.recipe.name == "mine" and manifest.recipe.optimizer.lr == 3e-3
    assert (manifest.settings.epochs, manifest.settings.iterations_per_epoch, len(manifest.data["epochs"])) == (
        2, 2, 2)  # the recipe's own budget
    status = json.loads(run_segbook("batch", "status", *args, "--recipes", "segbook,mine", "--format",
                                    "json").stdout)
    assert {(j["recipe"], j["state"]) for j in status["jobs"]} == {("segbook", "pending"), ("mine", "done")}


@pytest.mark.slow
def test_a_failing_job_is_recorded_the_others_finish_and_retry_runs_it(task, fresh):
    broken = task.root / "broken.model"
    broken.write_bytes(b"not a checkpoint")
    # Checked before anything starts: corrupt, said as such, and nothing is written.
    result = run_segbook("batch", "run", *_matrix_args(task, "--device", "cpu", *BUDGET, weights=broken), check=False)
    assert result.returncode == 2 and "segbook: error: " in result.stderr, result.stdout + result.stderr
    assert f"{broken} is corrupt or not a checkpoint: it is damaged or truncated" in result.stderr
    assert "refused" not in result.stderr and not fresh.results.exists() and not fresh.claims.exists()

    # A job that meets a broken file anyway (it changed after the check) fails, recorded; the others go on.
    (pretrained,) = [j for j in _jobs(task) if j.spec.init == "pretrained"]
    options = ExecutionOptions.create(registry_files=[task.registry_file], weights=broken, device="cpu",
                                      settings=TrainingSettings(epochs=2, iterations_per_epoch=2,
                                                                val_iterations_per_epoch=1))
    worker = subprocess.run(worker_command(pretrained, options), capture_output=True, text=True, timeout=300)
    assert worker.returncode == EXIT_FAILED, worker.stdout + worker.stderr
    result = run_segbook("batch", "run", *_matrix_args(task, "--device", "cpu", *BUDGET))
    assert "2 jobs: 1 failed, 1 pending" in result.stdout and "1 done" in result.stdout
    by_init = {s.job.spec.init: s for s in survey(_jobs(task), fresh)}
    assert by_init["scratch"].state == "done" and by_init["pretrained"].state == "failed"
    manifest = RunManifest.load(pretrained.folder(fresh))
    assert manifest.status == "failed" and manifest.data["error"]["stage"] == "train"
    status = json.loads(run_segbook("batch", "status", *_matrix_args(task), "--format", "json").stdout)
    assert [t["jobs"] for t in status["totals"]] == [1, 0, 1, 0, 0, 2]

    retried = run_segbook("batch", "retry", "--failed", *_matrix_args(task, "--device", "cpu", *BUDGET))
    assert "retry Task990_Tiny__tiny__pretrained__fold_all" in retried.stdout and "1 done" in retried.stdout
    assert all(s.state == "done" for s in survey(_jobs(task), fresh))
    manifest = RunManifest.load(pretrained.folder(fresh))
    previous = manifest.data["request"]["previous_attempt"]  # it had no checkpoint: started again, history kept
    assert previous["error"] is None and [e["event"] for e in previous["events"]][-2:] == ["failed", "retry"]
    assert manifest.settings.weights == str(task.weights.resolve())


@pytest.mark.slow
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

    (stop,) = [e for e in manifest.data["events"] if e["event"] == "stopped_at_boundary"]  # saved where it was
    assert stop["signal"] == "SIGINT" and manifest.data["checkpoint"]["epoch"] == stop["epoch"]

    run_segbook("batch", "run", *_matrix_args(task), "--init", "pretrained", "--device", "cpu", *budget)
    manifest = RunManifest.load(folder)
    (resumed,) = [e for e in manifest.data["events"] if e["event"] == "resumed"]
    assert (resumed["from_epoch"], resumed.get("from_iteration", 0)) == (stop["epoch"], stop["iteration"])
    assert [e["epoch"] for e in manifest.data["epochs"]] == list(range(12))  # nothing lost, nothing twice
    assert manifest.status == "finished" and _events(folder).count("pretrained_weights_loaded") == 1
    assert job_status(job, fresh).state == "done"


def test_checkpoint_normalization_normalises_every_pretrained_job_of_a_model_as_its_file_was_pretrained(tmp_path):
    """Issue 24: `--normalization checkpoint` puts a model's pretrained jobs on its file's normalisation (the
    identifier finetune derives, on default or checkpoint plans, its planner prepared) and the workers get it; its
    scratch jobs too (the file given to them normalises, nothing is loaded); a model without a file and a file
    recording no normalisation are refused, naming them."""
    import torch
    from nnssl_helpers import resenc, resenc_kwargs

    from segbook.backbones import PLANNERS
    from segbook.backbones.nnssl import write_nnssl_checkpoint
    from segbook.batch.matrix import on_plans
    from segbook.batch.preparation import planners_of
    from segbook.checkpoint_plans import planner_for_weights

    registry = load_registry()
    one = str(write_nnssl_checkpoint(resenc(num_classes=1), tmp_path / "one.pth",
                                     {"architecture": "ResidualEncoderUNet", "arch_kwargs": resenc_kwargs()}))
    jobs = build_matrix(registry, "613", models="resenc-l", inits="pretrained")
    around = PLANNERS[planner_for_weights("resenc-l", one)].plans
    for plans, identifier in (("default", "nnUNetResEncUNetLPlans_ZScoreNorm"), ("checkpoint", f"{around}_ZScoreNorm")):
        planned = on_plans(jobs, plans, {"resenc-l": one}, "checkpoint")
        assert {job.spec.plans for job in planned} == {identifier}
        assert [PLANNERS[name].plans for name in planners_of(planned)] == [identifier]
    options = ExecutionOptions.create(weights=[f"resenc-l={one}"], normalization="checkpoint")
    assert ExecutionOptions.from_json(options.to_json()).normalization == "checkpoint"
    both = on_plans(build_matrix(registry, "613", models="resenc-l"), "default", {"resenc-l": one}, "checkpoint")
    assert {job.spec.init: job.spec.plans for job in both} == {"pretrained": "nnUNetResEncUNetLPlans_ZScoreNorm",
                                                               "scratch": "nnUNetResEncUNetLPlans_ZScoreNorm"}
    scratch = next(job for job in both if job.spec.init == "scratch")
    assert options.file_for(scratch) == one and options.weights_for(scratch) is None  # it normalises, loads nothing
    with pytest.raises(MatrixError, match="normalises large's jobs as its checkpoint was pretrained: pass --weights"):
        on_plans(build_matrix(registry, "613", models="resenc-l,large", inits="pretrained"), "default",
                 {"resenc-l": one}, "checkpoint")
    plain = tmp_path / "nnunet.pth"
    torch.save({"network_weights": resenc(num_classes=2).state_dict(), "trainer_name": "nnUNetTrainer"}, plain)
    with pytest.raises(MatrixError, match="resenc-l: --normalization checkpoint: .* records no pretraining"):
        on_plans(jobs, "default", {"resenc-l": str(plain)}, "checkpoint")


def test_checkpoint_plans_plan_every_job_of_a_model_around_its_nnssl_file(tmp_path):
    """Issue 24: `--plans checkpoint` puts a model's pretrained and scratch jobs on its file's plans (one identifier,
    its planner prepared); other files get other identifiers; a model without a file is refused, naming it."""
    from nnssl_helpers import resenc, resenc_kwargs

    from segbook.backbones import PLANNERS
    from segbook.backbones.nnssl import write_nnssl_checkpoint
    from segbook.batch.matrix import on_plans
    from segbook.batch.preparation import planners_of

    registry = load_registry()
    plan = {"architecture": "ResidualEncoderUNet", "arch_kwargs": resenc_kwargs()}
    one = write_nnssl_checkpoint(resenc(num_classes=1), tmp_path / "one.pth", plan)
    other = {"architecture": "ResidualEncoderUNet", "arch_kwargs": resenc_kwargs((4, 8, 8, 8), (1, 2, 1, 1))}
    two = write_nnssl_checkpoint(resenc(num_classes=1, widths=(4, 8, 8, 8), blocks=(1, 2, 1, 1)),
                                 tmp_path / "two.pth", other)
    jobs = build_matrix(registry, "613", models="resenc-l", inits="pretrained,scratch")
    planned = on_plans(jobs, "checkpoint", {"resenc-l": str(one)})
    identifiers = {job.spec.plans for job in planned}
    assert len(identifiers) == 1 and next(iter(identifiers)).startswith("SegbookCheckpoint")
    assert {job.spec.init for job in planned} == {"pretrained", "scratch"}
    assert [PLANNERS[name].plans for name in planners_of(planned)] == list(identifiers)
    assert {j.spec.plans for j in on_plans(jobs, "checkpoint", {"resenc-l": str(two)})}.isdisjoint(identifiers)
    with pytest.raises(MatrixError, match="plans large's jobs around its nnssl checkpoint"):
        on_plans(build_matrix(registry, "613", models="resenc-l,large"), "checkpoint", {"resenc-l": str(one)})
    with pytest.raises(MatrixError, match="resenc-l: .*'PrimusM' cannot be planned"):
        on_plans(jobs, "checkpoint", {"resenc-l": str(write_nnssl_checkpoint(
            resenc(num_classes=1), tmp_path / "p.pth", {"architecture": "PrimusM"}))})
