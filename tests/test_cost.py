"""Cost records: training device-hours accumulated across attempts, throughput, peak memory only where measured;
prediction time and memory from `segbook evaluate`; one real tiny train + evaluate end to end."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from segbook.training.cost import SECONDS_PER_HOUR, add_epoch, measured_prediction
from segbook.training.manifest import RunManifest


def test_epochs_accumulate_across_attempts_through_run_json(tmp_path: Path) -> None:
    """Two attempts (processes) of one run: the second adds to what the first saved in run.json."""
    manifest = RunManifest(tmp_path, {"run": {}, "status": "running", "epochs": []})
    manifest.data["cost"] = add_epoch(None, 30.0, 4 * 250, "cpu", 1)
    manifest.data["cost"] = add_epoch(manifest.data["cost"], 40.0, 4 * 250, "cpu", 1)
    manifest.save()
    resumed = RunManifest.load(tmp_path)  # the next attempt, after a requeue, on two GPUs
    cost = add_epoch(resumed.data["cost"], 60.0, 4 * 250, "cuda:0", 2)
    assert cost["epochs"] == 3 and cost["train_seconds"] == pytest.approx(130.0)
    assert cost["device_hours"] == pytest.approx((30 + 40 + 2 * 60) / SECONDS_PER_HOUR)
    assert cost["gpu_hours"] == pytest.approx(2 * 60 / SECONDS_PER_HOUR)  # the CPU epochs are not GPU-hours
    assert cost["device"] == "cpu+cuda" and cost["devices"] == 2
    assert cost["samples_per_second"] == pytest.approx(3000 / 130.0)


def test_cpu_runs_say_cpu_and_record_no_gpu_numbers() -> None:
    cost = add_epoch(None, 12.0, 20, "cpu", 1)
    assert cost["device"] == "cpu" and cost["gpu_hours"] is None and cost["peak_memory_bytes"] is None
    assert cost["device_hours"] == pytest.approx(12.0 / SECONDS_PER_HOUR)


def test_prediction_is_timed_per_case_without_memory_off_cuda() -> None:
    with measured_prediction("cpu", 4) as record:
        assert record == {}  # filled when the block ends
    assert record["device"] == "cpu" and record["cases"] == 4 and record["peak_memory_bytes"] is None
    assert record["seconds_per_case"] == pytest.approx(record["seconds"] / 4, abs=1e-3)


@pytest.mark.slow
def test_tiny_run_records_its_cost_and_every_metric_column(tmp_path_factory) -> None:
    """A real tiny training and evaluation on the CPU: cost in run.json and summary.json, and metrics.csv with IoU,
    precision, recall and lesion counts that agree with the kept predictions."""
    import SimpleITK as sitk
    from helpers import planned_tiny_task, tiny_spec

    from segbook.evaluation.evaluate import CSV_COLUMNS, evaluate_run, test_cases
    from segbook.evaluation.lesions import lesion_counts
    from segbook.paths import Paths
    from segbook.training.finetune import finetune
    from segbook.training.settings import TrainingSettings

    with planned_tiny_task(tmp_path_factory.mktemp("cost"), tiny_spec()) as task:
        settings = TrainingSettings(epochs=2, iterations_per_epoch=2, val_iterations_per_epoch=1,
                                    checkpoint_every=1)
        result = finetune(task.entry, "tiny", pretrained=False, settings=settings, device="cpu")
        cost = RunManifest.load(result.folder, history=False).data["cost"]
        batch = result.manifest.data["plans_summary"]["batch_size"]
        assert cost["device"] == "cpu" and cost["devices"] == 1 and cost["epochs"] == 2
        assert cost["gpu_hours"] is None and cost["peak_memory_bytes"] is None
        assert cost["samples"] == batch * 2 * 2
        epoch_seconds = sum(e["seconds"] for e in result.manifest.data["epochs"])
        assert cost["train_seconds"] == pytest.approx(epoch_seconds, abs=0.01)
        assert cost["samples_per_second"] == pytest.approx(cost["samples"] / cost["train_seconds"], rel=1e-3)

        evaluation = evaluate_run(task.entry, result.spec, device="cpu", keep_predictions=True)
        prediction = evaluation.summary["cost"]["prediction"]
        assert prediction["device"] == "cpu" and prediction["cases"] == task.entry.test_cases
        assert prediction["peak_memory_bytes"] is None and prediction["seconds_per_case"] > 0
        metrics = pd.read_csv(evaluation.folder / "metrics.csv")
        assert tuple(metrics.columns) == CSV_COLUMNS
        for key in ("iou", "precision", "recall"):
            assert key in evaluation.summary["foreground_mean"] and key in evaluation.summary["labels"]["1"]
        lesion = next(label.index for label in task.entry.foreground_labels if label.kind == "lesion")
        assert metrics.loc[metrics["label"] != lesion, "lesions_reference"].isna().all()
        for case in test_cases(task.entry, Paths.from_env()):
            reference = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label))) == lesion
            predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(evaluation.folder / "predictions" /
                                                                  case.label.name))) == lesion
            row = metrics[(metrics["case"] == case.case) & (metrics["label"] == lesion)].iloc[0]
            assert {key: int(row[key]) for key in lesion_counts(reference, predicted)} == \
                lesion_counts(reference, predicted)
        lesions = evaluation.summary["lesions"]
        rows = metrics[metrics["label"] == lesion]
        assert lesions["lesions_reference"] == int(rows["lesions_reference"].sum()) > 0
        assert lesions["false_positive_lesions_per_case"] == pytest.approx(
            rows["lesions_false_positive"].sum() / task.entry.test_cases)
        sensitivity = lesions["lesion_sensitivity"]
        assert math.isclose(sensitivity, rows["lesions_detected"].sum() / rows["lesions_reference"].sum())
        assert np.isfinite(metrics["iou"]).any()
