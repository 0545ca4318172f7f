"""The budget tables on a hand-made store of two budgets with snapshots: `--table budgets` (agreement with the
largest budget), `--table curves` (snapshots and runs) and `--table pareto` (the front, amortised pretraining), each
number checked against a computation from the runs' metrics.csv with numpy/scipy; bad options refused; a tampered
snapshot evaluation left out with a warning."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from results_helpers import TEST_DATASETS, write_registry
from scipy.stats import spearmanr
from store_helpers import gpu_cost, write_evaluated_run, write_snapshot_evaluation

from segbook.cli.main import main
from segbook.paths import Paths
from segbook.registry import load_registry
from segbook.results import collect_results
from segbook.results.budgets import pareto_front
from segbook.results.collect import ResultsWarning
from segbook.results.stats.paired import bootstrap_ci
from segbook.results.tables import build_table

TASKS = [entry["key"] for entry in TEST_DATASETS]
#: (init, budget) -> per-dataset mean Dice the runs spread around; None: the recipe's budget (1000 epochs).
DICE = {("pretrained", None): (0.85, 0.80, 0.70, 0.60), ("scratch", None): (0.75, 0.82, 0.60, 0.50),
        ("pretrained", 150): (0.70, 0.60, 0.62, 0.40), ("scratch", 150): (0.65, 0.66, 0.50, 0.45)}
HOURS = {None: 10.0, 150: 1.5}
PRETRAINED_BASE_HOURS = 400.0


@pytest.fixture
def store(segbook_home, tmp_path):
    paths, registry = Paths.from_env(), load_registry([write_registry(tmp_path / "registry.yaml")])
    folders = {}
    for (init, budget), dice in DICE.items():
        for task, value in zip(TASKS, dice):
            folders[(task, init, budget)] = write_evaluated_run(
                paths.results, registry, task, "base", init, value, budget=budget, cost=gpu_cost(HOURS[budget]),
                seed=hash((task, init, budget)) % 1000)
    for (task, init, budget), folder in folders.items():
        if budget is None:
            for epoch, fraction in ((250, 0.25), (500, 0.5)):
                write_snapshot_evaluation(folder, registry, task, epoch, 0.5 + 0.1 * fraction, HOURS[None] * fraction)
    return paths, registry, folders


def run_score(folder: Path, evaluation: str = "evaluation") -> float:
    """A run's Dice as segbook defines it, from its metrics.csv: the mean over labels of each label's mean."""
    rows = pd.read_csv(folder / evaluation / "metrics.csv")
    return float(rows.groupby("label")["dice"].mean().mean())


def deltas(folders, budget) -> np.ndarray:
    return np.array([100 * (run_score(folders[(t, "pretrained", budget)]) - run_score(folders[(t, "scratch", budget)]))
                     for t in TASKS])


def rows_of(table) -> list[dict]:
    return [dict(zip(table.columns, row)) for row in table.rows]


def test_the_budgets_table_agrees_with_numpy_and_scipy(store):
    paths, registry, folders = store
    frame = collect_results(paths, registry)
    table = build_table(frame, "budgets")
    rows = {(row["configuration"].split(" [")[0], row["budget (epochs)"]): row for row in rows_of(table)}
    short, long = deltas(folders, 150), deltas(folders, None)
    row = rows[("base pretrained", 150)]
    assert row["same sign"] == pytest.approx(np.mean(np.sign(short) == np.sign(long)), abs=1e-3)
    assert 0 < row["same sign"] < 1  # the store makes the budgets disagree on some datasets
    assert row["Spearman"] == pytest.approx(spearmanr(short, long).statistic, abs=1e-3)
    low, high = bootstrap_ci(short - long)
    assert (row[f"{table.columns[4]} difference"], row["CI low"], row["CI high"]) == pytest.approx(
        (np.mean(short - long), low, high), abs=0.01)
    assert row[table.columns[4]] == pytest.approx(short.mean(), abs=0.01)
    assert row["device-hours/run"] == pytest.approx(1.5) and rows[("base pretrained", 1000)]["device-hours/run"] == 10
    assert rows[("base scratch", 150)][table.columns[3]] == pytest.approx(
        100 * np.mean([run_score(folders[(t, "scratch", 150)]) for t in TASKS]), abs=0.01)
    reference = rows[("base pretrained", 1000)]
    assert reference["same sign"] == 1 and reference["Spearman"] == pytest.approx(1)
    assert reference["by-scale within CI"] == "yes" and reference["smallest agreeing budget"] in (150, 1000)
    scales = dict(zip(frame["task"], frame["scale"]))
    within = all(
        bootstrap_ci(long[mask])[0] <= short[mask].mean() <= bootstrap_ci(long[mask])[1]
        for scale in set(scales.values()) for mask in [np.array([scales[t] == scale for t in TASKS])])
    assert row["by-scale within CI"] == ("yes" if within else "no")
    assert reference["smallest agreeing budget"] == (150 if within else 1000)
    assert rows[("base scratch", 150)]["same sign"] is None  # scratch has no Delta(PT) to agree


def test_pareto_membership_is_checked_by_brute_force_and_pretraining_amortised(store):
    paths, registry, folders = store
    frame = collect_results(paths, registry)
    dice = build_table(frame, "pareto").columns[-2]
    plain = rows_of(build_table(frame, "pareto"))
    amortised = rows_of(build_table(frame, "pareto", pretraining_cost="amortise",
                                    pretraining_gpu_hours={"base": PRETRAINED_BASE_HOURS}))
    for rows, extra in ((plain, 0.0), (amortised, PRETRAINED_BASE_HOURS / len(TASKS))):
        points = []
        for row in rows:
            init = "pretrained" if "pretrained" in row["configuration"] else "scratch"
            budget = None if row["budget (epochs)"] == 1000 else 150
            hours = HOURS[budget] + (extra if init == "pretrained" else 0.0)
            score = 100 * np.mean([run_score(folders[(t, init, budget)]) for t in TASKS])
            assert row["hours/run counted"] == pytest.approx(hours) and row[dice] == pytest.approx(score, abs=0.01)
            points.append((hours, score))
        dominated = [any(h2 <= h and s2 >= s and (h2, s2) != (h, s) for h2, s2 in points) for h, s in points]
        assert [row["Pareto front"] for row in rows] == ["no" if d else "yes" for d in dominated]
    assert {row["source"] for row in amortised if "pretrained" in row["configuration"]} == {"--pretraining-gpu-hours"}
    unknown = rows_of(build_table(frame, "pareto", pretraining_cost="amortise"))  # the catalogue publishes none
    for row in unknown:
        if "pretrained" in row["configuration"]:
            assert row["hours/run counted"] == "unknown" and row["Pareto front"] == "unknown cost"
            assert row["source"] == "unknown"
    assert pareto_front([1.0, 2.0, 2.0, float("nan")], [5.0, 5.0, 6.0, 9.0]) == [True, False, True, False]


def test_curves_show_snapshots_and_runs_and_leave_a_tampered_snapshot_out(store):
    paths, registry, folders = store
    frame = collect_results(paths, registry)
    dice = build_table(frame, "curves").columns[5]
    rows = rows_of(build_table(frame, "curves"))
    snapshots = [row for row in rows if row["point"].startswith("snapshot")]
    assert {(row["configuration"].split(" [")[0], row["epochs trained"]) for row in snapshots} == {
        (f"base {init}", epoch) for init in ("pretrained", "scratch") for epoch in (250, 500)}
    for row in snapshots:
        init = row["configuration"].split()[1]
        expected = 100 * np.mean([run_score(folders[(t, init, None)], f"snapshots/evaluation_ep{row['epochs trained']}")
                                  for t in TASKS])
        assert row[dice] == pytest.approx(expected, abs=0.01)
        assert row["device-hours"] == pytest.approx(HOURS[None] * row["epochs trained"] / 1000)
    assert sum(row["point"] == "run" for row in rows) == 4
    summary = folders[(TASKS[0], "pretrained", None)] / "snapshots" / "evaluation_ep250" / "summary.json"
    record = json.loads(summary.read_text())
    record["foreground_mean"]["dice"] = 0.99  # no longer what its metrics.csv says
    summary.write_text(json.dumps(record))
    with pytest.warns(ResultsWarning, match="evaluation_ep250"):
        rows = rows_of(build_table(frame, "curves"))
    (row,) = [r for r in rows if r["epochs trained"] == 250 and r["configuration"].startswith("base pretrained")]
    assert row["datasets"] == len(TASKS) - 1


def test_curves_and_budgets_reach_the_report_and_the_cli_in_every_format(store, tmp_path, capsys):
    paths, registry, _ = store
    registry_file = str(tmp_path / "registry.yaml")
    for table in ("budgets", "curves", "pareto"):
        for fmt in ("table", "md", "csv", "json", "latex"):
            assert main(["results", "--registry", registry_file, "--table", table, "--format", fmt]) == 0, (table, fmt)
    assert main(["results", "--registry", registry_file, "--table", "pareto", "--pretraining-cost", "amortise",
                 "--pretraining-gpu-hours", "base=400"]) == 0
    assert "--pretraining-gpu-hours" in capsys.readouterr().out
    out = tmp_path / "report.html"
    assert main(["report", "--registry", registry_file, "--out", str(out)]) == 0
    page = out.read_text()
    assert "against training device-hours" in page and "per training budget" in page
    assert "dashed: snapshots" in page and "<img" in page


@pytest.mark.parametrize("options,message", [
    (["--table", "pareto", "--pretraining-cost", "amortise", "--pretraining-gpu-hours", "base=-3"], "positive"),
    (["--table", "pareto", "--pretraining-cost", "amortise", "--pretraining-gpu-hours", "base=nan"], "positive"),
    (["--table", "pareto", "--pretraining-cost", "amortise", "--pretraining-gpu-hours", "nosuch=3"], "unknown model"),
    (["--table", "pareto", "--pretraining-cost", "amortise", "--pretraining-gpu-hours", "base"], "MODEL=HOURS"),
    (["--table", "pareto", "--pretraining-cost", "amortise", "--pretraining-gpu-hours", "base=1", "base=2"],
     "more than once"),
    (["--table", "pareto", "--pretraining-gpu-hours", "base=3"], "--pretraining-cost amortise"),
    (["--table", "scale", "--pretraining-cost", "amortise"], "do not apply to --table scale")])
def test_bad_pretraining_options_are_refused(segbook_home, capsys, options, message):
    assert main(["results", *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("segbook: error:") and message in err and "Traceback" not in err


def test_a_catalogued_pretraining_cost_needs_a_positive_figure_and_its_source():
    from segbook.backbones import Backbone, BackboneError, pretraining_cost

    for hours, source in ((5.0, ""), (0.0, "paper"), (float("inf"), "paper"), (True, "paper")):
        with pytest.raises(BackboneError, match="pretraining_gpu_hours"):
            Backbone("mine", "stunet", "Mine", pretraining_gpu_hours=hours, pretraining_gpu_hours_source=source)
    assert Backbone("mine", "stunet", "Mine", pretraining_gpu_hours=12.5,
                    pretraining_gpu_hours_source="a paper, table 1").pretraining_gpu_hours == 12.5
    assert pretraining_cost("base") is None  # no built-in figure was verified: unknown, never zero


@pytest.mark.parametrize("change, says", [
    (lambda record: record["settings"].update(mirroring=False), "other evaluation settings than its run (mirroring)"),
    (lambda record: record.update(split={"sha256": "0" * 64}), "another test split than its run"),
])
def test_a_snapshot_scored_otherwise_than_its_run_is_left_out_of_the_curves(store, change, says):
    """A curve's points must differ only in how long the network trained: a snapshot evaluated without mirroring,
    or on another test split, is no point of its run's curve."""
    paths, registry, folders = store
    frame = collect_results(paths, registry)
    summary = folders[(TASKS[0], "pretrained", None)] / "snapshots" / "evaluation_ep250" / "summary.json"
    record = json.loads(summary.read_text())
    change(record)
    summary.write_text(json.dumps(record))
    with pytest.warns(ResultsWarning, match=f"evaluation_ep250.*{re.escape(says)}"):
        rows = rows_of(build_table(frame, "curves"))
    (row,) = [r for r in rows if r["epochs trained"] == 250 and r["configuration"].startswith("base pretrained")]
    assert row["datasets"] == len(TASKS) - 1
