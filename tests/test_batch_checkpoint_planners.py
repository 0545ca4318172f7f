"""Issue 24: batch jobs on a checkpoint's plans and normalisation (`--plans checkpoint`, `--normalization
checkpoint`) in processes of their own. The checkpoint planners are registered in the process that read the file, so
a SLURM preparation task, a SLURM training task and a local worker each register them again from the batch's
recorded options: the test runs them on the real one-node SLURM test cluster (docs/slurm_testing.md), where the
preparation is a CPU array task of its own, on the CPU with a tiny budget.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from helpers import planned_tiny_task, run_segbook, tiny_spec
from nnssl_helpers import resenc, resenc_kwargs
from slurm_support import FINAL_STATES, ensure_slurm_cluster, idle_node

from segbook.backbones import PLANNERS
from segbook.backbones.nnssl import write_nnssl_checkpoint
from segbook.batch.preparation import read_records
from segbook.checkpoint_plans import planner_for_weights
from segbook.paths import Paths
from segbook.training.manifest import RunManifest

BUDGET = ["--epochs", "1", "--iters-per-epoch", "1", "--val-iters-per-epoch", "1", "--checkpoint-every", "1"]
SLURM = ["--device", "cpu", "--gpus-per-job", "0", "--cpus-per-job", "1", "--prepare-cpus", "1", "--time", "15"]
WAIT_S = 300


@pytest.fixture
def openmind_task(tmp_path):
    """A tiny CT task (6 training cases: the preparation writes 5 cross-validation folds), planned on its default
    plans only, and a tiny nnssl ResEnc file (z-score pretraining)."""
    with planned_tiny_task(tmp_path, tiny_spec(name="TinyCkpt", size=(32, 32, 24)), dataset_id=992,
                           seed=3) as task:
        torch.manual_seed(5)
        task.openmind = write_nnssl_checkpoint(resenc(num_classes=1), tmp_path / "openmind.pth",
                                               {"architecture": "ResidualEncoderUNet", "arch_kwargs": resenc_kwargs()})
        yield task


def _selection(task, init: str) -> list[str]:
    return ["--registry", str(task.registry_file), "--tasks", task.entry.key, "--models", "resenc-l", "--init", init,
            "--plans", "checkpoint", "--normalization", "checkpoint", "--weights", f"resenc-l={task.openmind}"]


def _identifier(task) -> str:
    return f"{PLANNERS[planner_for_weights('resenc-l', task.openmind)].plans}_ZScoreNorm"


def _wait_until_done(task, init: str) -> dict[str, dict]:
    """Poll `batch status` (a fresh process: it registers the planners itself) until every job is done; fail with
    the task's log and the preparation record when one ends otherwise."""
    deadline = time.monotonic() + WAIT_S
    while True:
        jobs = json.loads(run_segbook("batch", "status", *_selection(task, init), "--format", "json").stdout)["jobs"]
        if all(job["state"] == "done" for job in jobs):
            return {job["init"]: job for job in jobs}
        for job in jobs:
            if (job["slurm"] in FINAL_STATES and job["state"] != "done") or time.monotonic() > deadline:
                log = job["log"] and open(job["log"]).read()[-3000:] + open(job["log"][:-4] + ".err").read()[-3000:]
                pytest.fail(f"{job['job']} is {job['state']} (SLURM {job['slurm']}): {job['detail']}\n"
                            f"preparation: {read_records(Paths.from_env()).get(task.entry.key)}\n{log}")
        time.sleep(2)


def _check_runs(task, jobs: dict[str, dict]) -> None:
    """Each job trained and was evaluated on the checkpoint's plans, normalised by z-score."""
    identifier = _identifier(task)
    plans = json.loads((task.preprocessed / task.entry.nnunet_name / f"{identifier}.json").read_text())
    configuration = plans["configurations"]["3d_fullres"]
    assert configuration["normalization_schemes"] == ["ZScoreNormalization"]
    assert configuration["architecture"]["arch_kwargs"]["features_per_stage"] == [4, 8, 8]
    for init in jobs:
        folder = next(Paths.from_env().results.glob(f"*/SegbookTrainer_resenc-l_{init}__{identifier}__3d_fullres"))
        manifest = RunManifest.load(folder / "fold_all")
        assert manifest.status == "finished" and (folder / "fold_all" / "evaluation" / "summary.json").is_file()
        assert manifest.data["normalization"]["fine_tuning"]["plans"] == identifier


@pytest.mark.slurm
def test_slurm_tasks_register_the_checkpoint_planners_from_the_submissions_options(openmind_task):
    """`batch submit`: the preparation array task plans the task with the checkpoint's planner and the training
    task trains on it, each in a process the submitting one never touched."""
    ensure_slurm_cluster()
    idle_node()
    submitted = run_segbook("batch", "submit", *_selection(openmind_task, "pretrained,scratch"), *SLURM,
                            *BUDGET).stdout
    assert "submitted the preparation of 1 task(s)" in submitted, submitted
    jobs = _wait_until_done(openmind_task, "pretrained,scratch")
    paths = Paths.from_env()
    record = read_records(paths)[openmind_task.entry.key]
    assert record["status"] == "prepared" and record["slurm_job"], record
    assert "planned and preprocessed (checkpoint-" in record["detail"] and "+ZScoreNorm)" in record["detail"]
    (log,) = (paths.batch / "slurm").glob("*.prepare/*/*_log.err")
    assert "ForkPoolWorker" not in log.read_text()  # nnU-Net's forked pool workers died of SIGTERM, no traceback
    _check_runs(openmind_task, jobs)


@pytest.mark.slow
def test_batch_run_pairs_scratch_and_pretrained_jobs_on_the_checkpoints_plans_and_normalisation(openmind_task):
    """`batch run` (local, each job in a fresh worker process that registers the planners itself): the scratch job
    trains on the pretrained job's plans identifier and z-scored data without loading the file, and `segbook
    results` puts both in one row with their Delta(PT)."""
    from segbook.runs import summary_path

    result = run_segbook("batch", "run", *_selection(openmind_task, "pretrained,scratch"), "--device", "cpu",
                         "--workers", "1", *BUDGET)
    assert "2 done" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    identifier = _identifier(openmind_task)
    _check_runs(openmind_task, {"pretrained": {}, "scratch": {}})
    results = Paths.from_env().results
    runs = {init: next(results.glob(f"*/SegbookTrainer_resenc-l_{init}__{identifier}__3d_fullres")) / "fold_all"
            for init in ("pretrained", "scratch")}
    scratch = RunManifest.load(runs["scratch"])
    assert scratch.settings.weights is None and scratch.data["planned_around"] == {
        "checkpoint": str(openmind_task.openmind), "sha256": scratch.data["planned_around"]["sha256"],
        "plans": identifier, "weights_loaded": False}
    assert "pretrained_weights_loaded" not in [event["event"] for event in scratch.data["events"]]
    pretrained = RunManifest.load(runs["pretrained"])
    assert pretrained.data["planned_around"]["weights_loaded"] is True
    assert pretrained.data["planned_around"]["sha256"] == scratch.data["planned_around"]["sha256"]
    assert [e["event"] for e in pretrained.data["events"]].count("pretrained_weights_loaded") == 1

    dice = {init: 100 * json.loads(summary_path(folder).read_text())["foreground_mean"]["dice"]
            for init, folder in runs.items()}
    table = run_segbook("results", "--registry", str(openmind_task.registry_file), "--plans", identifier,
                        "--models", "resenc-l", "--table", "datasets", "--format", "csv").stdout
    (row,) = [line.split(",") for line in table.splitlines() if line.startswith(openmind_task.entry.key)]
    shown = [float(value) for value in row if value.replace(".", "", 1).replace("-", "", 1).isdigit()]
    expected = [round(dice["scratch"], 1), round(dice["pretrained"], 1),
                round(dice["pretrained"] - dice["scratch"], 1)]
    assert all(any(abs(value - want) <= 0.051 for value in shown) for want in expected), (table, dice)


def test_a_preparation_elsewhere_registers_the_planners_again_and_refuses_a_file_changed_since(tmp_path):
    """What a SLURM preparation task does first (`registered_planners`), in a fresh process: the submitted jobs'
    checkpoint planners registered again from the options; the file at the path replaced by another network since
    submission, the task names the planner and the file instead of planning."""
    import subprocess
    import sys

    from segbook.batch.execute import ExecutionOptions
    from segbook.batch.matrix import build_matrix, on_plans
    from segbook.batch.preparation import models_of, planners_of
    from segbook.registry import load_registry

    path = tmp_path / "openmind.pth"
    write_nnssl_checkpoint(resenc(num_classes=1), path,
                           {"architecture": "ResidualEncoderUNet", "arch_kwargs": resenc_kwargs()})
    jobs = on_plans(build_matrix(load_registry(), "613", models="resenc-l", inits="pretrained,scratch"), "checkpoint",
                    {"resenc-l": str(path)}, "checkpoint")
    options = ExecutionOptions.create(weights=[f"resenc-l={path}"], plans="checkpoint", normalization="checkpoint")
    script = ("import json, sys; from segbook.batch.execute import ExecutionOptions; "
              "from segbook.batch.slurm import registered_planners; "
              "planners, models, options = json.loads(sys.argv[1]); "
              "print(registered_planners(planners, models, ExecutionOptions.from_json(options)))")
    argument = json.dumps([planners_of(jobs), models_of(jobs), options.to_json()])

    def in_a_fresh_process() -> str:
        return subprocess.run([sys.executable, "-c", script, argument], capture_output=True, text=True,
                              check=True).stdout.strip()

    assert in_a_fresh_process() == "None"
    write_nnssl_checkpoint(resenc(num_classes=1, widths=(4, 8, 8, 8), blocks=(1, 2, 1, 1)), path,
                           {"architecture": "ResidualEncoderUNet", "arch_kwargs": resenc_kwargs((4, 8, 8, 8),
                                                                                                (1, 2, 1, 1))})
    refused = in_a_fresh_process()
    assert refused.startswith(f"planner(s) {planners_of(jobs)[0]} of the submitted jobs are not those")
    assert f"resenc-l={path}" in refused and "a file changed since submission" in refused
