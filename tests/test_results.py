"""Results tables on a hand-built store with known answers: grouping rules, missing runs, folds, statistics, import,
fine-tuning recipes side by side."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy.stats import wilcoxon

from results_helpers import A, B, C, D, RUNS, add_recipe_runs, build_store, write_registry, write_run

from segbook.cli.main import main
from segbook.paths import Paths
from segbook.registry import Registry, load_registry
from segbook.recipes import RecipeError
from segbook.results import (
    ALL_RECIPES,
    ResultsError,
    ResultsWarning,
    build_table,
    collect_results,
    compare_pretrained,
    compare_recipes,
    dataset_table,
    import_results,
    modality_target_table,
    paired_comparison,
    recipe_table,
    region_table,
    resolve_recipes,
    scale_table,
)
from segbook.results.selection import TableError
from segbook.results.stats import bootstrap_ci
from segbook.results.tables import TABLES, sections
from segbook.results.tables.groups import _cost
from segbook.results.tables.table import Cell, ResultTable
from segbook.runs import RunSpec


@pytest.fixture
def registry_file(tmp_path: Path) -> Path:
    return write_registry(tmp_path / "test_registry.yaml")


@pytest.fixture
def store(segbook_home: Path, registry_file: Path) -> tuple[Paths, Registry]:
    return build_store(registry_file)


@pytest.fixture
def df(store: tuple[Paths, Registry]):
    return collect_results(*store)


@pytest.fixture
def recipe_store(store: tuple[Paths, Registry]) -> tuple[Paths, Registry]:
    add_recipe_runs(*store)
    return store


def collect_quietly(paths: Paths, registry: Registry, recipes: list[str] | None = None):
    """Collect a store with runs of other recipes (which warn when left out)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResultsWarning)
        return collect_results(paths, registry, recipes=recipes)


def cells(table: ResultTable, model: str, init: str, recipe: str | None = None) -> dict[str, Cell]:
    """The cells of a row; `recipe` for tables that name it (the row's third column)."""
    row = next(row for row in table.rows if row[:2] == [model, init] and recipe in (None, row[2]))
    return {column: value for column, value in zip(table.columns, row) if isinstance(value, Cell)}


def values(table: ResultTable, model: str, init: str, recipe: str | None = None
           ) -> dict[str, tuple[float | None, int]]:
    return {group: (cell.value, cell.count) for group, cell in cells(table, model, init, recipe).items()}


# --- collection ------------------------------------------------------------------------------------------------


def test_collection_reads_every_run_with_its_status(df) -> None:
    assert len(df) == len(RUNS)
    assert df["evaluated"].sum() == sum(not isinstance(v, str) for v in RUNS.values())
    statuses = dict(zip(zip(df["task"], df["model"], df["init"]), df["status"]))
    assert statuses[(B, "large", "pretrained")] == "running" and statuses[(A, "base", "pretrained")] == "evaluated"
    run = df[(df["task"] == B) & (df["model"] == "nnunet")].iloc[0]
    assert (run["dice"], run["dice_seen"], run["dice_lesion"], run["dice_unseen"]) == pytest.approx(
        (0.70, 0.90, 0.50, 0.70))
    assert (run["nsd"], run["scale"], run["region"], run["parts"]) == (pytest.approx(0.75), "medium", "Abdominal",
                                                                        "seen+unseen+lesion")


def test_undefined_labels_are_left_out_of_the_run_score(store) -> None:
    paths, registry = store
    write_run(paths.results, registry, D, "large", "scratch", "all", (None,))  # in neither mask on every case
    df = collect_results(paths, registry)
    assert math.isnan(df[(df["task"] == D) & (df["model"] == "large")]["dice"].iloc[0])
    table = dataset_table(df)
    assert table.rows[-1][table.columns.index("large scratch")].text() == "no Dice"


def test_unknown_datasets_other_plans_and_broken_summaries_are_reported(store) -> None:
    paths, registry = store
    (paths.results / "Dataset555_Unknown" / "SegbookTrainer_base_scratch__nnUNetPlans__3d_fullres" / "fold_all"
     ).mkdir(parents=True)
    other = RunSpec.of(registry.get(C), "huge", "scratch", plans="nnUNetResEncUNetMPlans")
    other.folder(paths.results).mkdir(parents=True)
    broken = write_run(paths.results, registry, D, "huge", "pretrained", "all", (0.9,))
    (broken / "evaluation" / "summary.json").write_text("{not json")
    with pytest.warns(ResultsWarning) as caught:
        df = collect_results(paths, registry)
    messages = " | ".join(str(w.message) for w in caught)
    assert "Dataset555_Unknown" in messages and "not in the registry" in messages
    assert "plans 'nnUNetResEncUNetMPlans'" in messages and "--plans nnUNetResEncUNetMPlans" in messages
    assert "summary.json" in messages
    assert df[(df["task"] == D) & (df["model"] == "huge")]["status"].iloc[0] == "unreadable summary.json"
    assert "huge" not in set(df.loc[df["task"] == C, "model"])


def test_runs_that_did_not_train_their_budget_are_left_out_unless_asked(store, registry_file: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    paths, registry = store
    short = write_run(paths.results, registry, D, "large", "scratch", "all", (0.99,))
    summary = json.loads((short / "evaluation" / "summary.json").read_text())
    summary["training"] = {"status": "finished", "epochs_completed": 3, "epochs_planned": 1000, "complete": False}
    (short / "evaluation" / "summary.json").write_text(json.dumps(summary))
    older = write_run(paths.results, registry, D, "large", "pretrained", "all", (0.98,))  # before the field existed
    summary = json.loads((older / "evaluation" / "summary.json").read_text())
    del summary["training"]
    (older / "evaluation" / "summary.json").write_text(json.dumps(summary))
    manifest = json.loads((older / "run.json").read_text())
    manifest.update(settings={"epochs": 5}, epochs=[{"epoch": 0}])
    (older / "run.json").write_text(json.dumps(manifest))

    with pytest.warns(ResultsWarning, match=r"2 evaluated run\(s\) did not train their whole budget, left out "
                                            r"\(pass --include-incomplete"):
        df = collect_results(paths, registry)
    large = df[(df["task"] == D) & (df["model"] == "large")].set_index("init")
    assert not large["evaluated"].any()
    assert large.loc["scratch", "status"] == "trained 3/1000 epochs (finished)"
    assert large.loc["pretrained", "status"] == "trained 1/5 epochs (finished)"

    assert main(["results", "--registry", str(registry_file), "--table", "datasets", "--format", "csv",
                 "--include-incomplete"]) == 0
    printed = capsys.readouterr()
    assert "did not train their whole budget, counted" in printed.err and ",99.0,1,,98.0,1," in printed.out
    assert main(["results", "--registry", str(registry_file), "--table", "datasets", "--format", "csv"]) == 0
    printed = capsys.readouterr().out
    assert ",99.0," not in printed and "trained 3/1000 epochs (finished)" in printed


# --- tables ----------------------------------------------------------------------------------------------------


def test_scale_table_known_values_counts_and_delta(df) -> None:
    table = scale_table(df)
    assert table.columns[-4:] == ["small", "medium", "large", "average"]
    assert values(table, "nnunet", "scratch") == {
        "small": (pytest.approx(82.5), 2), "medium": (pytest.approx(70.0), 1), "large": (pytest.approx(60.0), 1),
        "average": (pytest.approx(73.75), 4)}
    assert values(table, "base", "scratch") == {
        "small": (pytest.approx(78.0), 2), "medium": (pytest.approx(60.0), 1), "large": (pytest.approx(50.0), 1),
        "average": (pytest.approx(66.5), 4)}
    # A's base pretrained averages its folds 0 and 1: (0.85 + 0.90) / 2.
    assert values(table, "base", "pretrained")["small"] == (pytest.approx(100 * (0.875 + 0.8105) / 2), 2)
    assert values(table, "base", "Delta(PT)") == {
        "small": (pytest.approx(100 * (0.125 + 0.0005) / 2), 2), "medium": (pytest.approx(10.0), 1),
        "large": (pytest.approx(15.0), 1), "average": (pytest.approx(100 * 0.375500 / 4), 4)}
    base = next(row for row in table.rows if row[:2] == ["base", "scratch"])
    assert base[2:5] == [58.3, 0.51, 1.02]


def test_missing_configuration_is_marked_and_listed_never_averaged(df) -> None:
    table = scale_table(df)
    large = cells(table, "large", "pretrained")
    assert (large["small"].value, large["small"].count, large["small"].missing) == (pytest.approx(90.0), 1, (D,))
    assert large["small"].text() == "90.00 (n=1)*"
    assert large["medium"].value is None and large["medium"].missing == (B,)
    assert large["medium"].text() == "missing"
    assert (large["average"].value, large["average"].count) == (pytest.approx(80.0), 2)
    assert not any(row[1] == "Delta(PT)" and row[0] == "large" for row in table.rows)  # no large scratch
    notes = "\n".join(table.notes)
    assert f"large pretrained: {B}, {D}" in notes and "Missing" in notes
    assert "base scratch:" not in notes


def test_requested_configurations_are_shown_even_when_absent(df) -> None:
    table = scale_table(df, models=["huge", "base"], inits=["pretrained"])
    assert [row[:2] for row in table.rows] == [["base", "pretrained"], ["huge", "pretrained"]]
    assert all(cell.value is None for cell in cells(table, "huge", "pretrained").values())
    assert f"huge pretrained: {A}, {B}, {C}, {D}" in "\n".join(table.notes)
    assert [row[:2] for row in scale_table(df, inits=["pretrained"]).rows] == [["base", "pretrained"],
                                                                                ["large", "pretrained"]]


def test_modality_target_splits_structure_and_lesion_labels(df) -> None:
    table = modality_target_table(df)
    assert table.columns[2:] == ["CT seen structure", "CT unseen structure", "CT lesion", "MRI lesion"]
    assert values(table, "nnunet", "scratch") == {
        "CT seen structure": (pytest.approx(87.5), 2),  # A (0.85) and B's seen label (0.90)
        "CT unseen structure": (pytest.approx(75.0), 2),  # B's unseen label (0.70) and D (0.80)
        "CT lesion": (pytest.approx(50.0), 1), "MRI lesion": (pytest.approx(60.0), 1)}
    assert values(table, "base", "Delta(PT)")["CT seen structure"] == (pytest.approx(100 * (0.125 + 0.10) / 2), 2)
    assert values(table, "base", "Delta(PT)")["CT unseen structure"] == (pytest.approx(100 * 0.0005 / 2), 2)
    assert "no datasets: MRI seen structure, MRI unseen structure, Ultrasound lesion, CT&PET lesion" in table.notes


def test_group_datasets_assigns_whole_datasets_by_target(df) -> None:
    table = modality_target_table(df, group_datasets=True)
    assert table.columns[2:] == ["CT seen structure", "CT unseen structure", "CT structure&lesion", "MRI lesion"]
    assert values(table, "base", "scratch") == {
        "CT seen structure": (pytest.approx(75.0), 1), "CT unseen structure": (pytest.approx(81.0), 1),
        "CT structure&lesion": (pytest.approx(60.0), 1), "MRI lesion": (pytest.approx(50.0), 1)}


def test_region_table_with_bone_and_vessel(df) -> None:
    table = region_table(df)
    assert table.columns[2:] == ["Head and Neck", "Abdominal", "Other", "Bone", "Vessel"]
    assert values(table, "nnunet", "scratch") == {
        "Head and Neck": (pytest.approx(60.0), 1), "Abdominal": (pytest.approx(77.5), 2),
        "Other": (pytest.approx(80.0), 1), "Bone": (pytest.approx(80.0), 1), "Vessel": (pytest.approx(85.0), 1)}
    assert "no datasets: Pelvic, Limb, Thoracic" in table.notes


def test_dataset_table_statuses_sources_and_splits(store) -> None:
    paths, registry = store
    write_run(paths.results, registry, D, "large", "scratch", "all", (0.7,), split="ab" * 32)
    table = dataset_table(collect_results(paths, registry))
    assert table.columns[4:] == ["nnunet scratch", "base scratch", "base pretrained", "large scratch",
                                 "large pretrained", "base delta", "large delta", "source", "split"]
    rows = {row[0]: dict(zip(table.columns, row)) for row in table.rows}
    assert list(rows) == [A, B, C, D]
    cell = rows[A]["base pretrained"]
    assert (cell.value, cell.count, cell.status, cell.text(show_count=False)) == (pytest.approx(87.5), 1, "", "87.50")
    assert rows[B]["large pretrained"].text() == "running"
    assert rows[D]["large pretrained"].text() == "missing"
    assert rows[A]["base delta"].text(show_count=False) == "+12.50"
    assert rows[A]["source"] == "local"
    assert (rows[D]["split"], rows[A]["split"]) == ("ab" * 32, None)
    text = {record["task"]: record for record in table.records("table")}
    machine = {record["task"]: record for record in table.records("csv")}
    assert (text[D]["split"], machine[D]["split"]) == ("ab" * 6, "ab" * 32)
    assert "local runs: fold all (SegBook's protocol); plans nnUNetPlans" in table.notes[-1]


def test_folds_are_chosen_explicitly_and_named_in_the_notes(store, registry_file, capsys) -> None:
    """SegBook's protocol scores fold all; --folds 0-4 averages the cross-validation folds instead. Never both."""
    paths, registry = store
    for fold, dice in (("0", (0.60, 0.70)), ("1", (0.70, 0.70)), ("2", "failed")):
        write_run(paths.results, registry, A, "base", "pretrained", fold, dice)
    with pytest.warns(ResultsWarning, match=r"ignored 3 run\(s\) of fold\(s\) 0 \(1\), 1 \(1\), 2 \(1\): the tables "
                                            r"average fold all, SegBook's protocol \(pass --folds 0-4"):
        protocol = collect_results(paths, registry)
    cell = next(row for row in dataset_table(protocol).rows if row[0] == A)[6]
    assert (cell.value, cell.count) == (pytest.approx(87.5), 1)  # fold all alone, not (0.875 + 0.65 + 0.7) / 3
    assert "local runs: fold all (SegBook's protocol)" in scale_table(protocol).notes[-1]

    with pytest.warns(ResultsWarning, match=r"ignored 15 run\(s\) of fold\(s\) all \(15\): the tables average the "
                                            r"five cross-validation folds 0-4 \(pass --folds all"):
        folds = collect_results(paths, registry, folds="0-4")
    table = dataset_table(folds)
    cell = next(row for row in table.rows if row[0] == A)[table.columns.index("base pretrained")]
    status = "2 of 5 folds evaluated (fold 2: failed; fold 3: no run; fold 4: no run)"
    assert (cell.value, cell.count, cell.status, cell.text(show_count=False)) == (None, 0, status, status)
    assert any(note.startswith("left out: 2 evaluated run(s) of seeds without all five folds") for note in table.notes)
    assert main(["results", "--registry", str(registry_file), "--folds", "0-4", "--table", "datasets"]) == 0
    assert status in capsys.readouterr().out
    with pytest.raises(ResultsError, match="unknown folds '0-2'; choose all or 0-4"):
        collect_results(paths, registry, folds="0-2")


def test_split_hashes_of_a_dataset_without_a_current_split_are_kept_apart_and_plans_refused(store, registry_file,
                                                                                             capsys) -> None:
    """Local runs of a dataset not imported here (no current split) scored on two splits: each split its own rows,
    never averaged or compared; runs of other plans are never collected together, and refused when put together."""
    paths, registry = store
    old = write_run(paths.results, registry, C, "large", "scratch", "all", (0.55,), split="0" * 64)
    new = write_run(paths.results, registry, C, "huge", "scratch", "all", (0.60,), split="1" * 64)
    df = collect_results(paths, registry)
    assert set(df.loc[df["task"] == C, "split"].dropna()) == {"0" * 64, "1" * 64}
    assert dict(zip(df["path"], df["variant"]))[str(old)] == "split 00000000"
    assert dict(zip(df["path"], df["variant"]))[str(new)] == "split 11111111"
    row = next(row for row in dataset_table(df).records("json") if row["task"] == C)
    assert (row["large scratch [split 00000000]"], row["huge scratch [split 11111111]"]) == (55.0, 60.0)
    assert main(["results", "--registry", str(registry_file)]) == 0
    assert "large scratch [split 00000000]" not in capsys.readouterr().err

    new.parent.rename(new.parent.with_name(new.parent.name + "_moved"))  # the other split out of the store
    paper = write_run(paths.results, registry, C, "huge", "scratch", "all", (0.62,), plans="SegbookPaperPlans")
    with pytest.warns(ResultsWarning, match="ignored 1 run\\(s\\) trained with plans 'SegbookPaperPlans': runs of "
                                            "other plans are never averaged in"):
        default = collect_results(paths, registry)
    assert set(default["plans"]) == {"nnUNetPlans"}
    with pytest.warns(ResultsWarning):
        only_paper = collect_results(paths, registry, plans="paper")  # a planner's name for its identifier
    assert list(only_paper["path"]) == [str(paper)]
    mixed = pd.concat([default, only_paper], ignore_index=True)  # as an API user could put them together
    with pytest.raises(TableError, match=f"{C}: runs with different plans are never averaged or compared "
                                         f"\\(SegbookPaperPlans: {paper}; nnUNetPlans: .*--plans"):
        scale_table(mixed)


def test_machine_formats_have_separate_counts_and_missing_lists(df) -> None:
    records = scale_table(df).records("json")
    large = next(r for r in records if r["model"] == "large" and r["init"] == "pretrained")
    assert (large["small"], large["small n"], large["small missing"]) == (90.0, 1, D)
    assert (large["medium"], large["medium n"], large["medium missing"]) == (None, 0, B)
    text = scale_table(df).records("table")
    assert text[0]["model"] == "nnU-Net" and records[0]["model"] == "nnunet"
    latex = modality_target_table(df, group_datasets=True).records("latex")
    assert r"CT structure\&lesion" in latex[0]


def test_the_table_registry_names_real_builders_and_report_sections() -> None:
    """The one list of tables: each builder (imported by name when called) is a function, and the report renders
    each section the registry names."""
    import importlib

    from segbook.results.report import RENDERERS

    for spec in TABLES:
        for named in filter(None, (spec.build, spec.stats)):
            module, _, function = named.target.partition(":")
            assert callable(getattr(importlib.import_module(module), function)), named
    assert set(sections()) == set(RENDERERS)


def test_model_cost_matches_the_networks() -> None:
    """The tables' costs are the registry's catalogued numbers (no torch in tables), equal to the counted ones."""
    import stunet

    from segbook import backbones

    for backbone in backbones.BUILTIN:
        if backbone.family == "STU-Net":
            summary = stunet.preset_summary(backbone.name)
            assert (summary["parameters"], summary["forward_macs"]) == backbone.cost
    assert _cost("large") == [440.3, 3.83, 7.65] and _cost("nnunet") == [None, None, None]


def test_small_store_with_empty_groups(segbook_home: Path, registry_file: Path) -> None:
    registry = load_registry([registry_file])
    paths = Paths.from_env()
    write_run(paths.results, registry, C, "base", "pretrained", "all", (0.7,))
    df = collect_results(paths, registry)
    table = scale_table(df)
    assert table.columns[2:] == ["params (M)", "TMACs", "TFLOPs", "large", "average"]
    assert "no datasets: small, medium" in table.notes
    empty = collect_results(paths, registry, results_dir=segbook_home / "nowhere")
    assert scale_table(empty).rows == [] and dataset_table(empty).rows == []
    assert compare_pretrained(empty).empty


def test_missing_runs_are_listed_when_every_dataset_is_split_by_label(segbook_home: Path, registry_file: Path
                                                                       ) -> None:
    registry = load_registry([registry_file])
    paths = Paths.from_env()
    write_run(paths.results, registry, B, "base", "scratch", "all", (0.8, 0.4, 0.6))
    write_run(paths.results, registry, B, "base", "pretrained", "all", "running")
    table = modality_target_table(collect_results(paths, registry))
    assert f"  base pretrained: {B}" in table.notes


# --- statistics ------------------------------------------------------------------------------------------------


def test_paired_comparison_counts_ties_within_tolerance() -> None:
    result = paired_comparison([0.80, 0.70, 0.6005, 0.50], [0.70, 0.75, 0.60, 0.50])
    assert (result.n, result.wins, result.ties, result.losses) == (4, 1, 2, 1)
    assert result.delta == pytest.approx(100 * (0.10 - 0.05 + 0.0005) / 4)
    assert result.p_value == pytest.approx(wilcoxon([0.10, -0.05, 0.0005, 0.0]).pvalue)


def test_bootstrap_interval_is_seeded_and_brackets_the_mean() -> None:
    differences = np.array([0.05, -0.02, 0.10, 0.01, 0.03, 0.07])
    low, high = bootstrap_ci(differences)
    assert (low, high) == bootstrap_ci(differences)
    assert differences.min() <= low < differences.mean() < high <= differences.max()
    assert bootstrap_ci(np.full(5, 0.02)) == pytest.approx((0.02, 0.02))
    assert all(math.isnan(v) for v in bootstrap_ci(np.array([])))
    assert math.isnan(paired_comparison([0.5, 0.6], [0.5, 0.6]).p_value)  # nothing to rank


def test_compare_pretrained_per_group(df) -> None:
    overall = compare_pretrained(df, "dice", "all")
    row = overall.iloc[0]
    assert (row["model"], row["group"], row["n"], row["wins"], row["ties"], row["losses"]) == (
        "base", "all", 4, 3, 1, 0)
    assert row["delta"] == pytest.approx(100 * (0.125 + 0.10 + 0.15 + 0.0005) / 4)
    assert row["p_value"] == pytest.approx(wilcoxon([0.125, 0.10, 0.15, 0.0005]).pvalue) == pytest.approx(0.125)
    assert row["ci_low"] <= row["delta"] <= row["ci_high"]
    by_target = compare_pretrained(df, "dice", "modality-target").set_index("group")
    assert by_target.loc["CT seen structure", "n"] == 2
    assert by_target.loc["CT seen structure", "delta"] == pytest.approx(
        values(modality_target_table(df), "base", "Delta(PT)")["CT seen structure"][0])
    nsd = compare_pretrained(df, "nsd", "scale").set_index("group")
    assert nsd.loc["large", "delta"] == pytest.approx(15.0)


# --- recipes ---------------------------------------------------------------------------------------------------


def every_table(df) -> list[tuple[list[dict], list[str]]]:
    tables = [scale_table(df), modality_target_table(df), region_table(df), dataset_table(df)]
    return [(table.records("json"), table.notes) for table in tables]


def test_default_tables_are_unchanged_by_other_recipes_which_are_counted(store) -> None:
    paths, registry = store
    before = collect_results(paths, registry)
    add_recipe_runs(paths, registry)
    with pytest.warns(ResultsWarning) as caught:
        after = collect_results(paths, registry)
    messages = [str(w.message) for w in caught]
    assert ("ignored 7 result(s) of other recipes: heads-only (3), llrd (4); show them with --recipes "
            "segbook,heads-only,llrd, or compare recipes with `segbook results --table recipes`") in messages
    assert not any("seed" in m or "fraction" in m for m in messages)  # kept: fractions are tabulated apart
    assert set(after["recipe"]) == {"segbook", "scratch"} and set(after["fraction"]) == {0.5, 1.0}
    for (records_after, notes_after), (records, notes) in zip(every_table(after), every_table(before)):
        assert records_after == records
        assert notes_after == [*notes, "1 run(s) on part of the train split are not in this table: see --table "
                                       "fractions"]
    assert compare_pretrained(after).equals(compare_pretrained(before))


def test_chosen_recipes_side_by_side_never_averaged_together(recipe_store) -> None:
    df = collect_quietly(*recipe_store, recipes=["segbook", "llrd"])
    assert set(df["recipe"]) == {"segbook", "llrd", "scratch"} and set(df["seed"]) == {0}
    table = scale_table(df)
    assert table.columns[:4] == ["model", "init", "recipe", "params (M)"]
    assert [tuple(row[:3]) for row in table.rows] == [
        ("nnunet", "scratch", "scratch"), ("base", "scratch", "scratch"), ("base", "pretrained", "segbook"),
        ("base", "Delta(PT)", "segbook"), ("base", "pretrained", "llrd"), ("base", "Delta(PT)", "llrd"),
        ("large", "pretrained", "segbook"), ("large", "pretrained", "llrd")]
    default = scale_table(df, recipes=["segbook"])
    assert values(table, "base", "pretrained", "segbook") == values(default, "base", "pretrained")
    assert values(table, "base", "pretrained", "segbook")["average"] == (pytest.approx(75.8875), 4)
    assert values(table, "base", "pretrained", "llrd") == {
        "small": (pytest.approx(90.0), 1), "medium": (pytest.approx(80.0), 1), "large": (pytest.approx(70.0), 1),
        "average": (pytest.approx(80.0), 3)}  # not C's half-fraction segbook run
    assert values(table, "base", "Delta(PT)", "llrd") == {
        "small": (pytest.approx(15.0), 1), "medium": (pytest.approx(20.0), 1), "large": (pytest.approx(20.0), 1),
        "average": (pytest.approx(55.0 / 3), 3)}
    assert values(table, "base", "Delta(PT)", "segbook")["average"] == (pytest.approx(9.3875), 4)
    assert values(table, "large", "pretrained", "llrd")["small"] == (pytest.approx(85.0), 1)
    notes = "\n".join(table.notes)
    assert f"base pretrained llrd: {D}" in notes and "per recipe" in notes

    rows = {row[0]: dict(zip(dataset_table(df).columns, row)) for row in dataset_table(df).rows}
    assert (rows[A]["base pretrained llrd"].value, rows[A]["base llrd delta"].value) == (
        pytest.approx(90.0), pytest.approx(15.0))
    assert (rows[C]["base pretrained segbook"].value, rows[D]["base pretrained llrd"].text()) == (
        pytest.approx(65.0), "missing")
    assert rows[A]["base scratch"].value == pytest.approx(75.0)

    overall = compare_pretrained(df, "dice", "all").set_index("recipe")
    assert (overall.loc["llrd", "n"], overall.loc["llrd", "delta"]) == (3, pytest.approx(55.0 / 3))
    assert (overall.loc["segbook", "n"], overall.loc["segbook", "delta"]) == (4, pytest.approx(9.3875))


def test_requested_recipes_show_even_without_runs(recipe_store) -> None:
    df = collect_quietly(*recipe_store, recipes=["llrd"])
    assert set(df.loc[df["init"] == "pretrained", "recipe"]) == {"llrd"}
    table = scale_table(df, models=["base"], recipes=["llrd", "warmup"])
    assert [tuple(row[:3]) for row in table.rows] == [
        ("base", "scratch", "scratch"), ("base", "pretrained", "llrd"), ("base", "Delta(PT)", "llrd"),
        ("base", "pretrained", "warmup"), ("base", "Delta(PT)", "warmup")]
    assert all(cell.value is None for cell in cells(table, "base", "pretrained", "warmup").values())
    # a single recipe other than the default is named too: "base pretrained" would read as the paper's recipe
    assert dataset_table(df).columns[4:8] == ["nnunet scratch", "base scratch", "base pretrained llrd",
                                              "large pretrained llrd"]


def test_recipe_table_values_and_both_deltas(recipe_store) -> None:
    df = collect_quietly(*recipe_store, recipes=[ALL_RECIPES])
    table = recipe_table(df)
    assert table.columns == ["model", "init", "recipe", "small", "medium", "large", "average"]
    assert [tuple(row[:3]) for row in table.rows] == [
        ("base", "scratch", "scratch"), ("base", "pretrained", "segbook"), ("base", "Delta vs scratch", "segbook"),
        ("base", "pretrained", "heads-only"), ("base", "Delta vs scratch", "heads-only"),
        ("base", "Delta vs segbook", "heads-only"), ("base", "pretrained", "llrd"),
        ("base", "Delta vs scratch", "llrd"), ("base", "Delta vs segbook", "llrd"),
        ("large", "scratch", "scratch"), ("large", "pretrained", "segbook"), ("large", "Delta vs scratch", "segbook"),
        ("large", "pretrained", "llrd"), ("large", "Delta vs scratch", "llrd"), ("large", "Delta vs segbook", "llrd")]
    assert values(table, "base", "scratch") == {
        "small": (pytest.approx(78.0), 2), "medium": (pytest.approx(60.0), 1), "large": (pytest.approx(50.0), 1),
        "average": (pytest.approx(66.5), 4)}
    assert values(table, "base", "pretrained", "heads-only") == {
        "small": (pytest.approx(77.0), 2), "medium": (None, 0), "large": (pytest.approx(55.0), 1),
        "average": (pytest.approx(100 * 2.09 / 3), 3)}
    assert values(table, "base", "Delta vs scratch", "heads-only") == {  # A 0, D -0.02, C +0.05
        "small": (pytest.approx(-1.0), 2), "medium": (None, 0), "large": (pytest.approx(5.0), 1),
        "average": (pytest.approx(1.0), 3)}
    assert values(table, "base", "Delta vs segbook", "heads-only") == {  # A -0.125, D -0.0205, C -0.10
        "small": (pytest.approx(-7.275), 2), "medium": (None, 0), "large": (pytest.approx(-10.0), 1),
        "average": (pytest.approx(-100 * 0.2455 / 3), 3)}
    assert values(table, "base", "Delta vs segbook", "llrd") == {  # A +0.025, B +0.10, C +0.05
        "small": (pytest.approx(2.5), 1), "medium": (pytest.approx(10.0), 1), "large": (pytest.approx(5.0), 1),
        "average": (pytest.approx(17.5 / 3), 3)}
    assert values(table, "base", "Delta vs scratch", "segbook")["average"] == (pytest.approx(9.3875), 4)
    assert all(cell.value is None for cell in cells(table, "large", "Delta vs scratch", "llrd").values())
    assert values(table, "large", "Delta vs segbook", "llrd")["small"] == (pytest.approx(-5.0), 1)
    assert cells(table, "large", "scratch")["average"].text() == "missing"
    notes = "\n".join(table.notes)
    assert "Delta vs scratch: mean of (recipe - scratch" in notes and "Delta vs segbook: mean of" in notes
    assert f"large scratch: {A}, {B}, {C}, {D}" in notes and f"base pretrained heads-only: {B}" in notes

    without_default = recipe_table(df, recipes=["llrd"])
    assert not any(row[1] == "Delta vs segbook" for row in without_default.rows)
    assert "no Delta vs segbook rows: the segbook recipe is not shown (add it to --recipes)" in without_default.notes
    with pytest.raises(TableError, match="--init does not apply"):
        build_table(df, "recipes", inits=["scratch"])


def test_recipe_statistics_against_scratch_and_segbook(recipe_store) -> None:
    df = collect_quietly(*recipe_store, recipes=[ALL_RECIPES])
    stats = compare_recipes(df).set_index(["model", "recipe", "versus", "group"])
    llrd = stats.loc[("base", "llrd", "scratch", "average")]
    assert (llrd["n"], llrd["wins"], llrd["ties"], llrd["losses"]) == (3, 3, 0, 0)
    assert (llrd["baseline"], llrd["score"], llrd["delta"]) == (
        pytest.approx(100 * 1.85 / 3), pytest.approx(80.0), pytest.approx(55.0 / 3))
    assert llrd["p_value"] == pytest.approx(wilcoxon([0.15, 0.20, 0.20]).pvalue)
    heads = stats.loc[("base", "heads-only", "segbook", "average")]
    assert (heads["n"], heads["wins"], heads["losses"]) == (3, 0, 3)
    assert heads["p_value"] == pytest.approx(wilcoxon([-0.125, -0.10, -0.0205]).pvalue)
    table = recipe_table(df)
    labels = {"scratch": "Delta vs scratch", "segbook": "Delta vs segbook"}
    for (model, recipe, versus, group), row in stats.iterrows():  # the same pairs as the table's delta rows
        cell = cells(table, model, labels[versus], recipe)[group]
        assert (row["delta"], row["n"]) == (pytest.approx(cell.value), cell.count)
    assert ("base", "segbook", "segbook", "average") not in stats.index  # never against itself


def test_recipe_names_are_checked_against_the_known_recipes(tmp_path: Path) -> None:
    assert resolve_recipes(["segbook", "llrd", "scratch"]) == {"segbook": "pretrained", "llrd": "pretrained",
                                                               "scratch": "scratch"}
    with pytest.raises(RecipeError, match=r"unknown recipe\(s\) 'mine'; known: segbook, .* --recipe-file FILE"):
        resolve_recipes(["segbook", "mine"])
    assert resolve_recipes(["mine"], [write_recipe(tmp_path / "mine.yaml")]) == {"mine": "pretrained"}


def write_recipe(path: Path, name: str = "mine") -> Path:
    path.write_text(yaml.safe_dump({"name": name, "description": "a user's recipe", "source": "a test",
                                    "init": "pretrained", "optimizer": {"kind": "sgd", "lr": 1e-3}}))
    return path


def test_imported_results_are_the_papers_recipes(recipe_store, tmp_path: Path) -> None:
    paths, registry = recipe_store
    import_results(write_csv(tmp_path / "paper.csv", [["Task009", "huge", "pretrained", "0.96", ""],
                                                      ["Task009", "huge", "scratch", "0.90", ""]]), registry, paths)
    df = collect_quietly(paths, registry, recipes=["segbook", "llrd"])
    imported = df[df["source"] == "imported:paper"].set_index("init")
    assert (imported.loc["pretrained", "recipe"], imported.loc["scratch", "recipe"]) == ("segbook", "scratch")
    only_llrd = collect_quietly(paths, registry, recipes=["llrd"])
    assert list(only_llrd.loc[only_llrd["source"] == "imported:paper", "init"]) == ["scratch"]


def test_cli_recipes_option_and_table(recipe_store, registry_file: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    base = ["results", "--registry", str(registry_file), "--format", "json"]
    assert main(base) == 0
    captured = capsys.readouterr()
    assert "recipe" not in json.loads(captured.out)[0]
    assert "segbook: warning: ignored 7 result(s) of other recipes" in captured.err
    assert "1 run(s) on part of the train split are not in this table: see --table fractions" in captured.err

    assert main([*base, "--recipes", "segbook", "llrd"]) == 0
    spaced = json.loads(capsys.readouterr().out)
    assert main([*base, "--recipes", "segbook,llrd"]) == 0
    commas = json.loads(capsys.readouterr().out)
    assert spaced == commas
    llrd = next(r for r in commas if (r["model"], r["init"], r["recipe"]) == ("base", "pretrained", "llrd"))
    assert (llrd["average"], llrd["average n"], llrd["small missing"]) == (80.0, 3, D)

    assert main([*base, "--table", "recipes"]) == 0
    records = json.loads(capsys.readouterr().out)
    row = next(r for r in records if (r["model"], r["init"], r["recipe"]) == ("base", "Delta vs segbook", "llrd"))
    assert (row["medium"], row["average"], row["average n"]) == (10.0, round(17.5 / 3, 4), 3)
    assert main(["results", "--registry", str(registry_file), "--table", "recipes", "--metric", "nsd"]) == 0
    out = capsys.readouterr().out
    assert "NSD (%) by dataset scale per fine-tuning recipe" in out and "Delta vs segbook" in out

    assert main([*base, "--table", "recipes", "--stats", "--recipes", "segbook,heads-only"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert {(r["recipe"], r["versus"]) for r in stats} == {("segbook", "scratch"), ("heads-only", "scratch"),
                                                           ("heads-only", "segbook")}
    assert main([*base, "--stats", "--recipes", "segbook,llrd"]) == 0
    assert {r["recipe"] for r in json.loads(capsys.readouterr().out)} == {"segbook", "llrd"}

    assert main([*base, "--recipes", "segbook,nosuch"]) == 2
    assert "segbook: error: unknown recipe(s) 'nosuch'; known: segbook" in capsys.readouterr().err
    assert main([*base, "--recipes", "segbook,mine"]) == 2
    capsys.readouterr()
    mine = write_recipe(tmp_path / "mine.yaml")
    assert main([*base, "--recipes", "segbook,mine", "--recipe-file", str(mine), "--models", "base"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["init"], r["recipe"], r["average n"]) for r in rows if r["recipe"] == "mine"] == [
        ("pretrained", "mine", 0), ("Delta(PT)", "mine", 0)]  # known, requested, without runs: missing
    assert main([*base, "--table", "recipes", "--init", "scratch"]) == 2
    assert "--init does not apply" in capsys.readouterr().err


# --- import ----------------------------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[list[str]], header: tuple[str, ...] = ("task", "model", "init", "dice", "nsd")
              ) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_import_rejects_bad_rows_naming_each_and_stores_nothing(store, tmp_path: Path) -> None:
    paths, registry = store
    bad = write_csv(tmp_path / "published.csv", [
        ["Task009_Spleen", "large", "pretrained", "0.95", ""],  # row 2: fine
        ["NoSuchTask", "large", "pretrained", "0.9", ""],  # row 3
        ["Task009", "xl", "scratch", "0.9", ""],  # row 4
        ["Spleen", "nnunet", "pretrained", "0.9", ""],  # row 5
        ["Task009", "huge", "scratch", "83.1", ""],  # row 6: a percentage
        ["Task009", "base", "scratch", "n/a", "1.5"],  # row 7
        ["Task009_Spleen", "large", "pretrained", "0.91", ""],  # row 8: duplicate of row 2
        ["044", "base", "scratch", "0.9", ""],  # row 9: two datasets have paper number 044
    ])
    with pytest.raises(ResultsError) as error:
        import_results(bad, registry, paths)
    message = str(error.value)
    assert "nothing was imported" in message
    for expected in (f"{bad}, row 3: field 'task': no dataset matches 'NoSuchTask'",
                     f"{bad}, row 4: field 'model': 'xl' is not one of", f"{bad}, row 5: field 'init'",
                     f"{bad}, row 6: field 'dice': 83.1 is outside [0, 1] (scores are fractions",
                     f"{bad}, row 7: field 'dice': 'n/a' is not a number", f"{bad}, row 7: field 'nsd': 1.5",
                     f"{bad}, row 8: Task009_Spleen large pretrained is already given in row 2",
                     f"{bad}, row 9: field 'task': task '044' is ambiguous"):
        assert expected in message
    assert "row 2" not in message.replace("given in row 2", "")
    assert not (paths.home / "results" / "imported").exists()


def test_import_header_must_name_the_columns(store, tmp_path: Path) -> None:
    paths, registry = store
    bad = write_csv(tmp_path / "x.csv", [["Task009", "base", "0.9"]], header=("task", "model", "dice"))
    with pytest.raises(ResultsError, match="header must name the columns task, model, init, dice"):
        import_results(bad, registry, paths)


def test_imported_results_appear_beside_local_runs(store, tmp_path: Path) -> None:
    paths, registry = store
    good = write_csv(tmp_path / "Published numbers.csv", [
        ["task009", "LARGE", "pretrained", "0.95", "0.97"],
        ["Spleen", "large", "scratch", "0.93", ""],
        [A, "base", "scratch", "0.10", ""],  # local runs take precedence
        [B, "large", "scratch", "0.55", ""],  # a Structure&Lesion dataset: no per-label scores
    ], header=("Task", "Model", "Init", "Dice", "NSD"))
    stored = import_results(good, registry, paths)
    assert stored == paths.home / "results" / "imported" / "Published_numbers.csv"
    df = collect_results(paths, registry)
    rows = {row[0]: dict(zip(dataset_table(df).columns, row)) for row in dataset_table(df).rows}
    spleen, imported = rows["Task009_Spleen"], "[imported:Published_numbers]"
    assert spleen[f"large pretrained {imported}"].value == pytest.approx(95.0)
    assert spleen[f"large {imported} delta"].value == pytest.approx(2.0)  # imported minus imported
    assert spleen["source"] == "imported:Published_numbers"
    # kept apart from local runs: never averaged with them, never compared with them
    assert rows[A]["base scratch"].value == pytest.approx(75.0)
    assert rows[A][f"base scratch {imported}"].value == pytest.approx(10.0)
    assert rows[A]["source"] == "local, imported:Published_numbers"
    assert "no Delta(PT) for large pretrained: large scratch [imported:Published_numbers]: this store vs " \
           "imported:Published_numbers" in dataset_table(df).notes
    nsd = {row[0]: dict(zip(dataset_table(df, "nsd").columns, row)) for row in dataset_table(df, "nsd").rows}
    assert nsd[B][f"large scratch {imported}"].text() == "no NSD"  # imported without NSD
    split = modality_target_table(df)
    assert cells(split, "large", "scratch")["CT seen structure"].missing == (A, B)
    assert f"{B} (no per-label scores)" in "\n".join(split.notes)
    whole = modality_target_table(df, group_datasets=True)
    assert cells(whole, "large", "scratch")["CT structure&lesion"].value == pytest.approx(55.0)
    assert collect_results(paths, registry, imported=False)["source"].eq("local").all()


def test_one_number_per_configuration_across_imported_files(store, tmp_path: Path) -> None:
    paths, registry = store
    import_results(write_csv(tmp_path / "first.csv", [["Task009", "base", "scratch", "0.9", ""]]), registry, paths)
    import_results(write_csv(tmp_path / "first.csv", [["Task009", "base", "scratch", "0.8", ""]]), registry, paths)
    with pytest.raises(ResultsError, match="Task009_Spleen base scratch is in .*first.csv"):
        import_results(write_csv(tmp_path / "second.csv", [["Task009", "base", "scratch", "0.7", ""]]), registry,
                       paths)


# --- CLI -------------------------------------------------------------------------------------------------------


def test_cli_tables_formats_and_stats(store, registry_file: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["results", "--registry", str(registry_file), "--format", "json"]
    assert main(["results", "--registry", str(registry_file)]) == 0
    out = capsys.readouterr().out
    assert "Dice (%) by dataset scale" in out and "82.50 (n=2)" in out and "90.00 (n=1)*" in out
    assert "Delta(PT)" in out and f"large pretrained: {B}, {D}" in out

    assert main(["results", "--registry", str(registry_file), "--table", "region", "--format", "json"]) == 0
    captured = capsys.readouterr()
    records = json.loads(captured.out)
    assert records[0]["Vessel"] == 85.0 and records[0]["Vessel n"] == 1
    assert "Missing" in captured.err  # notes go to stderr, keeping stdout parseable

    assert main(["results", "--registry", str(registry_file), "--table", "datasets", "--format", "csv",
                 "--metric", "nsd"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("task,modality,target,scale,nnunet scratch,nnunet scratch folds")
    assert len(lines) == 5

    assert main(["results", "--registry", str(registry_file), "--stats", "--table", "modality-target"]) == 0
    out = capsys.readouterr().out
    assert "pretrained vs scratch" in out and "CT seen structure" in out and "Wilcoxon" in out

    assert main([*base, "--models", "large", "nnunet", "--init", "scratch"]) == 0
    spaced = json.loads(capsys.readouterr().out)
    assert main([*base, "--models", "large,nnunet", "--init", "scratch"]) == 0
    commas = json.loads(capsys.readouterr().out)
    assert spaced == commas and [(r["model"], r["init"]) for r in spaced] == [("nnunet", "scratch"),
                                                                              ("large", "scratch")]
    with pytest.raises(SystemExit):
        main([*base, "--models", "large,gigantic"])
    assert "unknown gigantic" in capsys.readouterr().err


def test_cli_import_then_table(store, registry_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = write_csv(tmp_path / "paper.csv", [["Task009", "huge", "pretrained", "0.96", ""]])
    assert main(["results", "--registry", str(registry_file), "--import", str(good)]) == 0
    assert "imported 1 result(s)" in capsys.readouterr().out
    assert main(["results", "--registry", str(registry_file), "--table", "datasets"]) == 0
    assert "imported:paper" in capsys.readouterr().out
    bad = write_csv(tmp_path / "bad.csv", [["Task009", "huge", "pretrained", "96", ""]])
    assert main(["results", "--registry", str(registry_file), "--import", str(bad)]) == 2
    assert f"{bad}, row 2: field 'dice': 96 is outside [0, 1]" in capsys.readouterr().err


def test_cli_on_an_empty_store(segbook_home: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["results", "--table", "modality-target"]) == 0
    assert "no datasets" in capsys.readouterr().out
    assert main(["results", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_each_backbone_is_collected_on_its_own_plans_and_tabulated_with_its_cost(store) -> None:
    paths, registry = store
    write_run(paths.results, registry, C, "resenc-l", "scratch", "all", (0.66,), plans="")
    write_run(paths.results, registry, C, "resenc-m", "scratch", "all", (0.50,), plans="nnUNetPlans")
    with pytest.warns(ResultsWarning, match="ignored 1 run\\(s\\) trained with plans 'nnUNetPlans'"):
        df = collect_results(paths, registry)  # resenc-m's run is not on its own plans
    assert set(df.loc[df["model"] == "resenc-l", "plans"]) == {"nnUNetResEncUNetLPlans"}
    assert "resenc-m" not in set(df["model"])
    table = scale_table(df)
    row = next(r for r in table.records("json") if r["model"] == "resenc-l")
    assert (row["init"], row["params (M)"], row["TMACs"]) == ("scratch", 102.4, 0.72)
    assert [r[0] for r in table.rows][-1] == "resenc-l"  # after the paper's configurations
