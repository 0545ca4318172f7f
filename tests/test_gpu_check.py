"""The device check (`scripts/gpu_check.py`, issue #17) runs its every step at toy size on the CPU: the script that
will be run on the first GPU must not have rotted by then (it reads run folders and options that keep changing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
STEPS = ("environment", "training_step", "augmentation", "end_to_end", "two_gpus", "budget_curve")


@pytest.mark.slow
def test_the_device_check_runs_every_step_at_toy_size(tmp_path: Path) -> None:
    out = tmp_path / "check"
    done = subprocess.run([sys.executable, str(SCRIPT), str(out), "--smoke"], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = {step: json.loads((out / f"{step}.json").read_text()) for step in STEPS}
    assert all(result["ok"] for result in results.values())
    assert [line.split(":")[0] for line in (out / "summary.txt").read_text().splitlines()] == list(STEPS)

    end_to_end = results["end_to_end"]
    assert (end_to_end["status"], end_to_end["epochs"], end_to_end["device"]) == ("finished", 2, "cpu")
    assert len(end_to_end["epoch_seconds"]) == 2 and 0.0 <= end_to_end["dice"] <= 1.0
    assert end_to_end["prediction_seconds_per_case"] > 0
    assert results["two_gpus"]["skipped"] == "fewer than two GPUs"
    curve = results["budget_curve"]
    assert {(row["configuration"].split(" [")[0], row["budget (epochs)"]) for row in curve["budgets"]} == {
        (f"tiny {init}", budget) for init in ("pretrained", "scratch") for budget in (2, 4)}
    points = [(row["budget (epochs)"], row["epochs trained"], row["point"]) for row in curve["curves"]]
    assert sorted(set(points)) == [(2, 1, "snapshot (lr not decayed)"), (2, 2, "run"),
                                   (4, 2, "snapshot (lr not decayed)"), (4, 4, "run")]
