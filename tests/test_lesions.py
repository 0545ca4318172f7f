"""Lesion-wise detection on hand-made volumes whose answers are known by construction."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from segbook.evaluation.lesions import lesion_counts, lesion_summary
from segbook.evaluation.metrics import case_metrics

SHAPE = (20, 20, 20)


def empty() -> np.ndarray:
    return np.zeros(SHAPE, dtype=np.uint8)


def counts(reference: np.ndarray, prediction: np.ndarray) -> tuple[int, int, int]:
    found = lesion_counts(reference, prediction)
    return found["lesions_reference"], found["lesions_detected"], found["lesions_false_positive"]


def test_lesions_touching_by_a_corner_are_one_lesion_with_26_connectivity() -> None:
    reference = empty()
    reference[2:5, 2:5, 2:5] = 1
    reference[5:8, 5:8, 5:8] = 1  # shares only the corner between (4,4,4) and (5,5,5)
    reference[12:15, 12:15, 12:15] = 1
    prediction = empty()
    prediction[6, 6, 6] = 1  # inside the second cube only
    assert counts(reference, prediction) == (2, 1, 0)


def test_a_lesion_split_in_two_by_the_prediction_is_detected_once() -> None:
    reference = empty()
    reference[5:15, 8:12, 8:12] = 1
    prediction = empty()
    prediction[5:9, 8:12, 8:12] = 1
    prediction[11:15, 8:12, 8:12] = 1  # a gap of two slices: two predicted components on one lesion
    assert counts(reference, prediction) == (1, 1, 0)


def test_one_predicted_blob_over_two_lesions_detects_both() -> None:
    reference = empty()
    reference[4:8, 4:8, 4:8] = 1
    reference[11:15, 4:8, 4:8] = 1
    prediction = empty()
    prediction[6:13, 5:7, 5:7] = 1
    assert counts(reference, prediction) == (2, 2, 0)


def test_a_missed_lesion_and_a_false_positive() -> None:
    reference = empty()
    reference[2:6, 2:6, 2:6] = 1
    reference[2:4, 15:17, 15:17] = 1  # small and missed
    prediction = empty()
    prediction[3:6, 3:6, 3:6] = 1
    prediction[15:18, 2:4, 15:18] = 1  # far from every reference lesion
    assert counts(reference, prediction) == (2, 1, 1)


def test_no_lesions_anywhere() -> None:
    assert counts(empty(), empty()) == (0, 0, 0)
    summary = lesion_summary([lesion_counts(empty(), empty())], num_cases=1)
    assert math.isnan(summary["lesion_sensitivity"]) and summary["false_positive_lesions_per_case"] == 0.0


def test_only_false_positives_when_the_reference_has_no_lesion() -> None:
    prediction = empty()
    prediction[1:3, 1:3, 1:3] = 1
    prediction[10:12, 10:12, 10:12] = 1
    assert counts(empty(), prediction) == (0, 0, 2)


def test_case_metrics_counts_lesions_of_lesion_labels_inside_their_box() -> None:
    """Through `case_metrics`, which labels components inside the label's bounding box: the same answers as on the
    whole volume, and none for a structure label."""
    reference, prediction = empty(), empty()
    reference[2:5, 2:5, 2:5] = 2
    reference[14:17, 14:17, 14:17] = 2
    reference[8:12, 8:12, 8:12] = 1
    prediction[3:5, 3:5, 3:5] = 2
    prediction[2:4, 16:19, 2:4] = 2
    prediction[8:12, 8:12, 8:12] = 1
    structure, lesion = case_metrics(reference, prediction, [1, 2], (1.0, 1.0, 1.0), lesion_labels=[2])
    assert (lesion["lesions_reference"], lesion["lesions_detected"], lesion["lesions_false_positive"]) == (2, 1, 1)
    assert lesion_counts(reference == 2, prediction == 2) == {key: lesion[key] for key in lesion_counts(
        reference == 2, prediction == 2)}
    assert structure["lesions_reference"] is None


def test_dataset_sensitivity_pools_lesions_and_counts_false_positives_per_case() -> None:
    rows = [{"lesions_reference": 3, "lesions_detected": 3, "lesions_false_positive": 0},
            {"lesions_reference": 1, "lesions_detected": 0, "lesions_false_positive": 3}]
    summary = lesion_summary(rows, num_cases=2)
    assert summary["lesion_sensitivity"] == pytest.approx(0.75)
    assert summary["false_positive_lesions_per_case"] == pytest.approx(1.5)


def test_lesion_table_pools_counts_of_datasets_with_lesion_labels(segbook_home, tmp_path, capsys) -> None:
    import json

    from store_helpers import write_evaluated_run
    from results_helpers import write_registry

    from segbook.cli.main import main
    from segbook.paths import Paths
    from segbook.registry import load_registry
    from segbook.results import collect_results
    from segbook.results.lesions import lesion_table

    registry_file = write_registry(tmp_path / "registry.yaml")
    registry, paths = load_registry([registry_file]), Paths.from_env()
    folders = {(task, init): write_evaluated_run(paths.results, registry, task, "base", init, 0.6, seed=seed)
               for seed, (task, init) in enumerate([("Task902_MixedCT", "scratch"), ("Task903_LesionMR", "scratch"),
                                                    ("Task903_LesionMR", "pretrained"), ("Task901_SeenCT", "scratch")])}
    table = lesion_table(collect_results(paths, registry))
    rows = {(row[0], row[1]): dict(zip(table.columns, row)) for row in table.rows}
    assert set(rows) == {("Task902_MixedCT", "base scratch"), ("Task903_LesionMR", "base scratch"),
                         ("Task903_LesionMR", "base pretrained")}  # Task901 has no lesion label
    metrics = pd.read_csv(folders[("Task902_MixedCT", "scratch")] / "evaluation" / "metrics.csv")
    lesion = metrics[metrics["label"] == 2]  # Tumour; Spleen and Duct are structures
    row = rows[("Task902_MixedCT", "base scratch")]
    assert row["reference lesions"] == lesion["lesions_reference"].sum()
    assert row["sensitivity (%)"] == pytest.approx(
        100 * lesion["lesions_detected"].sum() / lesion["lesions_reference"].sum(), abs=0.005)
    assert row["false-positive lesions/case"] == pytest.approx(lesion["lesions_false_positive"].sum() / 6, abs=5e-4)
    assert row["lesion Dice (%)"] == pytest.approx(100 * lesion["dice"].mean(), abs=0.005)
    assert main(["results", "--registry", str(registry_file), "--table", "lesions", "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3


def test_lesion_table_pools_only_the_runs_on_the_whole_train_split(segbook_home, tmp_path) -> None:
    """A run on a tenth of the train split is the fractions table's, never pooled into the lesion table's cell."""
    from store_helpers import write_evaluated_run
    from results_helpers import write_registry

    from segbook.paths import Paths
    from segbook.registry import load_registry
    from segbook.results import collect_results
    from segbook.results.lesions import lesion_table

    registry, paths = load_registry([write_registry(tmp_path / "registry.yaml")]), Paths.from_env()
    whole = write_evaluated_run(paths.results, registry, "Task903_LesionMR", "base", "scratch", 0.6, seed=1)
    write_evaluated_run(paths.results, registry, "Task903_LesionMR", "base", "scratch", 0.2, seed=2, fraction=0.1)
    table = lesion_table(collect_results(paths, registry))
    row = dict(zip(table.columns, table.rows[0]))
    lesion = pd.read_csv(whole / "evaluation" / "metrics.csv")
    assert (len(table.rows), row["runs"]) == (1, 1)
    assert row["reference lesions"] == lesion["lesions_reference"].sum()
    assert row["lesion Dice (%)"] == pytest.approx(100 * lesion["dice"].mean(), abs=0.005)
