"""Which runs go into one table cell (issue 22): folds, budgets and every other setting of a run's fingerprint, test
splits, bundles of another split, notes, plans; on stores of runs written as training and evaluation leave them
(`store_helpers.write_evaluated_run`), each number checked against the files it comes from."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from store_helpers import write_evaluated_run
from results_helpers import A, B, C, D, write_registry

from segbook.cli.main import main
from segbook.data.split import Split, write_split
from segbook.paths import Paths
from segbook.registry import load_registry
from segbook.results import (case_tests, collect_results, compare_pretrained, dataset_table, recipe_table,
                             rank_stability, scale_table, significance_map)
from segbook.results.collect import ResultsError, ResultsWarning
from segbook.results.cost import cost_summary
from segbook.results.tables.fractions import fraction_table
from segbook.results.tables.table import ResultTable

TWO_BY_ONE = {"epochs": 2, "iterations_per_epoch": 1}
TWELVE_BY_THREE = {"epochs": 12, "iterations_per_epoch": 3}


@pytest.fixture
def registry_file(tmp_path: Path) -> Path:
    return write_registry(tmp_path / "registry.yaml")


@pytest.fixture
def store(segbook_home: Path, registry_file: Path):
    return Paths.from_env(), load_registry([registry_file])


def run(store, task: str, model: str, init: str, dice: float, **options) -> Path:
    paths, registry = store
    return write_evaluated_run(paths.results, registry, task, model, init, dice, **options)


def score(folder: Path) -> float:
    """A run's score in points, as its summary.json gives it."""
    return 100 * json.loads((folder / "evaluation" / "summary.json").read_text())["foreground_mean"]["dice"]


def collect(store, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResultsWarning)
        return collect_results(*store, **options)


def by_task(table: ResultTable) -> dict[str, dict]:
    return {row[0]: dict(zip(table.columns, row)) for row in table.rows}


def edit_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / "run.json").read_text())
    change(manifest)
    (folder / "run.json").write_text(json.dumps(manifest))


def cli(registry_file: Path, capsys, *args: str) -> tuple[int, str, str]:
    code = main(["results", "--registry", str(registry_file), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- folds ------------------------------------------------------------------------------------------------------


def test_folds_0_4_score_a_dataset_only_with_all_five_folds_evaluated(store, registry_file, capsys) -> None:
    """Only fold 0 trained on A: its cell is missing, naming the folds, and never averaged into a group."""
    for init, dice in (("scratch", 0.5), ("pretrained", 0.6)):
        run(store, A, "base", init, dice, fold="0")
    complete = {init: [run(store, C, "base", init, dice, fold=fold, seed=int(fold)) for fold in "01234"]
                for init, dice in (("scratch", 0.5), ("pretrained", 0.6))}
    df = collect(store, folds="0-4")
    rows = by_task(dataset_table(df))
    assert (rows[A]["base scratch"].value, rows[A]["base scratch"].status) == (
        None, "1 of 5 folds evaluated (fold 1: no run; fold 2: no run; fold 3: no run; fold 4: no run)")
    assert rows[A]["base delta"].value is None
    assert rows[C]["base scratch"].value == pytest.approx(np.mean([score(f) for f in complete["scratch"]]))
    assert rows[C]["base scratch"].count == 5
    table = scale_table(df)
    average = dict(zip(table.columns, next(r for r in table.rows if r[:2] == ["base", "scratch"])))["average"]
    assert (average.value, average.count, average.missing) == (pytest.approx(rows[C]["base scratch"].value), 1,
                                                                 (A,))
    assert any(note.startswith("left out: 2 evaluated run(s) of seeds without all five folds 0-4 evaluated")
               for note in table.notes)
    assert "the mean of folds 0, 1, 2, 3, 4" in table.notes[-1]

    code, out, err = cli(registry_file, capsys, "--folds", "0-4", "--table", "datasets", "--format", "json")
    records = {record["task"]: record for record in json.loads(out)}
    assert code == 0 and pd.isna(records[A]["base scratch"]) and records[C]["base scratch folds"] == 5
    assert records[A]["base scratch status"].startswith("1 of 5 folds evaluated (fold 1: no run")
    assert "segbook: warning: left out: 2 evaluated run(s) of seeds without all five folds" in err


def test_the_folds_column_counts_folds_and_seeds_are_counted_apart(store, registry_file, capsys) -> None:
    for seed in (0, 1):
        run(store, A, "base", "scratch", 0.6 + 0.1 * seed, run_seed=seed, seed=seed)
    code, out, _ = cli(registry_file, capsys, "--table", "datasets", "--format", "json")
    record = json.loads(out)[0]
    assert code == 0 and record["base scratch folds"] == 1 and record["base scratch seeds"] == 2


# --- budgets and every other setting of the fingerprint ------------------------------------------------------------


def test_runs_of_different_budgets_are_configurations_of_their_own(store, registry_file, capsys) -> None:
    """Two seeds of one configuration, 2 x 1 and 12 x 3: never averaged; each a named variant in every table."""
    short = run(store, A, "base", "scratch", 0.02, settings=TWO_BY_ONE)
    long = run(store, A, "base", "scratch", 0.09, run_seed=1, seed=1, settings=TWELVE_BY_THREE)
    df = collect(store)
    row = by_task(dataset_table(df))[A]
    assert "base scratch" not in row  # no cell averages the two
    assert sorted(df["variant"]) == ["12x3 it", "2x1 it"]
    assert row["base scratch [2x1 it]"].value == pytest.approx(score(short))
    assert row["base scratch [12x3 it]"].value == pytest.approx(score(long))
    assert row["base scratch [2x1 it]"].spread is None  # one seed each: nothing averaged
    records = scale_table(df).records("json")
    assert [(r["init"], r["variant"], r["small"]) for r in records] == [
        ("scratch", "12x3 it", pytest.approx(score(long), abs=1e-4)),
        ("scratch", "2x1 it", pytest.approx(score(short), abs=1e-4))]
    code, out, _ = cli(registry_file, capsys, "--format", "csv")
    assert code == 0 and out.splitlines()[0].startswith("model,init,variant,")


def test_delta_pt_pairs_only_runs_of_the_same_budget_and_names_what_differs(store) -> None:
    pretrained = run(store, A, "base", "pretrained", 0.8, settings=TWELVE_BY_THREE)
    run(store, A, "base", "scratch", 0.6, settings=TWO_BY_ONE)
    df = collect(store)
    table = scale_table(df)
    assert [row[1] for row in table.rows] == ["scratch", "pretrained"]  # no Delta(PT) row
    assert "no Delta(PT) for base pretrained: base scratch: 12x3 it vs 2x1 it" in table.notes
    assert "base delta" not in dataset_table(df).columns
    assert [row[1] for row in recipe_table(df).rows] == ["scratch", "pretrained"]
    assert compare_pretrained(df).empty and case_tests(df).empty
    assert np.isnan(cost_summary(df).set_index("init").loc["pretrained", "delta"])

    same_budget = run(store, A, "base", "scratch", 0.7, run_seed=1, seed=1, settings=TWELVE_BY_THREE)
    df = collect(store)
    table = scale_table(df)
    delta = dict(zip(table.columns, next(row for row in table.rows if row[1] == "Delta(PT)")))
    assert delta["variant"] == "" and delta["small"].value == pytest.approx(score(pretrained) - score(same_budget))
    assert compare_pretrained(df, group_by="all").iloc[0]["delta"] == pytest.approx(
        score(pretrained) - score(same_budget))
    assert by_task(dataset_table(df))[A]["base delta"].value == pytest.approx(score(pretrained) - score(same_budget))


def test_every_training_setting_names_its_variant(store) -> None:
    """Learning rate, head multiplier, precision, checkpoint, stem tiling (on a task with two input channels)."""
    run(store, A, "base", "pretrained", 0.70)
    run(store, A, "base", "pretrained", 0.71, run_seed=1, settings={"lr": 0.5})
    run(store, A, "base", "pretrained", 0.72, run_seed=2, settings={"head_lr_multiplier": 3.0})
    run(store, A, "base", "pretrained", 0.73, run_seed=3, settings={"mixed_precision": "bf16"})
    run(store, A, "base", "pretrained", 0.74, run_seed=4, settings={"weights_sha256": "f" * 64})
    run(store, A, "base", "pretrained", 0.75, run_seed=5, settings={"stem_tiling": "mean"},
        plans_summary={"input_channels": 2})
    run(store, A, "base", "pretrained", 0.76, run_seed=6, settings={"stem_tiling": "mean"})  # one channel: no tiling
    variants = collect(store).groupby("seed")["variant"].first()
    assert variants[6] == variants[0] and len(set(variants)) == 6
    assert "lr 0.5" in variants[1] and "heads x3" in variants[2] and "bf16" in variants[3]
    assert "ckpt ffffffff" in variants[4] and "stem mean" in variants[5]


def test_runs_recorded_before_the_fingerprint_are_read_from_their_settings(store) -> None:
    """A legacy run.json (no fingerprint, recipe, precision): its recipe resolved from its settings; one without
    settings at all reads `budget unknown`, equal to no known budget."""
    from segbook import fingerprint

    legacy = run(store, A, "base", "scratch", 0.6, settings=TWO_BY_ONE, fingerprinted=False)
    edit_manifest(legacy, lambda m: [m.pop(key) for key in ("recipe", "precision")])
    unknown = run(store, A, "base", "scratch", 0.7, run_seed=1, fingerprinted=False)
    edit_manifest(unknown, lambda m: [m.pop(key) for key in ("recipe", "precision", "settings")])
    run(store, A, "base", "scratch", 0.65, run_seed=2, settings=TWO_BY_ONE)
    df = collect(store).set_index("seed")
    assert df.loc[0, "fingerprint"] == df.loc[2, "fingerprint"] and df.loc[0, "variant"] == "2x1 it"
    assert (df.loc[1, "variant"], df.loc[1, "settings"]["budget"]) == ("budget unknown", fingerprint.UNKNOWN)
    assert df["evaluated"].all()


def test_a_run_whose_settings_were_edited_after_training_started_is_left_out(store) -> None:
    paths, registry = store
    run(store, A, "base", "scratch", 0.6)
    edited = run(store, A, "base", "scratch", 0.9, run_seed=1)

    def faster(manifest: dict) -> None:
        manifest["settings"]["lr"] = manifest["recipe"]["optimizer"]["lr"] = 0.5

    edit_manifest(edited, faster)
    with pytest.warns(ResultsWarning, match=r"left out: 1 evaluated run\(s\) whose run.json settings no longer give "
                                            "the fingerprint recorded when they started training"):
        df = collect_results(paths, registry)
    row = df[df["seed"] == 1].iloc[0]
    assert (row["evaluated"], row["status"], row["left_out"]) == (
        False, "run.json's settings and recipe edited since training started", "tampered")
    assert set(df["variant"]) == {""}  # the edited run makes no variant of its own


def test_runs_of_one_cell_that_differ_in_data_or_evaluation_settings_are_not_averaged(store) -> None:
    run(store, A, "base", "scratch", 0.60)
    run(store, A, "base", "scratch", 0.62, run_seed=1, plans_summary={"patch_size": [24, 32, 32]})
    run(store, C, "base", "scratch", 0.50)
    run(store, C, "base", "scratch", 0.52, run_seed=1, evaluation={"checkpoint": "checkpoint_best.pth"})
    pretrained = run(store, D, "base", "pretrained", 0.80, plans_summary={"patch_size": [24, 32, 32]})
    scratch = run(store, D, "base", "scratch", 0.70)
    df = collect(store)
    table = dataset_table(df)
    rows = by_task(table)
    assert (rows[A]["base scratch"].value, rows[A]["base scratch"].status) == (
        None, "not averaged: its runs differ (patch 20x32x32 vs patch 24x32x32)")
    assert rows[C]["base scratch"].status == ("not averaged: its runs differ (checkpoint checkpoint_final.pth vs "
                                              "checkpoint checkpoint_best.pth)")
    assert rows[D]["base scratch"].value == pytest.approx(score(scratch))
    assert rows[D]["base pretrained"].value == pytest.approx(score(pretrained))
    assert rows[D]["base delta"].value is None  # one cell's patch size is another's
    assert "  Task904_BoneCT base pretrained vs base scratch: patch 24x32x32 vs patch 20x32x32" in table.notes
    assert any(note.startswith("left out: 4 evaluated run(s) of one configuration and dataset that differ")
               for note in table.notes)
    assert compare_pretrained(df, group_by="all").empty  # A, C: no scratch; D: bases differ


def test_precision_is_what_the_run_computed_in(store) -> None:
    from segbook import fingerprint

    assert fingerprint.effective_precision("auto", "cpu") == fingerprint.effective_precision("fp16", "cpu") == "fp32"
    assert fingerprint.effective_precision("bf16", "cpu") == "bf16"
    assert fingerprint.effective_precision("auto", "cuda:0", True) == "bf16"
    assert fingerprint.effective_precision("auto", "cuda", False) == "fp16"
    assert fingerprint.effective_precision("auto", "cuda") == "auto on cuda"  # a record older than the precision
    assert fingerprint.effective_precision("auto", None) == fingerprint.UNKNOWN
    run(store, A, "base", "scratch", 0.6, device="cuda")  # recorded bf16
    legacy = run(store, A, "base", "scratch", 0.7, run_seed=1, device="cuda", fingerprinted=False)
    edit_manifest(legacy, lambda m: m.pop("precision"))
    assert sorted(collect(store)["variant"]) == ["auto on cuda", "bf16"]


# --- test splits and bundles -----------------------------------------------------------------------------------


def test_runs_scored_on_a_split_other_than_the_current_one_are_left_out(store, registry_file, capsys) -> None:
    """After `segbook data import --force --split NEW`, the runs scored on the old split are no longer current."""
    paths, registry = store
    old, new = Split(("case_a", "case_b"), ("case_c",)), Split(("case_a", "case_c"), ("case_b",))
    raw = paths.raw / registry.get(A).nnunet_name
    raw.mkdir(parents=True)
    write_split(raw, new)  # as the import with --split leaves it
    stale = [run(store, A, "base", init, 0.6, split=old.sha256) for init in ("scratch", "pretrained")]
    kept = run(store, C, "base", "scratch", 0.5, split=old.sha256)  # C is not imported here: no current split
    with pytest.warns(ResultsWarning, match=r"left out: 2 evaluated run\(s\) scored on a test split other than their "
                                            r"dataset's current one"):
        df = collect_results(paths, registry)
    rows = by_task(dataset_table(df))
    assert rows[A]["base scratch"].status == f"old test split {old.sha256[:12]} (current: " \
                                             f"{new.sha256[:12]})"
    assert rows[A]["base scratch"].value is None and rows[A]["split"] is None
    assert rows[C]["base scratch"].value == pytest.approx(score(kept)) and rows[C]["split"] == old.sha256
    code, out, err = cli(registry_file, capsys, "--table", "datasets")
    assert code == 0 and "left out: 2 evaluated run(s) scored on a test split other than" in out
    assert str(stale[0]) in out and "evaluate them again (segbook evaluate --force)" in out
    assert "segbook: warning: left out: 2 evaluated run(s)" in err


def test_a_run_trained_beside_another_split_than_it_was_scored_on_is_left_out(store) -> None:
    folder = run(store, A, "base", "scratch", 0.6, split="a" * 64)
    edit_manifest(folder, lambda m: m.update(split={"sha256": "b" * 64}))
    row = collect(store).iloc[0]
    assert (row["evaluated"], row["left_out"], row["status"]) == (
        False, "split", f"trained beside test split {'b' * 12}, scored on {'a' * 12}")


# --- notes, plans ------------------------------------------------------------------------------------------------


def test_notes_never_name_two_configurations_alike(store) -> None:
    """Seed noise of the segbook and heads-only recipes: each named with its recipe."""
    for seed in (0, 1):
        run(store, A, "base", "scratch", 0.60 + 0.02 * seed, run_seed=seed, seed=seed)
        run(store, A, "base", "pretrained", 0.70 + 0.02 * seed, run_seed=seed, seed=seed)
        run(store, A, "base", "pretrained", 0.65 + 0.02 * seed, run_seed=seed, seed=seed, recipe="heads-only")
    df = collect(store, recipes=["segbook", "heads-only"])
    assert "(within seed noise: base pretrained segbook: 0 of 1; base pretrained heads-only: 0 of 1 datasets)" in \
        "\n".join(dataset_table(df).notes)
    notes = scale_table(df).notes
    assert [note.split(":")[0] for note in notes if "within seed noise on" in note] == [
        "base pretrained segbook", "base pretrained heads-only"]


def test_unknown_plans_are_an_error_listing_the_plans_present(store, registry_file, capsys) -> None:
    run(store, A, "base", "scratch", 0.6)
    code, _, err = cli(registry_file, capsys, "--plans", "bogus")
    assert code == 2 and err.startswith("segbook: error: unknown plans 'bogus': no run was trained with it")
    assert "plans of the runs found: nnUNetPlans (1 run(s))" in err and "Traceback" not in err
    with pytest.raises(ResultsError, match="unknown plans 'bogus'"):
        collect(store, plans="bogus")
    assert cli(registry_file, capsys, "--plans", "paper")[0] == 0  # a planner: no runs of it yet, an empty table
    assert cli(registry_file, capsys, "--plans", "nnUNetPlans")[0] == 0


# --- what else could make a cell mean something other than its label ---------------------------------------------


def test_a_run_json_or_summary_of_another_run_is_left_out(store) -> None:
    """Files copied from another seed's, fold's or dataset's folder would be averaged as this run's."""
    seed0 = run(store, C, "base", "scratch", 0.5)
    seed1 = run(store, C, "base", "scratch", 0.6, run_seed=1)
    (seed1 / "run.json").write_bytes((seed0 / "run.json").read_bytes())
    fold0, fold1 = (run(store, A, "base", "scratch", 0.6, fold=fold) for fold in "01")
    (fold1 / "evaluation" / "summary.json").write_bytes((fold0 / "evaluation" / "summary.json").read_bytes())
    other = run(store, D, "base", "scratch", 0.6)
    (other / "evaluation" / "summary.json").write_bytes((seed0 / "evaluation" / "summary.json").read_bytes())
    df = collect(store).set_index(["task", "seed"])
    assert (df.loc[(C, 1), "status"], df.loc[(C, 1), "left_out"]) == ("run.json of another run", "identity")
    with pytest.warns(ResultsWarning, match="scores base scratch \\(recipe scratch\\), task Task903_LesionMR, "
                                            "not the run of its folder"):
        df = collect_results(*store)
    assert df.set_index("task").loc[D, "status"] == "summary.json of another run"
    with pytest.warns(ResultsWarning, match="scores base scratch \\(recipe scratch\\), fold 0, not the run"):
        df = collect_results(*store, folds="0-4")


def test_training_cases_that_contradict_the_fraction_are_left_out(store) -> None:
    folder = run(store, A, "base", "scratch", 0.6)
    edit_manifest(folder, lambda m: m.update(training_cases={"fraction": 1.0, "count": 10, "available": 40}))
    row = collect(store).iloc[0]
    assert (row["evaluated"], row["status"]) == (False, "trained on 10 of 40 cases, not the 100% its name says")


def test_runs_counted_before_their_whole_budget_are_a_variant_of_their_own(store) -> None:
    run(store, A, "base", "scratch", 0.6)
    short = run(store, A, "base", "scratch", 0.1, run_seed=1)
    summary_file = short / "evaluation" / "summary.json"
    summary = json.loads(summary_file.read_text())
    summary["training"] = {"status": "interrupted", "epochs_completed": 3, "epochs_planned": 1000,
                           "complete": False}
    summary_file.write_text(json.dumps(summary))
    assert collect(store)["evaluated"].tolist() == [True, False]
    counted = collect(store, include_incomplete=True).set_index("seed")
    assert counted["variant"].to_dict() == {0: "whole budget", 1: "3/1000 epochs"}
    rows = by_task(dataset_table(counted.reset_index()))
    assert rows[A]["base scratch [3/1000 epochs]"].value == pytest.approx(score(short))


def test_statistics_compare_only_configurations_of_one_budget(store) -> None:
    """Significance maps and rank stability never test or rank a 12 x 3 configuration against 2 x 1 ones."""
    from segbook.results.stats import NEVER_COMPARED, significance_table

    for task in (A, B, C, D):
        run(store, task, "base", "scratch", 0.6, settings=TWO_BY_ONE)
        run(store, task, "base", "pretrained", 0.7, settings=TWELVE_BY_THREE)
        run(store, task, "large", "scratch", 0.65, settings=TWO_BY_ONE)
    df = collect(store)
    significance = significance_map(df, group_by="scale")
    assert significance.attrs[NEVER_COMPARED] == ["base scratch vs base pretrained", "base pretrained vs large scratch"]
    tested = significance[significance["n"] > 0]
    assert set(zip(tested["config"], tested["versus"])) == {("base scratch", "large scratch"),
                                                            ("large scratch", "base scratch")}
    assert significance_table(significance).notes[-1] == (
        "never compared (trained with different budgets, precision or plans, or kept apart by their source): base "
        "scratch vs base pretrained; base pretrained vs large scratch")
    ranks = rank_stability(df, group_by="scale")
    assert set(ranks["group"]) == {f"{group} [2x1 it]" for group in ("small", "medium", "large", "average")}
    assert set(ranks["config"]) == {"base scratch", "large scratch"}  # base pretrained has no one to rank against


def test_fraction_table_matches_only_runs_scored_alike(store) -> None:
    """Pretraining on half the data evaluated with another step size is not compared with scratch."""
    run(store, A, "base", "scratch", 0.5)
    run(store, A, "base", "pretrained", 0.8)
    run(store, A, "base", "pretrained", 0.8, fraction=0.5, evaluation={"step_size": 0.25})
    table = fraction_table(collect(store))
    row = dict(zip(table.columns, table.rows[1]))
    assert (row["init"], row["50%"].value is not None, row["matches scratch@100%"]) == ("pretrained", True, "100%")


def test_per_case_tests_count_the_runs_the_tables_count(store) -> None:
    """A bundle's run of a configuration a local run also gives is not averaged into the per-case scores (the
    tables take the local run alone)."""
    from segbook.results.collect import bundles_dir

    paths, registry = store
    scratch = run(store, C, "base", "scratch", 0.5, cases=12, seed=1)
    pretrained = run(store, C, "base", "pretrained", 0.6, cases=12, seed=2)
    write_evaluated_run(bundles_dir(paths) / "lab-b" / "runs", registry, C, "base", "pretrained", 0.1, cases=12,
                        seed=3)
    df = collect(store)
    assert by_task(dataset_table(df))[C]["base pretrained"].value == pytest.approx(score(pretrained))
    tests = case_tests(df)
    cases = {name: pd.read_csv(folder / "evaluation" / "metrics.csv").groupby("case")["dice"].mean()
             for name, folder in (("scratch", scratch), ("pretrained", pretrained))}
    assert tests.iloc[0]["delta"] == pytest.approx(100 * (cases["pretrained"] - cases["scratch"]).mean())


def test_runs_scored_on_different_labels_are_not_averaged(store) -> None:
    """A seed evaluated before the registry entry gained a label scored fewer labels: its mean is another mean, and
    its summary no longer has the dataset's labels, so the checks of evaluation files leave it out."""
    run(store, B, "base", "scratch", 0.6)
    older = run(store, B, "base", "scratch", 0.7, run_seed=1)
    summary_file = older / "evaluation" / "summary.json"
    summary = json.loads(summary_file.read_text())
    del summary["labels"]["3"]
    summary_file.write_text(json.dumps(summary))
    df = collect(store)
    assert df.set_index("seed").loc[1, ["evaluated", "left_out"]].tolist() == [False, "invalid"]
    cell = by_task(dataset_table(df))[B]["base scratch"]
    assert cell.spread is None and "seed 1 fold all: invalid evaluation files" in cell.status  # seed 0 alone, marked
