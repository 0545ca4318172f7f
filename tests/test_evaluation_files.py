"""Evaluation files are untrusted input: a run folder's summary.json and metrics.csv edited as an attacker (or an
accident) would edit them never become a cell; the run is left out with a warning naming the file, and the tables
say which runs they left out and how many (case, label) pairs their means leave out. HD95 follows one empty-mask
convention (the worst case where one mask lacks the label), and summaries of older conventions are not averaged in
for it."""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from store_helpers import read_metrics, reevaluate, sha256, write_evaluated_run
from results_helpers import A, C, write_registry

from segbook.cli.main import main
from segbook.data.split import Split, write_split
from segbook.evaluation.evaluate import _write, summarise_rows
from segbook.evaluation.metrics import case_metrics
from segbook.paths import Paths
from segbook.registry import Registry, load_registry
from segbook.results import ResultsError, ResultsWarning, case_tests, collect_results, dataset_table, scale_table
from segbook.results.bundles import BUNDLE_FILE, BundleError, export_bundle, import_bundle
from segbook.results.collect import bundles_dir
from segbook.runs import RunSpec

SPLIT = "a" * 64


@pytest.fixture
def registry_file(tmp_path: Path) -> Path:
    return write_registry(tmp_path / "registry.yaml")


@pytest.fixture
def registry(registry_file: Path) -> Registry:
    return load_registry([registry_file])


@pytest.fixture
def store(segbook_home: Path, registry: Registry) -> Paths:
    """STU-Net-B scratch and pretrained on Task901 (two structures) and Task903 (a lesion label), 6 test cases."""
    paths = Paths.from_env()
    for seed, (task, init, dice) in enumerate([(A, "scratch", 0.70), (A, "pretrained", 0.80), (C, "scratch", 0.50),
                                               (C, "pretrained", 0.60)]):
        write_evaluated_run(paths.results, registry, task, "base", init, dice, split=SPLIT, seed=seed)
    return paths


def run_folder(paths: Paths, registry: Registry, task: str = A, init: str = "pretrained", fold: str = "all") -> Path:
    return RunSpec.of(registry.get(task), "base", init, fold).folder(paths.results)


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def edit_cells(folder: Path, change) -> None:
    """Change metrics.csv's cells as text, as someone with a spreadsheet would (`change` edits the table in place or
    returns a new one)."""
    file = folder / "evaluation" / "metrics.csv"
    table = pd.read_csv(file, dtype=str, keep_default_na=False)
    changed = change(table)
    (table if changed is None else changed).to_csv(file, index=False)


def collect_warnings(paths: Paths, registry: Registry) -> tuple[pd.DataFrame, str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = collect_results(paths, registry)
    return df, " | ".join(str(w.message) for w in caught if issubclass(w.category, ResultsWarning))


def row_of(df: pd.DataFrame, task: str = A, init: str = "pretrained") -> pd.Series:
    return df[(df["task"] == task) & (df["init"] == init) & (df["model"] == "base")].iloc[0]


# --- the cases -----------------------------------------------------------------------------------------


def test_a_summary_edited_to_dice_5_is_left_out_named_in_a_warning_and_in_the_notes(
        store: Paths, registry_file: Path, capsys: pytest.CaptureFixture) -> None:
    folder = run_folder(store, load_registry([registry_file]))
    edit_json(folder / "evaluation" / "summary.json", lambda s: s["labels"]["1"].update(dice=5.0))
    assert main(["results", "--registry", str(registry_file), "--table", "datasets"]) == 0
    printed = capsys.readouterr()
    assert "500.00" not in printed.out
    assert f"{folder / 'evaluation' / 'summary.json'}: label 1 dice 5.0 is not a valid dice" in printed.err
    assert "left out: 1 evaluated run(s) whose evaluation files failed segbook's checks" in printed.out
    assert str(folder) in printed.out
    row = next(line for line in printed.out.splitlines() if line.startswith(A))
    assert "invalid evaluation files" in row  # the cell says why it is empty
    assert main(["results", "--registry", str(registry_file)]) == 0  # the group tables say so too
    assert "left out: 1 evaluated run(s) whose evaluation files failed" in capsys.readouterr().out


@pytest.mark.parametrize("known_from", ["recorded split", "dataset's split file"])
def test_a_summary_covering_1_of_2_test_cases_is_left_out(known_from: str, segbook_home: Path,
                                                          registry: Registry) -> None:
    """The forger drops a case from metrics.csv and writes a summary that follows from what is left: only the test
    split (the size the summary records, or the dataset's split file with its very case ids) tells."""
    paths = Paths.from_env()
    split = Split(tuple(f"train_{i}" for i in range(4)), ("case_000", "case_001"), seed=0)
    folder = write_evaluated_run(paths.results, registry, A, "base", "pretrained", 0.8, split=split.sha256, cases=2)
    if known_from == "dataset's split file":
        raw = paths.raw / registry.get(A).nnunet_name
        raw.mkdir(parents=True)
        write_split(raw, split)
    one_case = [row for row in read_metrics(folder) if row["case"] == "case_000"]
    recorded = {"sha256": split.sha256, "n_test": 2 if known_from == "recorded split" else 1}
    reevaluate(folder, registry, A, one_case, split=recorded)
    df, messages = collect_warnings(paths, registry)
    assert not row_of(df)["evaluated"] and row_of(df)["status"] == "invalid evaluation files"
    expected = ("num_cases 1 is not the size of the test split it records (2)" if known_from == "recorded split"
                else "its 1 test case(s) are not the 2 of the dataset's test split")
    assert f"{folder / 'evaluation' / 'summary.json'}: {expected}" in messages


def test_a_bundle_row_with_dice_0_99_and_no_true_positive_is_refused(store: Paths, tmp_path: Path,
                                                                     registry: Registry,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The forger sets a row's Dice to 0.99 while its TP stays 0, and makes everything else agree with it: the
    summary's means and SHA-256 and bundle.json's hashes."""
    bundle = export_bundle(tmp_path / "lab", registry=registry, paths=store).folder
    record = json.loads((bundle / BUNDLE_FILE).read_text())
    run = next(r for r in record["runs"] if "base_pretrained" in r["folder"] and r["folder"].startswith("Dataset901"))
    folder = bundle / "runs" / run["folder"]
    rows = read_metrics(folder)
    tp = rows[0]["tp"]  # the voxels stay where they were: TP become FP and FN, the image keeps its size
    rows[0].update(tp=0, fp=rows[0]["fp"] + tp, fn=rows[0]["fn"] + tp, tn=rows[0]["tn"] - tp, dice=0.99)
    reevaluate(folder, registry, A, rows)
    run["files"] = {name: sha256(folder / name) for name in run["files"]}
    (bundle / BUNDLE_FILE).write_text(json.dumps(record))
    monkeypatch.setenv("SEGBOOK_HOME", str(tmp_path / "ours"))
    ours = Paths.from_env()
    with pytest.raises(BundleError, match=rf"{run['folder']}: evaluation/metrics.csv: line 2: dice 0.99 does not "
                                          r"follow from tp 0"):
        import_bundle(bundle, registry, ours)
    assert not bundles_dir(ours).exists()


def two_labels_three_cases() -> list[tuple[np.ndarray, np.ndarray]]:
    """(reference, prediction) of three cases of Task901's liver (1) and aorta (2): both found; the aorta missed;
    the aorta in neither (both empty)."""
    reference = np.zeros((20, 24, 16), dtype=np.uint8)
    reference[3:9, 4:12, 3:10] = 1
    reference[12:16, 14:20, 6:10] = 2
    found = np.roll(reference, 1, axis=0)
    missed = np.where(found == 2, 0, found).astype(np.uint8)
    no_aorta = np.where(reference == 2, 0, reference).astype(np.uint8)
    return [(reference, found), (reference, missed), (no_aorta, np.roll(no_aorta, 1, axis=0))]


def test_hd95_of_a_missed_structure_is_the_worst_case_and_tables_count_the_pairs_left_out(
        segbook_home: Path, registry: Registry) -> None:
    """Real metrics on real volumes, written by segbook's own writer: the missed aorta counts with the image
    diagonal, the aorta in neither mask is left out, and the table's notes say how many pairs that is."""
    paths, entry = Paths.from_env(), registry.get(A)
    spacing = (2.0, 0.8, 0.8)
    rows = [{"case": f"case_{i}", **row, "label_name": entry.labels[row["label"]].name}
            for i, (reference, prediction) in enumerate(two_labels_three_cases())
            for row in case_metrics(reference, prediction, [1, 2], spacing)]
    diagonal = math.hypot(19 * 2.0, 23 * 0.8, 15 * 0.8)
    aorta = [row["hd95"] for row in rows if row["label"] == 2]
    assert aorta[1] == pytest.approx(diagonal) and math.isnan(aorta[2]) and aorta[0] < diagonal
    spec = RunSpec.of(entry, "base", "pretrained")
    folder = spec.folder(paths.results)
    (folder / "evaluation").mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"run": {"model": "base", "init": "pretrained"},
                                                 "status": "finished"}))
    summary = {"run": {"task": A, "model": "base", "init": "pretrained", "fold": "all"},
               "settings": {"empty_dice": "nan", "metrics_version": 2}, **summarise_rows(rows, entry, 3),
               "training": {"complete": True}, "split": None}
    _write(folder / "evaluation", rows, summary)
    df = collect_results(paths, registry)
    assert row_of(df)["hd95"] == pytest.approx((np.mean([r["hd95"] for r in rows if r["label"] == 1])
                                                + (aorta[0] + diagonal) / 2) / 2)
    table = dataset_table(df, "hd95")
    assert ("HD95: 1 of 6 (case, label) pairs of the 1 runs shown are left out of the means (reference and "
            "prediction both empty: the metric is undefined)") in table.notes
    assert any(note.startswith("Dice: 1 of 6 (case, label) pairs") for note in dataset_table(df).notes)


def test_a_summary_of_the_older_convention_counts_for_dice_but_not_for_hd95(store: Paths, registry: Registry) -> None:
    folder = run_folder(store, registry)
    edit_json(folder / "evaluation" / "summary.json", lambda s: s["settings"].pop("metrics_version"))
    df = collect_results(store, registry)
    assert row_of(df)["evaluated"] and row_of(df)["dice"] == pytest.approx(0.8, abs=0.05)
    assert math.isnan(row_of(df)["hd95"])
    rows = {row[0]: dict(zip(dataset_table(df, "hd95").columns, row)) for row in dataset_table(df, "hd95").rows}
    assert rows[A]["base pretrained"].text() == ("not evaluated for hd95 under the current convention (run segbook "
                                                 "evaluate again)")
    assert rows[A]["base scratch"].value is not None
    assert rows[A]["base pretrained"].value is None and dataset_table(df).rows[0][5].value is not None
    with pytest.raises(ResultsError, match="metrics.csv: not evaluated for hd95 under the current convention"):
        case_tests(df, "hd95")


# --- more of the kind: every edit that would make a cell mean something else ------------------------------------


def drop_label_rows(folder: Path) -> None:
    edit_cells(folder, lambda t: t[t["label"] != "2"])


def duplicate_row(folder: Path) -> None:
    file = folder / "evaluation" / "metrics.csv"
    lines = file.read_text().splitlines()
    file.write_text("\n".join([*lines, lines[1]]) + "\n")


def swap_cases(folder: Path) -> None:
    """Two cases' Dice swapped: every mean stays, the per-case tests change."""
    def change(table: pd.DataFrame) -> None:
        first, second = table.index[table["label"] == "1"][:2]
        columns = [c for c in table.columns if c not in ("case", "label", "label_name")]
        table.loc[[first, second], columns] = table.loc[[second, first], columns].to_numpy()
    edit_cells(folder, change)


def hd95_empty_where_only_the_prediction_has_the_label(folder: Path) -> None:
    def change(table: pd.DataFrame) -> None:
        size = sum(int(table.loc[0, k]) for k in ("tp", "fp", "fn", "tn"))
        table.loc[0, ["tp", "fp", "fn", "tn"]] = ["0", "50", "0", str(size - 50)]
        table.loc[0, ["reference_voxels", "prediction_voxels"]] = ["0", "50"]
        table.loc[0, ["dice", "iou", "precision", "recall", "nsd", "hd95"]] = ["0.0", "0.0", "0.0", "0.0", "0.0", ""]
    edit_cells(folder, change)


def set_cell(row: int, column: str, text: str):
    """An edit of one cell of metrics.csv (`row` counts data rows from 0: line row + 2)."""
    def change(table: pd.DataFrame) -> None:
        table.loc[row, column] = text
    return lambda folder: edit_cells(folder, change)


SUMMARY = "evaluation/summary.json"
METRICS = "evaluation/metrics.csv"
#: name -> (task, edit of the run folder, the file named, what the warning says)
ATTACKS = {
    "NaN in JSON": (A, lambda f: (f / SUMMARY).write_text((f / SUMMARY).read_text().replace(
        '"dice": 0.', '"dice": NaN, "x": 0.', 1)), SUMMARY, "label 1 dice nan is not a valid dice"),
    "a string for a number": (A, lambda f: edit_json(f / SUMMARY, lambda s: s["labels"]["2"].update(nsd="0.9")),
                              SUMMARY, "label 2 nsd '0.9' is not a valid nsd"),
    "a boolean for a count": (A, lambda f: edit_json(f / SUMMARY, lambda s: s.update(num_cases=True)), SUMMARY,
                              "num_cases True is not a positive integer"),
    "a negative distance": (A, lambda f: edit_json(f / SUMMARY, lambda s: s["labels"]["1"].update(hd95=-1.0)),
                            SUMMARY, "label 1 hd95 -1.0 is not a valid hd95"),
    "a label missing from the summary": (A, lambda f: edit_json(f / SUMMARY, lambda s: s["labels"].pop("2")),
                                         SUMMARY, "labels ['1'] are not the dataset's foreground labels ['1', '2']"),
    "a mean in range, not from the rows": (A, lambda f: edit_json(f / SUMMARY, lambda s: s["labels"]["1"].update(
        dice=0.95)), SUMMARY, "metrics.csv: label 1 dice: the rows' mean"),
    "a valid-case count": (A, lambda f: edit_json(f / SUMMARY, lambda s: s["labels"]["1"].update(valid_cases=5)),
                           SUMMARY, "label 1 valid_cases 5 is not the rows' 6 cases with a Dice"),
    "the run's score": (A, lambda f: edit_json(f / SUMMARY, lambda s: s["foreground_mean"].update(dice=0.99)),
                        SUMMARY, "foreground_mean dice 0.99 is not the mean of the labels'"),
    "lesion totals": (C, lambda f: edit_json(f / SUMMARY, lambda s: s["lesions"].update(lesions_detected=99)),
                      SUMMARY, "lesions lesions_detected 99 is not the rows'"),
    "the summary of another fold": (A, lambda f: edit_json(f / SUMMARY, lambda s: s["run"].update(fold="0")),
                                    SUMMARY, "scores base pretrained (recipe segbook), fold 0, not the run of its "
                                             "folder"),
    "a summary that says complete, run.json running": (
        A, lambda f: edit_json(f / "run.json", lambda m: m.update(status="running")), SUMMARY,
        "training.complete is true, but run.json says the run is 'running'"),
    "a huge summary": (A, lambda f: (f / SUMMARY).write_text((f / SUMMARY).read_text() + " " * (9 * 2**20)),
                       SUMMARY, "not a plain JSON file under 8 MiB"),
    "metrics.csv missing": (A, lambda f: (f / METRICS).unlink(), METRICS, "missing: without it"),
    "a label missing from metrics.csv": (A, drop_label_rows, METRICS,
                                         "6 rows; one per test case (6) and label (2) is required"),
    "a duplicated row": (A, duplicate_row, METRICS, "line 14: case case_000 label 1 is given twice"),
    "'nan' for a count": (A, set_cell(3, "tp", "nan"), METRICS, "line 5: tp is empty"),
    "inf for a distance": (A, set_cell(0, "hd95", "inf"), METRICS, "line 2: hd95 inf is out of range"),
    "text for a number": (A, set_cell(2, "dice", "high"), METRICS, "line 4: dice 'high' is not a number"),
    "a Dice the counts do not give": (A, set_cell(1, "dice", "0.97"), METRICS,
                                      "line 3: dice 0.97 does not follow from tp"),
    "reference voxels": (A, set_cell(0, "reference_voxels", "7"), METRICS, "line 2: reference_voxels 7 is not tp + fn"),
    "another image size": (A, set_cell(1, "tn", "5"), METRICS, "line 3: tp + fp + fn + tn is"),
    "HD95 left out where only the prediction has the label": (
        A, hd95_empty_where_only_the_prediction_has_the_label, METRICS, "line 2: hd95 is empty with tp 0, fp 50"),
    "metrics.csv changed after the summary": (A, swap_cases, METRICS, "its SHA-256 differs from summary.json's"),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_edited_evaluation_files_leave_their_run_out_with_a_warning_naming_the_file(
        attack: str, store: Paths, registry: Registry) -> None:
    task, change, file, message = ATTACKS[attack]
    folder = run_folder(store, registry, task)
    change(folder)
    df, messages = collect_warnings(store, registry)
    assert not row_of(df, task)["evaluated"] and row_of(df, task)["status"] != "evaluated"
    shown = str(folder / "evaluation" / "summary.json") if file == SUMMARY else str(folder / file)
    assert shown in messages and message in messages, messages
    assert row_of(df, task, "scratch")["evaluated"]  # the other runs are untouched
    assert any(note.startswith("left out: 1 evaluated run(s) whose") and str(folder) in note
               for note in scale_table(df).notes)


#: What evaluations wrote later: IoU, precision, recall, lesion counts (metrics.csv); the SHA-256 of metrics.csv,
#: per-metric case counts, the split, the settings (with the conventions' version) (summary.json).
NEWER_COLUMNS = ("iou", "precision", "recall", "lesions_reference", "lesions_detected", "lesions_false_positive")


def test_summaries_of_older_evaluations_are_read_with_the_checks_their_fields_allow(store: Paths,
                                                                                     registry: Registry) -> None:
    """A summary and metrics.csv as the first evaluations wrote them are still checked against each other."""
    folder = run_folder(store, registry, C)
    rows = pd.DataFrame([{k: v for k, v in row.items() if k not in NEWER_COLUMNS} for row in read_metrics(folder)])
    rows.to_csv(folder / "evaluation" / "metrics.csv", index=False)
    means = rows.groupby("label")[["dice", "nsd", "hd95"]].mean()
    labels = {str(index): {"name": "Tumour", **means.loc[index].to_dict(), "valid_cases": 6} for index in means.index}
    summary = {"run": {"task": C, "model": "base", "init": "pretrained", "fold": "all"}, "num_cases": 6,
               "labels": labels, "foreground_mean": means.mean().to_dict(), "training": {"complete": True}}
    (folder / "evaluation" / "summary.json").write_text(json.dumps(summary))
    df = collect_results(store, registry)
    assert row_of(df, C)["evaluated"] and row_of(df, C)["dice"] == pytest.approx(means["dice"].mean())
    assert set(row_of(df, C)["unevaluated"]) == {"iou", "precision", "recall", "hd95"}
    edit_json(folder / "evaluation" / "summary.json", lambda s: s["labels"]["1"].update(dice=0.1))
    with pytest.warns(ResultsWarning, match="label 1 dice: the rows' mean"):
        assert not row_of(collect_results(store, registry), C)["evaluated"]


# --- remembered verdicts ---------------------------------------------------------------------------------------


def test_verdicts_are_remembered_until_a_file_changes_even_with_its_size_and_time_restored(
        store: Paths, registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    from segbook.evaluation import files

    checked = []
    real = files.read_rows
    monkeypatch.setattr(files, "read_rows", lambda path, *args: checked.append(path) or real(path, *args))
    collect_results(store, registry)
    assert len(checked) == 4 and (store.home / "cache" / "evaluation_verdicts.json").is_file()
    checked.clear()
    assert row_of(collect_results(store, registry))["evaluated"] and checked == []

    metrics = run_folder(store, registry) / "evaluation" / "metrics.csv"
    before = metrics.stat()
    text = metrics.read_text()
    fields = text.splitlines()[1].split(",")
    dice = fields[3]  # 0.7..., 0.8...: the first decimal raised by one, the size kept
    fields[3] = f"{dice[:2]}{(int(dice[2]) + 1) % 10}{dice[3:]}"
    metrics.write_text(text.replace(text.splitlines()[1], ",".join(fields), 1))
    os.utime(metrics, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert metrics.stat().st_size == before.st_size and metrics.stat().st_mtime_ns == before.st_mtime_ns
    with pytest.warns(ResultsWarning, match="line 2: dice .* does not follow from tp"):
        assert not row_of(collect_results(store, registry))["evaluated"] and checked == [metrics]

    cache = store.home / "cache" / "evaluation_verdicts.json"
    remembered = json.loads(cache.read_text())
    for damage in ("{damaged", json.dumps({**remembered, "verdicts": {
            folder: [key, ["not", "a verdict"]] for folder, (key, _) in remembered["verdicts"].items()}})):
        cache.write_text(damage)
        checked.clear()
        with pytest.warns(ResultsWarning, match="line 2: dice .* does not follow from tp"):
            assert not row_of(collect_results(store, registry))["evaluated"] and len(checked) == 4  # rebuilt
        assert json.loads(cache.read_text())["verdicts"] == remembered["verdicts"]


def test_a_copied_store_is_checked_again(store: Paths, registry: Registry, tmp_path: Path) -> None:
    """Verdicts belong to files (their inode), not to names: a copy of a run folder is checked on its own."""
    collect_results(store, registry)
    copy = tmp_path / "copy"
    shutil.copytree(store.results, copy)
    edit_json(copy / run_folder(store, registry).relative_to(store.results) / "evaluation" / "summary.json",
              lambda s: s["labels"]["1"].update(dice=0.99))
    with pytest.warns(ResultsWarning, match=f"{copy}.*label 1 dice: the rows' mean"):
        df = collect_results(store, registry, results_dir=copy)
    assert not row_of(df)["evaluated"] and row_of(df, A, "scratch")["evaluated"]
