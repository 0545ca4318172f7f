"""Snapshots: the network kept at percentages of a run's budget, written atomically at the right epochs, recorded,
kept through a kill -9 and a resume (none lost, none twice), evaluated each into its own folder, and read as safely
as any checkpoint; bad points are refused before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import planned_tiny_task, tiny_spec, use_planned_task, write_payload_checkpoint

from segbook.cli.main import main
from segbook.evaluation.evaluate import EvaluationError, evaluate_run, run_snapshots
from segbook.evaluation.files import check_run
from segbook.options import OptionError
from segbook.results import collect_results
from segbook.runs import FolderParts, RunSpec, snapshot_evaluation_folder, snapshot_path
from segbook.training.checkpoints import UnsafeCheckpointError, read_snapshot
from segbook.training.manifest import RunManifest
from segbook.training.settings import parse_snapshots, snapshot_epochs

from segbook.registry import load_registry
from stunet.checkpoints import file_sha256

# --- the points -----------------------------------------------------------------------------------------------------


def test_snapshot_points_are_whole_percentages_below_100_and_fall_on_distinct_epochs_before_the_last():
    assert parse_snapshots(["75", "25,50"]) == [25, 50, 75]
    for bad in (["0"], ["100"], ["12.5"], ["x"], ["25", "25"], ["-5"], [], ["050"]):
        with pytest.raises(OptionError, match="--snapshots"):
            parse_snapshots(bad)
    assert snapshot_epochs([25, 50, 75], 1000) == {25: 250, 50: 500, 75: 750}
    assert snapshot_epochs([25, 50, 75], 8) == {25: 2, 50: 4, 75: 6}
    assert snapshot_epochs([10], 8) == {10: 1}  # the first epoch at or past 10% of the budget
    with pytest.raises(OptionError, match="all fall on epoch 1 of a budget of 2 epochs"):
        snapshot_epochs([25, 50], 2)
    with pytest.raises(OptionError, match="last epoch of a budget of 4 epochs"):
        snapshot_epochs([90], 4)


@pytest.mark.parametrize("values,message", [(["0"], "a snapshot is a whole percentage"),
                                            (["100"], "a snapshot is a whole percentage"),
                                            (["50", "50"], "50 given more than once"),
                                            (["25", "50"], "all fall on epoch 1 of a budget of 2 epochs")])
@pytest.mark.parametrize("command", [["finetune", "--task", "613", "--model", "large", "--pretrained"],
                                     ["batch", "run", "--tasks", "613", "--models", "large"]])
def test_bad_snapshots_are_refused_before_anything_is_written(segbook_home, capsys, command, values, message):
    code = main([*command, "--epochs", "2", "--snapshots", *values])
    error = capsys.readouterr().err
    assert code == 2 and "segbook: error: " in error and message in error and "Traceback" not in error
    assert not (segbook_home / "nnUNet_results").exists() and not (segbook_home / "claims").exists()


def test_a_lora_run_takes_no_snapshots(segbook_home, capsys):
    code = main(["finetune", "--task", "613", "--model", "large", "--pretrained", "--recipe", "lora", "--epochs",
                 "8", "--snapshots", "50"])
    error = capsys.readouterr().err
    assert code == 2 and "trains LoRA adapters" in error and "Traceback" not in error


# --- training, kill -9, resume, evaluation --------------------------------------------------------------------------

EPOCHS, POINTS = 8, ("25", "50", "75")  # snapshots after epochs 2, 4 and 6
OPTIONS = ["--model", "tiny", "--device", "cpu", "--epochs", str(EPOCHS), "--iters-per-epoch", "2",
           "--val-iters-per-epoch", "1", "--checkpoint-every", "3", "--snapshots", *POINTS]

#: Trains the run of argv[1:] and kills itself (SIGKILL, no clean-up) after the snapshot of epoch 4 is written:
#: `after_record` once its record is in run.json too, `before_record` between the file and the record.
KILLED_AT_EPOCH_4 = """
import os, signal, sys
from segbook.training.trainer_parts import snapshots

when = sys.argv.pop(1)
original, note = snapshots.Snapshots.epoch_ended, snapshots.RunRecorder.note

def epoch_ended(self, trainer, trained, rates):
    original(self, trainer, trained, rates)
    if trained == 4 and when == "after_record":
        os.kill(os.getpid(), signal.SIGKILL)

def noted(self, key, value):
    if key == "snapshots" and when == "before_record" and any(r["epoch"] == 4 for r in value):
        os.kill(os.getpid(), signal.SIGKILL)
    note(self, key, value)

snapshots.Snapshots.epoch_ended, snapshots.RunRecorder.note = epoch_ended, noted
from segbook.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    with planned_tiny_task(tmp_path_factory.mktemp("snapshots"), tiny_spec(cases=8), dataset_id=994) as task:
        yield task


def _finetune(task, *extra: str) -> list[str]:
    return ["finetune", "--registry", str(task.registry_file), "--task", task.entry.key, *OPTIONS, *extra]


@pytest.mark.slow
@pytest.mark.parametrize("when", ["after_record", "before_record"])
def test_a_run_killed_between_snapshots_resumes_without_losing_or_repeating_one(task, tmp_path, monkeypatch, when):
    """Killed after the snapshot of epoch 4 (its record written or not), the latest checkpoint is epoch 3's: the
    resume removes what lies past it, keeps epoch 2's snapshot untouched and takes epochs 4 and 6 again, once."""
    paths = use_planned_task(task, tmp_path, monkeypatch)
    folder = RunSpec.of(task.entry, "tiny", False).folder(paths.results)
    env = {**os.environ, "nnUNet_n_proc_DA": "0"}
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_EPOCH_4, when, *_finetune(task)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert snapshot_path(folder, 4).is_file() and RunManifest.load(folder).data["checkpoint"]["epoch"] == 3
    recorded = [r["epoch"] for r in RunManifest.load(folder).data["snapshots"]]
    assert recorded == ([2, 4] if when == "after_record" else [2])
    first = file_sha256(snapshot_path(folder, 2))

    resumed = subprocess.run([sys.executable, "-m", "segbook.cli.main", *_finetune(task, "--continue")], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    manifest = RunManifest.load(folder)
    assert manifest.status == "finished" and [e["epoch"] for e in manifest.data["epochs"]] == list(range(EPOCHS))
    records = manifest.data["snapshots"]
    assert [(r["epoch"], r["percent"]) for r in records] == [(2, 25), (4, 50), (6, 75)]
    assert sorted(p.name for p in snapshot_path(folder, 2).parent.iterdir()) == \
        ["snapshot_ep2.pth", "snapshot_ep4.pth", "snapshot_ep6.pth"]  # no half-written file left behind
    assert file_sha256(snapshot_path(folder, 2)) == first  # before the checkpoint resumed from: kept as it was
    for record in records:
        assert record["schedule_fraction"] == record["epoch"] / EPOCHS and record["budget_epochs"] == EPOCHS
        assert record["learning_rate_decayed"] is False
        assert record["cost"]["epochs"] >= record["epoch"] and record["cost"]["device_hours"] > 0  # redone ones too
        # the rates the network had trained at in its last epoch, as the recipe's schedule over the whole budget
        assert record["learning_rates"] == manifest.recipe.rates(record["epoch"] - 1, EPOCHS)
        assert read_snapshot(snapshot_path(folder, record["epoch"]))["segbook_snapshot"] == record


@pytest.mark.slow
def test_snapshots_are_evaluated_each_into_its_own_folder_and_read_safely(task, tmp_path, monkeypatch, capsys):
    paths = use_planned_task(task, tmp_path, monkeypatch)
    assert main(_finetune(task)) == 0
    spec = RunSpec.of(task.entry, "tiny", False)
    folder = spec.folder(paths.results)
    assert [r["epoch"] for r in run_snapshots(folder)] == [2, 4, 6]
    capsys.readouterr()
    assert main(["evaluate", "--registry", str(task.registry_file), "--task", task.entry.key, "--model", "tiny",
                 "--device", "cpu", "--snapshots"]) == 0
    out = capsys.readouterr().out
    assert "snapshot after epoch 4 (50% of the budget, learning rate not decayed)" in out
    final = json.loads((folder / "evaluation" / "summary.json").read_text())
    assert "snapshot" not in final and final["training"]["complete"]
    for epoch, percent in ((2, 25), (4, 50), (6, 75)):
        summary = json.loads((snapshot_evaluation_folder(folder, epoch) / "summary.json").read_text())
        assert summary["snapshot"] == {**summary["snapshot"], "epoch": epoch, "percent": percent,
                                       "budget_epochs": EPOCHS, "schedule_fraction": epoch / EPOCHS,
                                       "learning_rate_decayed": False}
        assert summary["settings"]["checkpoint"] == f"snapshots/snapshot_ep{epoch}.pth"
        assert summary["training"] == {**summary["training"], "epochs_completed": epoch, "complete": False}
        assert summary["num_cases"] == final["num_cases"] and summary["split"] == final["split"]
        verdict = check_run(folder, summary, task.entry, FolderParts.parse(folder),
                            evaluation=snapshot_evaluation_folder(folder, epoch))
        assert verdict.problem is None  # the checks of any evaluation: tables of snapshots can trust them as much
    # the tables see the run once, with its final scores: snapshot evaluations are not runs
    frame = collect_results(registry=load_registry([task.registry_file]))
    (row,) = frame[frame["evaluated"]].to_dict("records")
    assert row["dice"] == pytest.approx(final["foreground_mean"]["dice"]) and row["budget"] == EPOCHS

    snapshot_path(folder, 4).write_bytes(snapshot_path(folder, 2).read_bytes())  # epoch 2's weights as epoch 4
    with pytest.raises(EvaluationError, match="holds the snapshot of epoch 2, not the one its name says"):
        evaluate_run(task.entry, spec, paths, device="cpu", force=True, run_folder=folder, snapshot=4)
    marker = tmp_path / "pwned"
    write_payload_checkpoint(snapshot_path(folder, 4), marker)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        evaluate_run(task.entry, spec, paths, device="cpu", force=True, run_folder=folder, snapshot=4)
    assert not marker.exists()
    with pytest.raises(EvaluationError, match="records none there"):
        evaluate_run(task.entry, spec, paths, device="cpu", run_folder=folder, snapshot=3)
