"""Cost records: training device-hours accumulated across attempts, throughput, peak memory only where measured;
prediction time and memory from `segbook evaluate`; one real tiny train + evaluate end to end."""

from __future__ import annotations

import json
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


def test_cuda_peak_memory_is_the_largest_over_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the peak is torch's counter for the device (here replaced, as this machine has no GPU), and a
    resumed attempt keeps the larger peak of an earlier one."""
    import torch

    peaks = {"cuda:0": 5 * 2**30}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: peaks[str(device)])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: peaks.update({str(device): 0}))
    first = add_epoch(None, 10.0, 4, "cuda:0", 1)
    assert first["peak_memory_bytes"] == 5 * 2**30 and first["gpu_hours"] == pytest.approx(10 / SECONDS_PER_HOUR)
    peaks["cuda:0"] = 3 * 2**30  # the next attempt, a new process, peaks lower
    assert add_epoch(first, 10.0, 4, "cuda:0", 1)["peak_memory_bytes"] == 5 * 2**30
    with measured_prediction("cuda:0", 2) as record:
        peaks["cuda:0"] += 2**30  # allocated while predicting, after the reset
    assert record["device"] == "cuda" and record["peak_memory_bytes"] == 2**30


def test_prediction_is_timed_per_case_without_memory_off_cuda() -> None:
    with measured_prediction("cpu", 4, threads=3) as record:
        assert record == {}  # filled when the block ends
        held = np.ones(64 * 2**20 // 8)  # 64 MiB resident while "predicting"
    assert record["device"] == "cpu" and record["cases"] == 4 and record["peak_memory_bytes"] is None
    assert record["seconds_per_case"] == pytest.approx(record["seconds"] / 4, abs=1e-3)
    assert record["threads"] == 3 and record["peak_rss_since"] == "prediction"  # this machine is Linux
    assert record["peak_rss_bytes"] >= held.nbytes


@pytest.mark.slow
def test_tiny_run_records_its_cost_and_every_metric_column(tmp_path_factory) -> None:
    """A real tiny training and evaluation on the CPU: cost in run.json and summary.json, and metrics.csv with IoU,
    precision, recall and lesion counts that agree with the kept predictions."""
    import SimpleITK as sitk
    import torch
    from helpers import planned_tiny_task, tiny_spec

    from segbook.results import collect_results
    from segbook.results.cost import cost_table

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

        threads = torch.get_num_threads()
        evaluation = evaluate_run(task.entry, result.spec, device="cpu", keep_predictions=True, threads=1)
        assert torch.get_num_threads() == threads  # as before
        prediction = evaluation.summary["cost"]["prediction"]
        assert prediction["device"] == "cpu" and prediction["cases"] == task.entry.test_cases
        assert prediction["peak_memory_bytes"] is None and prediction["seconds_per_case"] > 0
        assert prediction["threads"] == 1 and prediction["peak_rss_bytes"] > 2**20
        row = _cost_row(cost_table(collect_results(Paths.from_env(), registry_of(task))), "tiny scratch")
        assert row["CPU threads"] == "1" and row["GPU prediction s/case"] is None
        assert row["CPU peak RSS (GiB)"] == round(prediction["peak_rss_bytes"] / 2**30, 2) > 0
        assert row["CPU prediction s/case"] == round(prediction["seconds_per_case"], 2)
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

        # the command line sets the threads too (the device is no evaluation setting: --force evaluates again), and
        # the record says what nnU-Net's predictor computed with: at most its default_num_processes (here 1)
        from nnunetv2.configuration import default_num_processes

        from segbook.cli.main import main

        for threads in (1, 2):
            assert main(["evaluate", "--run", str(result.folder), "--registry", str(task.registry_file), "--device",
                         "cpu", "--threads", str(threads), "--force"]) == 0
            again = json.loads((evaluation.folder / "summary.json").read_text())["cost"]["prediction"]
            assert again["threads"] == min(threads, default_num_processes) and again["peak_rss_bytes"] > 2**20


def _cost_row(table, configuration: str) -> dict:
    return next(dict(zip(table.columns, row)) for row in table.rows if row[0] == configuration)


def registry_of(task):
    """The registry that knows the tiny task."""
    from segbook.registry import load_registry

    return load_registry([task.registry_file])


# --- the cost table and the report's cost section ----------------------------------------------------------------

#: (task, model, init) -> (mean Dice, training GPU-hours of the run).
COSTED_RUNS = {("Task901_SeenCT", "base", "scratch"): (0.70, 2.0),
               ("Task901_SeenCT", "base", "pretrained"): (0.80, 4.0),
               ("Task903_LesionMR", "base", "scratch"): (0.50, 3.0),
               ("Task903_LesionMR", "base", "pretrained"): (0.56, 2.0),
               ("Task901_SeenCT", "nnunet", "scratch"): (0.75, 1.0)}


@pytest.fixture
def costed(segbook_home: Path, tmp_path: Path):
    from store_helpers import gpu_cost, write_evaluated_run
    from results_helpers import write_registry

    from segbook.paths import Paths
    from segbook.registry import load_registry
    from segbook.results import collect_results

    registry_file = write_registry(tmp_path / "registry.yaml")
    registry, paths = load_registry([registry_file]), Paths.from_env()
    for (task, model, init), (dice, hours) in COSTED_RUNS.items():
        write_evaluated_run(paths.results, registry, task, model, init, dice, cost=gpu_cost(hours, peak_gib=hours),
                            prediction_seconds_per_case=hours)
    return collect_results(paths, registry), registry_file


def test_cost_table_per_configuration(costed) -> None:
    from segbook.results.cost import cost_table

    df, _ = costed
    table = cost_table(df)
    rows = {row[0]: dict(zip(table.columns, row)) for row in table.rows}
    pretrained = rows["base pretrained"]
    assert pretrained["runs"] == "2/2" and pretrained["device"] == "cuda"
    assert pretrained["device-hours/run"] == 3.0 and pretrained["device-hours total"] == 6.0
    assert pretrained["peak GPU memory (GiB)"] == 4.0 and pretrained["GPU prediction s/case"] == 3.0
    assert pretrained["params (M)"] == 58.3 and pretrained["forward TFLOPs"] == 1.02
    scores = {config: 100 * df.loc[(df["model"] == config[0]) & (df["init"] == config[1]), "dice"].to_numpy()
              for config in (("base", "pretrained"), ("base", "scratch"))}
    delta = float(np.mean(scores[("base", "pretrained")] - scores[("base", "scratch")]))
    assert pretrained["Delta(PT)"] == pytest.approx(delta, abs=0.005)
    assert pretrained["Delta(PT) per device-hour"] == pytest.approx(delta / 3.0, abs=0.001)
    assert pretrained["Dice (%)"] == pytest.approx(scores[("base", "pretrained")].mean(), abs=0.005)
    assert rows["nnunet scratch"]["params (M)"] is None and rows["base scratch"]["Delta(PT)"] is None


def test_runs_without_cost_records_show_as_such(segbook_home: Path, tmp_path: Path) -> None:
    from store_helpers import write_evaluated_run
    from results_helpers import write_registry

    from segbook.paths import Paths
    from segbook.registry import load_registry
    from segbook.results import collect_results
    from segbook.results.cost import cost_table

    registry = load_registry([write_registry(tmp_path / "registry.yaml")])
    write_evaluated_run(Paths.from_env().results, registry, "Task901_SeenCT", "base", "scratch", 0.7)
    row = dict(zip(*[cost_table(collect_results(Paths.from_env(), registry)).columns,
                     cost_table(collect_results(Paths.from_env(), registry)).rows[0]]))
    assert row["runs"] == "0/1" and row["device-hours/run"] is None and row["peak GPU memory (GiB)"] is None


def test_cli_cost_table_and_report_cost_section(costed, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    from segbook.cli.main import main
    from segbook.results import write_report

    df, registry_file = costed
    assert main(["results", "--registry", str(registry_file), "--table", "cost", "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["configuration"] for r in records] == ["nnunet scratch", "base scratch", "base pretrained"]
    assert main(["results", "--registry", str(registry_file), "--table", "cost", "--stats"]) == 2
    assert "does not apply to --table cost" in capsys.readouterr().err
    page = write_report(df, tmp_path / "report.html", figures=tmp_path / "figures").read_text()
    assert "Cost next to Dice" in page and "Delta(PT) per device-hour" in page
    assert (tmp_path / "figures" / "cost.png").is_file()


def test_cost_table_shows_cpu_evaluations_beside_gpu_ones(segbook_home: Path, tmp_path: Path) -> None:
    """Runs of one configuration evaluated on a GPU and on the CPU: their seconds per case are never averaged
    together; the CPU ones come with their threads and peak resident memory."""
    from store_helpers import gpu_cost, write_evaluated_run
    from results_helpers import write_registry

    from segbook.paths import Paths
    from segbook.registry import load_registry
    from segbook.results import collect_results
    from segbook.results.cost import cost_table

    registry = load_registry([write_registry(tmp_path / "registry.yaml")])
    results = Paths.from_env().results
    write_evaluated_run(results, registry, "Task901_SeenCT", "base", "scratch", 0.7, prediction_seconds_per_case=0.5)
    for task, seconds, threads, rss in (("Task903_LesionMR", 40.0, 1, 3 * 2**30),
                                        ("Task904_BoneCT", 10.0, 4, 5 * 2**30)):
        write_evaluated_run(results, registry, task, "base", "scratch", 0.6, prediction={
            "device": "cpu", "cases": 6, "seconds": 6 * seconds, "seconds_per_case": seconds,
            "peak_memory_bytes": None, "peak_rss_bytes": rss, "peak_rss_since": "prediction", "threads": threads})
    write_evaluated_run(results, registry, "Task901_SeenCT", "nnunet", "scratch", 0.7, cost=gpu_cost(1.0))
    table = cost_table(collect_results(Paths.from_env(), registry))
    row = _cost_row(table, "base scratch")
    assert row["GPU prediction s/case"] == 0.5 and row["CPU prediction s/case"] == 25.0
    assert row["CPU threads"] == "1+4" and row["CPU peak RSS (GiB)"] == 5.0 and row["device"] == "-"
    gpu_only = _cost_row(table, "nnunet scratch")
    assert gpu_only["CPU threads"] == "-" and gpu_only["CPU peak RSS (GiB)"] is None and gpu_only["device"] == "cuda"


@pytest.mark.parametrize("field, value", [("peak_rss_bytes", -1), ("threads", 0), ("threads", "all"),
                                          ("seconds_per_case", float("inf")), ("device", "tpu")])
def test_a_tampered_prediction_cost_leaves_the_run_out_naming_it(segbook_home: Path, tmp_path: Path, field: str,
                                                                 value) -> None:
    import json
    import warnings

    from store_helpers import write_evaluated_run
    from results_helpers import write_registry

    from segbook.paths import Paths
    from segbook.registry import load_registry
    from segbook.results import ResultsWarning, collect_results
    from segbook.results.cost import cost_table

    registry = load_registry([write_registry(tmp_path / "registry.yaml")])
    results = Paths.from_env().results
    write_evaluated_run(results, registry, "Task901_SeenCT", "base", "scratch", 0.7)
    folder = write_evaluated_run(results, registry, "Task903_LesionMR", "base", "scratch", 0.6, prediction={
        "device": "cpu", "seconds_per_case": 3.0, "peak_rss_bytes": 2**30, "threads": 2})
    summary_file = folder / "evaluation" / "summary.json"
    summary = json.loads(summary_file.read_text())
    summary["cost"]["prediction"][field] = value
    summary_file.write_text(json.dumps(summary))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResultsWarning)
        df = collect_results(Paths.from_env(), registry)
    assert any(f"cost.prediction.{field}" in str(w.message) and str(summary_file) in str(w.message) for w in caught)
    row = _cost_row(cost_table(df), "base scratch")
    assert row["runs"] == "0/1" and row["CPU threads"] == "-" and row["CPU prediction s/case"] is None
    assert "invalid" in " ".join(cost_table(df).notes) or "failed segbook's checks" in " ".join(cost_table(df).notes)
