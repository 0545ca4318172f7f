"""`segbook demo --quick` end to end, as a user runs it: every stage, the tables, the report, determinism."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch
from helpers import run_segbook, write_payload_checkpoint

from segbook.demo import DEMO_THREADS, QUICK, demo_specs
from segbook.registry import load_registry
from segbook.training.manifest import RunManifest
from stunet import create_stunet, read_state_dict

DEMO_TIMEOUT_S = 1200
COMPARE = Path(__file__).resolve().parents[1] / "scripts" / "compare_demos.py"

pytestmark = pytest.mark.slow  # every test here reads demos that train


USER_IMPORT = "task,model,init,dice\n004,large,pretrained,0.9\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The quick demo run twice with the same seed, into two fresh folders, by a user whose own nnU-Net and
    segbook folders are set (and must stay untouched), with published numbers imported into their segbook home.
    Each run is a process of its own, as two users' runs are, and the second runs as on another user's machine:
    beside a busy core, from a shell that sets MKL's threads (as some cluster environments do; torch takes
    MKL_NUM_THREADS over OMP_NUM_THREADS). The README promises the same tables all the same."""
    users = tmp_path_factory.mktemp("user_folders")
    variables = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "SEGBOOK_HOME")
    imported = users / "SEGBOOK_HOME" / "results" / "imported" / "published.csv"
    with pytest.MonkeyPatch.context() as patch:
        for variable in variables:
            (users / variable).mkdir()
            patch.setenv(variable, str(users / variable))
        imported.parent.mkdir(parents=True)
        imported.write_text(USER_IMPORT)
        first, second = (tmp_path_factory.mktemp("demo") / name for name in ("first", "second"))
        runs = [(first, run_segbook("demo", "--quick", "--out", str(first), timeout=DEMO_TIMEOUT_S).stdout)]
        patch.setenv("MKL_NUM_THREADS", "1")
        with _busy_core():
            runs.append((second, run_segbook("demo", "--quick", "--out", str(second), timeout=DEMO_TIMEOUT_S).stdout))
        assert [path for variable in variables for path in (users / variable).iterdir()
                if path != imported.parents[1]] == []  # the demos wrote nothing there (the tests' own commands may)
        yield runs
        assert imported.read_text() == USER_IMPORT


@contextlib.contextmanager
def _busy_core() -> Iterator[None]:
    """A process spinning on one core for as long as the block runs: on a 2-core machine the demo's two threads
    then share the cores with it, as on a machine where other work runs."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def _compare(first: Path, second: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(COMPARE), str(first), str(second)], capture_output=True, text=True,
                          timeout=300)


def _tables(out: Path, table: str) -> list[dict]:
    """The demo's results table as the command its closing note prints shows it (with the user's folders set)."""
    printed = run_segbook("results", "--results-dir", str(out / "home" / "nnUNet_results"), "--registry",
                          str(out / "demo_registry.yaml"), "--no-imported", "--table", table, "--format",
                          "json").stdout
    return json.loads(printed)


def test_every_stage_runs_and_every_target_is_trained_both_ways_and_evaluated(demo):
    out, printed = demo[0]
    for stage in ("[1/5] generating", "[2/5] importing", "[3/5] pretraining", "[4/5] fine-tuning", "[5/5]"):
        assert stage in printed
    assert "7 jobs:" in printed and "batch run: 7 done" in printed  # through `segbook batch`'s local runner
    assert "synthetic, toy-scale numbers" in printed and "segbook results --results-dir" in printed
    assert "--no-imported" in printed.split("segbook results --results-dir")[1].splitlines()[0]
    durations = [line for line in printed.splitlines() if line.strip().startswith("done in ")]
    assert len(durations) == 5  # each stage's own time, printed when it ends

    registry = load_registry([out / "demo_registry.yaml"])
    targets = [registry.get(f"Dataset{i}") for i in demo_specs(QUICK) if i != 970]
    assert [t.scale for t in targets] == ["small", "medium", "large"]
    assert {(t.modality, t.target) for t in targets} == {("CT", "Seen Structure"), ("MRI", "Unseen Structure"),
                                                        ("CT", "Structure&Lesion")}
    checkpoint = out / "weights" / "tiny_demo_source.model"
    source_classes = len(registry.get("Dataset970").labels)
    official_layout = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert set(official_layout) >= {"epoch", "state_dict"}
    create_stunet("tiny", 1, source_classes).load_state_dict(read_state_dict(checkpoint), strict=True)
    runs = sorted((out / "home" / "nnUNet_results").glob("Dataset97*/SegbookTrainer_tiny_*/fold_all"))
    assert len(runs) == 7  # every target both ways, and the seen-CT target with one more recipe
    recipes = {folder.parent.name.split("__")[0] for folder in runs if "DemoSeenCT" in str(folder)}
    assert recipes == {"SegbookTrainer_tiny_scratch", "SegbookTrainer_tiny_pretrained",
                       "SegbookTrainer_tiny_pretrained_heads-only"}
    for folder in runs:
        manifest = RunManifest.load(folder)
        assert manifest.status == "finished" and len(manifest.data["epochs"]) == QUICK.target_epochs
        summary = json.loads((folder / "evaluation" / "summary.json").read_text())
        entry = registry.get(folder.parents[1].name)
        assert summary["num_cases"] == entry.test_cases
        events = [e["event"] for e in manifest.data["events"]]
        assert ("pretrained_weights_loaded" in events) == ("pretrained" in folder.parent.name)
        if "pretrained" in folder.parent.name:
            assert manifest.settings.weights == str(checkpoint)


def test_tables_are_printed_the_report_is_written_and_the_same_seed_gives_the_same_tables(demo):
    (out, printed), (again, printed_again) = demo
    assert "Dice (%) by dataset scale" in printed and "Dice (%) by modality and target" in printed
    for name in ("STU-Net-T", "Delta(PT)", "small", "medium", "large", "CT seen structure", "MRI unseen structure"):
        assert name in printed

    by_scale = _tables(out, "scale")
    assert [(row["model"], row["init"]) for row in by_scale] == [("tiny", "scratch"), ("tiny", "pretrained"),
                                                                  ("tiny", "Delta(PT)")]  # no imported rows
    assert "Dice (%) by dataset scale per fine-tuning recipe" in printed
    by_recipe = _tables(out, "recipes")
    assert [(row["init"], row["recipe"]) for row in by_recipe] == [
        ("scratch", "scratch"), ("pretrained", "segbook"), ("Delta vs scratch", "segbook"),
        ("pretrained", "heads-only"), ("Delta vs scratch", "heads-only"), ("Delta vs segbook", "heads-only")]
    heads_only = by_recipe[3]
    assert heads_only["small n"] == 1 and heads_only["medium n"] == 0  # one target only
    assert _tables(again, "recipes") == by_recipe
    for row in by_scale[:2]:
        assert all(0.0 <= row[scale] <= 100.0 and row[f"{scale} n"] == 1 for scale in ("small", "medium", "large"))
    assert by_scale == _tables(again, "scale")
    assert _tables(out, "modality-target") == _tables(again, "modality-target")
    tables = lambda text: text.split("Dice (%) by dataset scale")[1].split("Done in")[0]  # noqa: E731
    assert tables(printed) == tables(printed_again)

    report = (out / "report.html").read_text()
    assert "segbook demo (synthetic data, toy scale)" in report and "Dice (%) by dataset scale" in report
    assert "<img" in report or "<svg" in report


def test_the_run_under_load_is_the_same_to_the_bit_at_every_stage(demo):
    """The tables are rounded to two decimals: compare what they come from, stage by stage (synthetic data, plans,
    preprocessed cases, the pretraining's losses and weights, every target run's losses, weights and test
    metrics). The first run ran alone, the second beside a busy core with MKL_NUM_THREADS=1, each in its own
    process; every training in both computed with the demo's 2 threads."""
    (out, _), (again, _) = demo
    for demo_folder in (out, again):  # the pretraining in the demo's process, the targets in batch workers
        folders = [*(demo_folder / "pretraining").glob("Dataset970_*/*/fold_all"),
                   *(demo_folder / "home" / "nnUNet_results").glob("Dataset97*/*/fold_all")]
        assert [RunManifest.load(folder).data["cpu"]["threads"] for folder in folders] == [DEMO_THREADS] * 8
    result = _compare(out, again)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every stage is identical" in result.stdout and "target runs' final weights (7 files)" in result.stdout


def test_the_stage_comparison_finds_a_run_that_differs(demo, tmp_path):
    """A target run's final weights nudged by one float step: the comparison names that run and its stage, and
    the stages before it stay identical."""
    from segbook.training.checkpoints import read_run_checkpoint

    out = tmp_path / "nudged"
    shutil.copytree(demo[0][0], out, symlinks=True)
    final = next((out / "home" / "nnUNet_results").glob("Dataset973_*/SegbookTrainer_tiny_scratch_*/fold_all/"
                                                           "checkpoint_final.pth"))
    checkpoint = read_run_checkpoint(final)
    weights = next(iter(checkpoint["network_weights"].values()))
    weights.view(-1)[0] = torch.nextafter(weights.view(-1)[0], torch.tensor(float("inf")))
    torch.save(checkpoint, final)

    result = _compare(demo[0][0], out)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "1 of 11 stages differ"
    assert all(line.startswith("identical") for line in lines[:9])
    assert lines[9].startswith("DIFFERS    target runs' final weights") and "Dataset973" in lines[10]


def test_a_crafted_checkpoint_in_the_output_folder_is_refused_and_never_runs(demo, tmp_path):
    """`segbook demo --out DIR` again over a folder whose pretraining checkpoint was replaced by a payload."""
    out = tmp_path / "crafted"
    shutil.copytree(demo[0][0], out, symlinks=True)
    (out / "weights" / "tiny_demo_source.model").unlink()  # the demo must export it again from the checkpoint
    final = next((out / "pretraining").glob("Dataset970_*/SegbookTrainer_tiny_scratch_*/fold_all/checkpoint_final.pth"))
    marker = tmp_path / "payload_ran"
    write_payload_checkpoint(final, marker)

    result = run_segbook("demo", "--quick", "--out", str(out), check=False, timeout=DEMO_TIMEOUT_S)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"segbook: error: {final} was refused" in result.stderr and "Traceback" not in result.stderr
    assert "weights_only=False" not in result.stderr and "weights_only` set to `False`" not in result.stderr
    assert not marker.exists()


def test_the_quick_demo_at_two_budgets_with_snapshots_fills_the_budgets_and_curves_tables(tmp_path):
    """Issue 26's question on the demo's tasks: each budget its own run, snapshots scored, both tables printed."""
    out = tmp_path / "budgets"
    printed = run_segbook("demo", "--quick", "--out", str(out), "--budgets", "2", "4", "--snapshots", "50",
                          timeout=DEMO_TIMEOUT_S).stdout
    assert "13 jobs:" in printed and "batch run: 13 done" in printed  # 3 targets x 2 inits x 2 budgets + heads-only
    results = out / "home" / "nnUNet_results"
    for budget, snapshot in ((2, 1), (4, 2)):
        runs = sorted(results.glob(f"Dataset97*/SegbookTrainer_tiny_*_ep{budget}__*/fold_all"))
        assert len(runs) == 6
        for folder in runs:
            manifest = RunManifest.load(folder)
            assert manifest.status == "finished" and len(manifest.data["epochs"]) == budget
            assert [s["epoch"] for s in manifest.data["snapshots"]] == [snapshot]
            summary = json.loads((folder / "snapshots" / f"evaluation_ep{snapshot}" / "summary.json").read_text())
            assert summary["snapshot"]["epoch"] == snapshot and summary["training"]["complete"] is False
    rows = {(row["configuration"].split(" [")[0], row["budget (epochs)"]): row for row in _tables(out, "budgets")}
    assert set(rows) == {(f"tiny {init}", budget) for init in ("pretrained", "scratch") for budget in (2, 4)}
    assert rows[("tiny pretrained", 4)]["same sign"] == 1.0  # the largest budget agrees with itself
    points = [row["point"] for row in _tables(out, "curves")]
    assert points.count("run") == 4 and points.count("snapshot (lr not decayed)") == 4
