"""`--summary median`: the median with its first and third quartiles over a group's datasets (group tables) and over
a dataset's test cases (the per-dataset table), equal to numpy.percentile of the scores read straight from the
store's files, in several formats; tables whose cells are no such summary refuse it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from results_helpers import A, B, C, D, build_store, write_case_metrics, write_registry

from segbook.cli.main import main
from segbook.paths import Paths
from segbook.results import build_table, collect_results
from segbook.results.selection import TableError
from segbook.runs import RunSpec

#: Per-case Dice of base pretrained on C (its one label): spread out, so that the median and quartiles over cases
#: differ from the mean.
C_CASES = [0.10, 0.50, 0.55, 0.60, 0.62, 0.70, 0.71, 0.80, 0.90, 0.95]


@pytest.fixture
def store(segbook_home: Path, tmp_path: Path):
    registry_file = write_registry(tmp_path / "registry.yaml")
    paths, registry = build_store(registry_file)
    write_case_metrics(_folder(registry, C, "base", "pretrained"),
                       {f"case_{i}": (dice,) for i, dice in enumerate(C_CASES)})
    return registry_file, registry


def _folder(registry, task: str, model: str, init: str) -> Path:
    return RunSpec.of(registry.get(task), model, init, "all").folder(Paths.from_env().results)


def _dataset_score(registry, task: str, model: str, init: str) -> float | None:
    """A run's score as its summary.json states it: the mean over its labels of each label's mean Dice."""
    summary_file = _folder(registry, task, model, init) / "evaluation" / "summary.json"
    if not summary_file.is_file():
        return None
    labels = json.loads(summary_file.read_text())["labels"].values()
    return float(np.mean([label["dice"] for label in labels if label["dice"] is not None]))


def _expected(values: list[float]) -> list[float]:
    q1, median, q3 = np.percentile(100 * np.array(values), [25, 50, 75])
    return [median, q1, q3]


def test_group_median_and_quartiles_over_datasets_equal_numpy(store, capsys: pytest.CaptureFixture) -> None:
    registry_file, registry = store
    scores = {init: [_dataset_score(registry, task, "base", init) for task in (A, B, C, D)]
              for init in ("scratch", "pretrained")}
    scratch, pretrained = _expected(scores["scratch"]), _expected(scores["pretrained"])
    delta = _expected([p - s for p, s in zip(scores["pretrained"], scores["scratch"])])
    assert scratch[0] != pytest.approx(100 * np.mean(scores["scratch"]))  # a median, not the mean

    assert main(["results", "--registry", str(registry_file), "--summary", "median", "--models", "base",
                 "--format", "csv"]) == 0
    rows = pd.read_csv(io.StringIO(capsys.readouterr().out)).set_index("init")
    for init, expected in (("scratch", scratch), ("pretrained", pretrained), ("Delta(PT)", delta)):
        row = rows.loc[init]
        assert [row["average"], row["average q1"], row["average q3"]] == pytest.approx(expected, abs=1e-4)
        assert row["average n"] == 4

    assert main(["results", "--registry", str(registry_file), "--summary", "median", "--models", "base",
                 "--format", "md"]) == 0
    page = capsys.readouterr().out
    assert f"{scratch[0]:.2f} ({scratch[1]:.2f}, {scratch[2]:.2f}) (n=4)" in page
    assert f"{delta[0]:+.2f} ({delta[1]:+.2f}, {delta[2]:+.2f}) (n=4)" in page
    assert "cell: median (Q1, Q3) Dice (%) over the n datasets" in page

    mean = build_table(collect_results(Paths.from_env(), registry), "scale", "dice", models=["base"])
    assert "q1" not in " ".join(mean.records("csv")[0])  # the mean's tables as they always were


def test_dataset_median_over_cases_equals_numpy_on_metrics_csv(store, capsys: pytest.CaptureFixture) -> None:
    registry_file, registry = store
    per_case = {}
    for init in ("pretrained", "scratch"):
        rows = pd.read_csv(_folder(registry, C, "base", init) / "evaluation" / "metrics.csv")
        per_case[init] = rows.groupby("case")["dice"].mean()
    pretrained = _expected(list(per_case["pretrained"]))
    paired = per_case["pretrained"] - per_case["scratch"].reindex(per_case["pretrained"].index)
    delta = _expected(list(paired))

    assert main(["results", "--registry", str(registry_file), "--table", "datasets", "--summary", "median",
                 "--models", "base", "--format", "json"]) == 0
    records = {record["task"]: record for record in json.loads(capsys.readouterr().out)}
    cell = records[C]
    assert [cell["base pretrained"], cell["base pretrained q1"], cell["base pretrained q3"]] == \
        pytest.approx(pretrained, abs=1e-4)
    assert cell["base pretrained cases"] == len(C_CASES)
    assert [cell["base delta"], cell["base delta q1"], cell["base delta q3"]] == pytest.approx(delta, abs=1e-4)
    # a dataset whose cases all score alike: median = both quartiles = its score
    expected_a = 100 * _dataset_score(registry, A, "base", "scratch")
    assert [records[A]["base scratch"], records[A]["base scratch q1"]] == pytest.approx([expected_a] * 2, abs=1e-4)

    assert main(["results", "--registry", str(registry_file), "--table", "datasets", "--summary", "median",
                 "--models", "base"]) == 0
    text = capsys.readouterr().out
    assert f"{pretrained[0]:.2f} ({pretrained[1]:.2f}, {pretrained[2]:.2f})" in text
    assert "median (Q1, Q3) Dice (%) over the dataset's test cases" in text


@pytest.mark.parametrize("arguments", [["--table", "cost"], ["--table", "fractions"], ["--table", "ranks"],
                                       ["--table", "case-tests"], ["--stats"]])
def test_tables_whose_cells_are_no_summary_refuse_median(store, arguments: list[str],
                                                         capsys: pytest.CaptureFixture) -> None:
    registry_file, _ = store
    assert main(["results", "--registry", str(registry_file), "--summary", "median", *arguments]) == 2
    error = capsys.readouterr().err
    assert "segbook: error: --summary median does not apply" in error and "Traceback" not in error
    assert "scale, modality-target, region, recipes, datasets" in error


def test_the_python_api_refuses_an_unknown_summary(store) -> None:
    _, registry = store
    df = collect_results(Paths.from_env(), registry)
    with pytest.raises(TableError, match="unknown summary 'mode'"):
        build_table(df, "scale", "dice", summary="mode")
    with pytest.raises(TableError, match="does not apply"):
        build_table(df, "cost", "dice", summary="median")


def test_the_report_refuses_a_median_selection_before_writing(store, tmp_path: Path) -> None:
    from segbook.errors import SegbookError
    from segbook.results import write_report

    _, registry = store
    df = collect_results(Paths.from_env(), registry)
    with pytest.raises(SegbookError, match="the report shows means"):
        write_report(df, tmp_path / "report.html", summary="median")
    assert not (tmp_path / "report.html").exists()
