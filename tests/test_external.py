"""External validation (issue 25): which datasets validate which, label maps, evaluation on another dataset, the
external table."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

from helpers import run_segbook
from results_helpers import dataset, label

from segbook.registry import load_registry
from segbook.structures import IncompatibleError, LabelMapError, pair, read_label_map, validation_pairs

#: Three tiny datasets: a CT with liver and both kidneys, an MRI with liver and one kidney label, a CT without any
#: of them; and a two-channel MRI.
PAIR_DATASETS = [
    dataset("Task911_OrgansCT", 911, "CT", "Seen Structure", 40, "Abdominal",
            [label(1, "Liver", "structure", True, ("liver",)),
             label(2, "Left kidney", "structure", True, ("kidney_left",)),
             label(3, "Right_kidney", "structure", True, ("kidney_right",)), label(4, "Tumour", "lesion")]),
    dataset("Task912_OrgansMR", 912, "MRI", "Seen Structure", 30, "Abdominal",
            [label(1, "kidney", "structure", True, ("kidney_left", "kidney_right")),
             label(2, "LIVER", "structure", True, ("liver",)), label(3, "Tumour", "lesion")]),
    dataset("Task913_BoneCT", 913, "CT", "Unseen Structure", 20, "Other", [label(1, "Ossicle", "structure", False)]),
    {**dataset("Task914_TwoMR", 914, "MRI", "Seen Structure", 20, "Abdominal",
               [label(1, "Liver", "structure", True, ("liver",))]), "channels": ["T1", "T2"]},
]


@pytest.fixture
def pair_registry(tmp_path: Path):
    path = tmp_path / "pairs.yaml"
    path.write_text(yaml.safe_dump({"datasets": PAIR_DATASETS}, sort_keys=False))
    registry = load_registry([path])
    return path, registry


def _only(registry, *keys):
    return [p for p in validation_pairs(registry) if p.trained.key in keys and p.tested.key in keys]


def test_pairs_match_structures_by_name_and_keep_lesions_apart(pair_registry) -> None:
    _, registry = pair_registry
    pairs = {(p.trained.key, p.tested.key): p for p in _only(registry, "Task911_OrgansCT", "Task912_OrgansMR",
                                                             "Task913_BoneCT", "Task914_TwoMR")}
    assert set(pairs) == {("Task911_OrgansCT", "Task912_OrgansMR"), ("Task912_OrgansMR", "Task911_OrgansCT"),
                          ("Task911_OrgansCT", "Task914_TwoMR"), ("Task914_TwoMR", "Task911_OrgansCT"),
                          ("Task912_OrgansMR", "Task914_TwoMR"), ("Task914_TwoMR", "Task912_OrgansMR")}
    ct_to_mr = pairs[("Task911_OrgansCT", "Task912_OrgansMR")]
    # Liver matches LIVER (case); kidney is one label in the MRI, two in the CT: not matched without a map
    assert [(s.name, s.trained, s.tested) for s in ct_to_mr.structures] == [("Liver", (1,), (2,))]
    assert ct_to_mr.shift == "CT -> MRI" and ct_to_mr.usable
    assert pairs[("Task912_OrgansMR", "Task911_OrgansCT")].shift == "MRI -> CT"
    two_channels = pairs[("Task911_OrgansCT", "Task914_TwoMR")]
    assert not two_channels.usable and "input channels differ" in two_channels.problems[0]
    with pytest.raises(IncompatibleError, match="channels differ"):
        two_channels.require_usable()
    with pytest.raises(IncompatibleError, match="share no structure"):
        pair(registry.get("Task911_OrgansCT"), registry.get("Task913_BoneCT")).require_usable()


def test_pairs_on_the_real_registry_find_liver_across_ct_and_mri() -> None:
    registry = load_registry()
    liver = validation_pairs(registry, "liver")
    keys = {p.trained.key for p in liver}
    assert {"Task003_Liver", "Task011_BTCV", "Task052_AMOS_MR"} <= keys
    assert all("liver" in [s.name.casefold() for s in p.structures] for p in liver)
    assert any(len(p.structures) > 1 for p in liver)  # every structure they share is listed
    assert len(keys) == sum(1 for e in registry for lab in e.foreground_labels
                            if lab.kind == "structure" and lab.name.casefold() == "liver")
    shifts = {p.shift for p in liver if p.trained.key == "Task003_Liver"}
    assert {"same modality", "CT -> MRI"} <= shifts
    amos = next(p for p in validation_pairs(registry) if (p.trained.key, p.tested.key) ==
                ("Task051_AMOS_CT", "Task052_AMOS_MR"))
    names = [{lab.name.casefold() for lab in registry.get(key).foreground_labels if lab.kind == "structure"}
             for key in ("Task051_AMOS_CT", "Task052_AMOS_MR")]
    assert {s.name.casefold() for s in amos.structures} == names[0] & names[1] and amos.usable
    assert len(amos.structures) == 15  # AMOS labels its 15 organs in CT and MRI alike


def test_tasks_pairs_cli(pair_registry) -> None:
    path, _ = pair_registry
    out = run_segbook("tasks", "pairs", "--registry", str(path), "--structure", "liver", "--format", "json").stdout
    rows = [r for r in json.loads(out) if r["trained_on"].startswith("Task91")]
    row = next(r for r in rows if (r["trained_on"], r["tested_on"]) == ("Task911_OrgansCT", "Task912_OrgansMR"))
    assert row == {"trained_on": "Task911_OrgansCT", "tested_on": "Task912_OrgansMR", "shift": "CT -> MRI",
                   "shared": "Liver", "n_shared": 1, "trained_test_cases": 10, "tested_test_cases": 10,
                   "tested_cases": 30, "channels": "compatible"}
    assert {(r["tested_on"], r["channels"]) for r in rows if r["trained_on"] == "Task914_TwoMR"} >= {
        ("Task911_OrgansCT", "differ: T1, T2 vs CT")}
    bad = run_segbook("tasks", "pairs", "--registry", str(path), "--structure", "nonsuch", check=False)
    assert bad.returncode == 2 and "no registered dataset has a structure named 'nonsuch'" in bad.stderr


def _map(tmp_path: Path, text: str, name: str = "map.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_label_map_merges_kidneys_and_records_itself(pair_registry, tmp_path: Path) -> None:
    _, registry = pair_registry
    ct, mr = registry.get("Task911_OrgansCT"), registry.get("Task912_OrgansMR")
    label_map = read_label_map(_map(tmp_path, "structures:\n  Kidney: [left kidney, right kidney]\n"))
    pairing = pair(ct, mr, label_map)
    assert [(s.name, s.trained, s.tested, s.label) for s in pairing.structures] == [
        ("Liver", (1,), (2,), 1), ("Kidney", (2, 3), (1,), 2)]
    record = pairing.record()
    assert record["label_map"]["structures"] == {"Kidney": ["left kidney", "right kidney"]}
    assert len(record["label_map"]["sha256"]) == 64 and record["shift"] == "CT -> MRI"
    assert record["structures"][1]["trained_labels"] == {"2": "Left kidney", "3": "Right_kidney"}
    # the other direction: the MRI's kidney predicted, the CT's two kidneys merged as its reference
    back = pair(mr, ct, label_map)
    assert [(s.name, s.trained, s.tested) for s in back.structures] == [("Kidney", (1,), (2, 3)), ("LIVER", (2,), (1,))]


@pytest.mark.parametrize("text, message", [
    ("structures:\n  Kidney: [left kidney, spleen]\n", "no label 'spleen'"),
    ("structures:\n  Kidney: [left kidney, kidney]\n  Renal: [left kidney]\n", "mapped twice"),
    ("structures:\n  Kidney: [left kidney, kidney]\n  Liver: [kidney]\n", "mapped twice"),
    ("structures:\n  Kidney: [left kidney, right kidney]\n  kidney: [kidney]\n", "given twice"),
    ("structures:\n  Both: [left kidney, right kidney]\n", "no label of Task912_OrgansMR"),
    ("structures:\n  Mixed: [liver, tumour]\n", "ambiguous"),
    ("structures: [kidney]\n", "a mapping with one key, 'structures'"),
    ("structures:\n  Kidney: [left kidney\n", "map.yaml"),
])
def test_label_map_refusals(pair_registry, tmp_path: Path, text: str, message: str) -> None:
    _, registry = pair_registry
    with pytest.raises(LabelMapError, match=message):
        pair(registry.get("Task911_OrgansCT"), registry.get("Task912_OrgansMR"), read_label_map(_map(tmp_path, text)))


def test_a_channel_map_feeds_named_channels_in_the_runs_order(pair_registry) -> None:
    """A one-channel run on a two-channel dataset: --channels T2 (or its index) reads B's second channel, recorded;
    the case's image files are those of the mapped channels, in the run's order."""
    from segbook.evaluation.evaluate import TestCase
    from segbook.evaluation.external import mapped_channels

    _, registry = pair_registry
    mr, two = registry.get("Task912_OrgansMR"), registry.get("Task914_TwoMR")
    for channels in (["T2"], ["t2"], ["1"]):
        pairing = pair(mr, two, channels=channels)
        assert pairing.usable and pairing.channel_map == (1,)
        assert pairing.record()["channel_map"] == [{"trained": "T1", "tested_index": 1, "tested": "T2"}]
    assert "channel_map" not in pair(mr, registry.get("Task911_OrgansCT")).record()  # none given: none recorded
    case = TestCase("c", [Path("c_0000.nii.gz"), Path("c_0001.nii.gz")], Path("c.nii.gz"))
    assert mapped_channels([case], (1,))[0].images == [Path("c_0001.nii.gz")]
    assert mapped_channels([case], (1, 0))[0].images == [Path("c_0001.nii.gz"), Path("c_0000.nii.gz")]
    assert mapped_channels([case], None) == [case]


@pytest.mark.parametrize("channels, message", [
    (["T1", "T2"], "Task912_OrgansMR reads 1 channel(s) (T1)"),
    (["FLAIR"], "Task914_TwoMR has no channel 'FLAIR' (its channels: 0: T1, 1: T2)"),
    (["2"], "has no channel '2'"),
])
def test_channel_map_refusals(pair_registry, channels, message) -> None:
    from segbook.structures import ChannelMapError

    _, registry = pair_registry
    with pytest.raises(ChannelMapError, match=re.escape(message)):
        pair(registry.get("Task912_OrgansMR"), registry.get("Task914_TwoMR"), channels=channels)
    with pytest.raises(ChannelMapError, match="channel 1 \\(T2\\) of Task914_TwoMR is named twice"):
        pair(registry.get("Task914_TwoMR"), registry.get("Task914_TwoMR"), channels=["T2", "1"])


@pytest.mark.parametrize("extra, message", [
    (["--channels", "T2"], "go with --on TASK"),
    (["--on", "Task914_TwoMR", "--channels", "T1", "T2"], "reads 1 channel(s)"),
    (["--on", "Task914_TwoMR", "--channels", "PD"], "has no channel 'PD'"),
])
def test_evaluate_refuses_a_bad_channel_map_before_anything(pair_registry, segbook_home: Path, extra,
                                                            message) -> None:
    path, _ = pair_registry
    result = run_segbook("evaluate", "--registry", str(path), "--task", "Task912_OrgansMR", "--model", "base",
                         "--scratch", "--device", "cpu", *extra, check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not any(segbook_home.rglob("external"))


# --- evaluate --on: a tiny CT run scored on a tiny MRI dataset ----------------------------------------------------


@pytest.fixture(scope="module")
def external_runs(tmp_path_factory):
    """Two tiny runs (scratch, pretrained) trained on a synthetic CT task, scored on its own test split and on a
    synthetic MRI task that shares its organ and vessel (and has a lesion label, never matched by name); the
    internal tables are printed before and after the external evaluations."""
    from dataclasses import replace

    from helpers import planned_tiny_task, prepare_synthetic_task, tiny_spec

    from segbook.data.synth import TargetSpec

    from segbook.evaluation.evaluate import evaluate_run
    from segbook.evaluation.external import evaluate_external
    from segbook.training.finetune import finetune
    from segbook.training.settings import TrainingSettings

    root = tmp_path_factory.mktemp("external")
    with planned_tiny_task(root, tiny_spec(name="ExtCT"), dataset_id=993, seed=2) as task:
        (root / "mr").mkdir()
        # the MRI labels the vessel 1 and the organ 2: scored under the CT's ids (organ 1, vessel 2)
        targets = (TargetSpec("vessel", shape="tube", prototype=1), TargetSpec("organ", prototype=0),
                   TargetSpec("tumour", kind="lesion", within="organ"))
        mr_spec = replace(tiny_spec(name="ExtMR", modality="MRI", seed=7, cases=6), targets=targets)
        mr_file, mr = prepare_synthetic_task(root / "mr", mr_spec, dataset_id=994, plan=False)
        registries = ["--registry", str(task.registry_file), "--registry", str(mr_file)]
        settings = TrainingSettings(epochs=2, iterations_per_epoch=2, val_iterations_per_epoch=1, checkpoint_every=1)
        runs = {"scratch": finetune(task.entry, "tiny", pretrained=False, settings=settings, device="cpu"),
                "pretrained": finetune(task.entry, "tiny", pretrained=True, settings=settings,
                                       weights=task.weights, device="cpu")}
        for run in runs.values():
            evaluate_run(task.entry, run.spec, device="cpu")
        internal_before = run_segbook("results", *registries, "--table", "datasets", "--format", "csv").stdout
        cli = run_segbook("evaluate", *registries, "--task", task.entry.key, "--model", "tiny", "--scratch",
                          "--on", mr.key, "--device", "cpu", "--keep-predictions")
        external = {"scratch": runs["scratch"].folder / "evaluation" / "external" / mr.key,
                    "pretrained": evaluate_external(task.entry, runs["pretrained"].spec, mr, device="cpu",
                                                    keep_predictions=True).folder}
        internal_after = run_segbook("results", *registries, "--table", "datasets", "--format", "csv").stdout
        yield SimpleNamespace(task=task, ct=task.entry, mr=mr, mr_file=mr_file, registries=registries, runs=runs,
                              external=external, cli=cli.stdout, internal=(internal_before, internal_after))


def _dice(reference: np.ndarray, prediction: np.ndarray) -> float:
    both = np.logical_and(reference, prediction).sum()
    total = reference.sum() + prediction.sum()
    return float("nan") if total == 0 else 2.0 * both / total


@pytest.mark.slow
def test_external_scores_follow_from_the_files_by_hand(external_runs) -> None:
    """The scratch run's external Dice on one case and label, from its kept prediction and the MRI's label file with
    numpy; the summary's means from the rows; what it records of the pairing; the files' own checks pass."""
    import SimpleITK as sitk

    from segbook.evaluation.evaluate import test_cases
    from segbook.evaluation.files import check_external, read_json
    from segbook.paths import Paths
    from segbook.runs import FolderParts

    r = external_runs
    folder = r.external["scratch"]
    assert f"evaluated: {folder} (" in r.cli and "CT -> MRI" in r.cli
    summary = read_json(folder / "summary.json")
    record = summary["external"]
    assert (record["trained_on"], record["tested_on"], record["shift"], record["cases"]) == (
        r.ct.key, r.mr.key, "CT -> MRI", "test")
    assert [(s["name"], s["label"], s["tested_labels"]) for s in record["structures"]] == [
        ("organ", 1, {"2": "organ"}), ("vessel", 2, {"1": "vessel"})]
    cases = test_cases(r.mr, Paths.from_env())
    assert record["case_ids"] == [c.case for c in cases] and summary["num_cases"] == r.mr.test_cases
    assert set(summary["labels"]) == {"1", "2"}  # the lesion label is not scored
    metrics = pd.read_csv(folder / "metrics.csv")
    assert sorted(metrics["label"].unique()) == [1, 2] and len(metrics) == 2 * len(cases)
    case = cases[0]
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))
    prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "predictions" / case.label.name)))
    assert reference.shape == prediction.shape
    for index, tested in ((1, 2), (2, 1)):  # the CT's label, the MRI's
        row = metrics[(metrics["case"] == case.case) & (metrics["label"] == index)].iloc[0]
        by_hand = _dice(reference == tested, prediction == index)
        assert row["dice"] == pytest.approx(by_hand, abs=1e-9) or (np.isnan(row["dice"]) and np.isnan(by_hand))
        assert int(row["tp"]) == int(np.logical_and(reference == tested, prediction == index).sum())
        assert int(row["reference_voxels"]) == int((reference == tested).sum()) > 0
        mean = metrics.loc[metrics["label"] == index, "dice"].mean()
        assert summary["labels"][str(index)]["dice"] == pytest.approx(mean)
    parts = FolderParts.parse(r.runs["scratch"].folder)
    verdict, rows = check_external(folder, summary, r.ct, parts)
    assert verdict.problems == () and rows.cases == sorted(record["case_ids"])


@pytest.mark.slow
def test_external_scores_never_enter_the_internal_tables(external_runs) -> None:
    before, after = external_runs.internal
    assert before == after and "ExtCT" in before and "ExtMR" not in before


@pytest.mark.slow
def test_evaluate_on_refuses_before_predicting(external_runs, tmp_path: Path) -> None:
    r = external_runs
    other = tmp_path / "bone.yaml"
    other.write_text(yaml.safe_dump({"datasets": [
        dataset("Task995_BoneCT", 995, "CT", "Unseen Structure", 20, "Other",
                [label(1, "Ossicle", "structure", False)]),
        {**dataset("Task996_TwoMR", 996, "MRI", "Seen Structure", 20, "Abdominal",
                   [label(1, "organ", "structure", False)]), "channels": ["T1", "T2"]},
        dataset("Task997_OrganCT", 997, "CT", "Unseen Structure", 20, "Abdominal",
                [label(1, "organ", "structure", False)])]}, sort_keys=False))
    bad_map = _map(tmp_path, "structures:\n  organ: [organ, liver]\n")
    twice = _map(tmp_path, "structures:\n  organ: [organ]\n  blob: [organ, vessel]\n", "twice.yaml")
    base = ["evaluate", *r.registries, "--registry", str(other), "--task", r.ct.key, "--model", "tiny", "--scratch",
            "--device", "cpu"]
    root = r.runs["scratch"].folder / "evaluation" / "external"
    before = sorted(p.name for p in root.iterdir())
    for extra, message in [(["--on", "Task995_BoneCT"], "share no structure"),
                           (["--on", "Task996_TwoMR"], "input channels differ"),
                           (["--on", r.ct.key], "the dataset the run trained on"),
                           (["--on-all-cases", "--on", r.mr.key, "Task997_OrganCT"], "no test cases"),
                           (["--on", r.mr.key, "--label-map", str(bad_map)], "no label 'liver'"),
                           (["--on", r.mr.key, "--label-map", str(twice)], "mapped twice"),
                           (["--on-all-cases"], "go with --on TASK")]:
        result = run_segbook(*base, *extra, check=False)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, extra
    assert sorted(p.name for p in root.iterdir()) == before


@pytest.mark.slow
def test_a_killed_external_evaluation_leaves_nothing_read(external_runs) -> None:
    """kill -9 while predicting all of the MRI's cases: no `__all-cases` scores; the test-split scores beside them
    untouched; the next evaluation repairs and completes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from segbook.evaluation.files import file_sha256

    r = external_runs
    root = r.runs["scratch"].folder / "evaluation" / "external"
    kept = file_sha256(root / r.mr.key / "summary.json")
    command = [sys.executable, "-m", "segbook.cli.main", "evaluate", *r.registries, "--task", r.ct.key, "--model",
               "tiny", "--scratch", "--device", "cpu", "--on", r.mr.key, "--on-all-cases"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not any(p.name.startswith(".predicting-") and any(p.iterdir()) for p in root.iterdir() if p.is_dir()):
        assert process.poll() is None and time.monotonic() < deadline, "the evaluation ended before predicting"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (root / f"{r.mr.key}__all-cases").exists()
    assert file_sha256(root / r.mr.key / "summary.json") == kept
    table = run_segbook("results", *r.registries, "--table", "external", "--format", "csv").stdout
    assert "all" not in set(pd.read_csv(io.StringIO(table))["cases"])
    done = run_segbook(*command[3:])
    assert "evaluated" in done.stdout
    assert sorted(p.name for p in root.iterdir()) == [r.mr.key, f"{r.mr.key}__all-cases"]
    summary = json.loads((root / f"{r.mr.key}__all-cases" / "summary.json").read_text())
    assert summary["num_cases"] == r.mr.cases and summary["external"]["cases"] == "all"


# --- the external table on a hand-built store ----------------------------------------------------------------------

#: Per configuration: the external Dice of the MRI's liver on its cases (the CT run's label 1).
EXTERNAL_DICE = {"scratch": [0.50, 0.40, 0.62, 0.55, 0.30], "pretrained": [0.70, 0.52, 0.66, 0.71, 0.45]}


def _write_external(run: Path, trained, tested, dice: list[float]) -> Path:
    from store_helpers import EVALUATION_SETTINGS, label_row, sha256

    from segbook.evaluation.evaluate import _json_safe, summarise_rows
    from segbook.runs import external_folder

    pairing = pair(trained, tested)
    cases = [f"mr_{i:03d}" for i in range(len(dice))]
    rows = [label_row(case, 1, "Liver", value, min(1.0, value + 0.05), 4.0) for case, value in zip(cases, dice)]
    folder = external_folder(run, tested.key)
    folder.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(folder / "metrics.csv", index=False)
    summary = {"run": json.loads((run / "run.json").read_text())["run"], "settings": EVALUATION_SETTINGS,
               **summarise_rows(rows, pairing.scoring_entry(), len(cases)),
               "external": {**pairing.record(), "cases": "test", "case_ids": cases},
               "metrics_sha256": sha256(folder / "metrics.csv")}
    (folder / "summary.json").write_text(json.dumps(_json_safe(summary)))
    return folder


@pytest.fixture
def external_store(segbook_home: Path, pair_registry):
    from store_helpers import write_evaluated_run

    from segbook.paths import Paths

    path, registry = pair_registry
    ct, mr = registry.get("Task911_OrgansCT"), registry.get("Task912_OrgansMR")
    results = Paths.from_env().results
    runs = {init: write_evaluated_run(results, registry, ct.key, "base", init, mean, seed=seed)
            for init, mean, seed in (("scratch", 0.70, 1), ("pretrained", 0.85, 2))}
    folders = {init: _write_external(run, ct, mr, EXTERNAL_DICE[init]) for init, run in runs.items()}
    return SimpleNamespace(path=path, registry=registry, ct=ct, mr=mr, runs=runs, folders=folders)


def _table(store) -> pd.DataFrame:
    from segbook.results.collect import collect_results
    from segbook.results.tables import build_table

    df = collect_results(registry=store.registry)
    return pd.DataFrame(build_table(df, "external").records("csv")), df


def test_external_table_numbers_by_hand(external_store) -> None:
    from scipy.stats import mannwhitneyu, wilcoxon

    table, _ = _table(external_store)
    internal = {init: pd.read_csv(run / "evaluation" / "metrics.csv").query("label == 1").set_index("case")["dice"]
                for init, run in external_store.runs.items()}
    rows = {row["configuration"]: row for row in table.to_dict("records")}
    assert set(rows) == {"base scratch", "base pretrained"}
    for init in ("scratch", "pretrained"):
        row = rows[f"base {init}"]
        assert (row["shift"], row["target"], row["scale"], row["trained_on"], row["tested_on"], row["cases"]) == (
            "CT -> MRI", "Seen Structure", external_store.ct.scale, "Task911_OrgansCT", "Task912_OrgansMR", "test")
        assert row["internal"] == pytest.approx(100 * internal[init].mean(), abs=0.006)
        assert row["external"] == pytest.approx(100 * np.mean(EXTERNAL_DICE[init]), abs=0.006)
        assert row["gap"] == pytest.approx(row["internal"] - row["external"], abs=0.011)
        assert (row["n_internal"], row["n_external"]) == (6, 5)
    pretrained = rows["base pretrained"]
    inside = (internal["pretrained"] - internal["scratch"]).to_numpy()
    outside = np.subtract(EXTERNAL_DICE["pretrained"], EXTERNAL_DICE["scratch"])
    assert pretrained["delta_internal"] == pytest.approx(100 * inside.mean(), abs=0.006)
    assert pretrained["delta_external"] == pytest.approx(100 * outside.mean(), abs=0.006)
    assert pretrained["p_internal"] == pytest.approx(wilcoxon(inside).pvalue, rel=1e-2)
    assert pretrained["p_external"] == pytest.approx(wilcoxon(outside).pvalue, rel=1e-2)
    assert pretrained["narrows_by"] == pytest.approx(100 * (outside.mean() - inside.mean()), abs=0.006)
    assert pretrained["p_narrows"] == pytest.approx(mannwhitneyu(outside, inside).pvalue, rel=1e-2)
    assert pretrained["narrows"] == ("yes" if outside.mean() > inside.mean() else "no")
    assert pd.isna(rows["base scratch"]["delta_internal"])


def test_external_rows_are_grouped_by_shift_then_target_then_scale() -> None:
    from segbook.results.external import COLUMNS, grouped

    rows = [("CT -> MRI", "Lesion", "small", "A"), ("same modality", "Unseen Structure", "large", "B"),
            ("CT -> MRI", "Seen Structure", "large", "C"), ("CT -> MRI", "Seen Structure", "small", "D"),
            ("MRI -> CT", "Lesion", "small", "E"), ("same modality", "Unseen Structure", "small", "F")]
    frame = pd.DataFrame([{"shift": shift, "target": target, "scale": scale, "trained_on": task, "tested_on": "X",
                           "cases": "test"} for shift, target, scale, task in rows], columns=COLUMNS)
    assert list(grouped(frame)["trained_on"]) == ["F", "B", "A", "D", "C", "E"]


def test_an_invalid_external_evaluation_is_left_out_and_internal_tables_ignore_them(external_store) -> None:
    from segbook.results.collect import ResultsWarning
    from segbook.results.tables import build_table

    table, df = _table(external_store)
    internal = build_table(df, "datasets").records("csv")
    metrics = external_store.folders["pretrained"] / "metrics.csv"
    metrics.write_text(metrics.read_text().replace("mr_001,1,Liver,0.52", "mr_001,1,Liver,0.99"))
    with pytest.warns(ResultsWarning, match="left out of the external table"):
        changed, df = _table(external_store)
    assert list(changed["configuration"]) == ["base scratch"]
    assert build_table(df, "datasets").records("csv") == internal


def test_the_report_has_an_external_section_with_its_figure(external_store, tmp_path: Path) -> None:
    from segbook.results.collect import collect_results
    from segbook.results.report import write_report

    df = collect_results(registry=external_store.registry)
    page = write_report(df, tmp_path / "report.html", figures=tmp_path / "figures").read_text()
    assert "internal vs external validation" in page and "Task912_OrgansMR" in page
    assert "<figure id='external'>" in page and (tmp_path / "figures" / "external.png").is_file()


@pytest.mark.slow
def test_external_evaluation_on_the_real_ct_with_a_label_map(external_runs, shared: Path, tmp_path: Path) -> None:
    """The synthetic CT run scored on the real TotalSegmentator example (cut into 2 cases, both labelled; one
    window per position, no mirroring: the real volume at the run's spacing is many windows on a CPU): its organ
    counts as the liver and its vessel as the aorta by a label map, recorded; Dice by hand on a case."""
    import SimpleITK as sitk
    from helpers import real_ct_cases, real_ct_entry

    from segbook.data.importer import import_dataset
    from segbook.data.layouts import PlainSource
    from segbook.data.synth import write_registry_file

    r = external_runs
    images, labels = real_ct_cases(shared, tmp_path / "abdomen", pieces=(1, 2))
    registry_file = write_registry_file(tmp_path / "real.yaml", real_ct_entry(shared, cases=2))
    real = load_registry([registry_file]).get("AbdomenExample")
    import_dataset(real, PlainSource(images, labels), progress=False)
    label_map = _map(tmp_path, "structures:\n  liver: [organ]\n  aorta: [vessel]\n")
    out = run_segbook("evaluate", *r.registries, "--registry", str(registry_file), "--task", r.ct.key, "--model",
                      "tiny", "--pretrained", "--device", "cpu", "--on", real.key, "--on-all-cases", "--label-map",
                      str(label_map), "--keep-predictions", "--no-mirroring", "--step-size", "1").stdout
    folder = r.runs["pretrained"].folder / "evaluation" / "external" / f"{real.key}__all-cases"
    assert f"evaluated: {folder} (2 {real.key}'s labelled cases, same modality)" in out
    summary = json.loads((folder / "summary.json").read_text())
    record = summary["external"]
    liver, aorta = (next(lab.index for lab in real.foreground_labels if lab.name == name)
                    for name in ("liver", "aorta"))
    assert [(s["name"], s["label"], s["matched_by"], s["tested_labels"]) for s in record["structures"]] == [
        ("liver", 1, "label map", {str(liver): "liver"}), ("aorta", 2, "label map", {str(aorta): "aorta"})]
    assert record["label_map"]["path"] == str(label_map) and record["shift"] == "same modality"
    assert record["case_ids"] == ["abdomen_00", "abdomen_01"] and summary["num_cases"] == 2
    metrics = pd.read_csv(folder / "metrics.csv")
    references = {file.name.removesuffix(".nii.gz"): sitk.GetArrayFromImage(sitk.ReadImage(str(file)))
                  for file in sorted(labels.iterdir())}
    case = max(references, key=lambda name: int((references[name] == liver).sum()))  # the most liver
    reference = references[case]
    assert (reference == liver).sum() > 1000  # real anatomy to score
    prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "predictions" / f"{case}.nii.gz")))
    assert reference.shape == prediction.shape
    for scored, tested in ((1, liver), (2, aorta)):
        row = metrics[(metrics["case"] == case) & (metrics["label"] == scored)].iloc[0]
        assert int(row["reference_voxels"]) == int((reference == tested).sum())
        assert int(row["tp"]) == int(np.logical_and(reference == tested, prediction == scored).sum())
        by_hand = _dice(reference == tested, prediction == scored)
        assert row["dice"] == pytest.approx(by_hand, abs=1e-9) or (np.isnan(row["dice"]) and np.isnan(by_hand))


def test_external_scores_travel_in_bundles_and_are_checked_on_import(external_store, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from results_helpers import home

    from segbook.evaluation.files import file_sha256
    from segbook.results.bundles import BundleError, export_bundle, import_bundle

    table, _ = _table(external_store)
    report = export_bundle(tmp_path / "lab-a", registry=external_store.registry)
    bundle = json.loads((report.folder / "bundle.json").read_text())
    carried = sorted(name for run in bundle["runs"] for name in run["files"] if "/external/" in name)
    assert carried == sorted(2 * ["evaluation/external/Task912_OrgansMR/metrics.csv",
                                  "evaluation/external/Task912_OrgansMR/summary.json"])
    # tampered consistently (the hash in bundle.json updated too): the checks of evaluation files refuse it
    tampered = tmp_path / "tampered"
    shutil.copytree(report.folder, tampered)
    run = next(r for r in bundle["runs"] if "pretrained" in r["folder"])
    metrics = tampered / "runs" / run["folder"] / "evaluation/external/Task912_OrgansMR/metrics.csv"
    metrics.write_text(metrics.read_text().replace("mr_001,1,Liver,0.52", "mr_001,1,Liver,0.99"))
    run["files"]["evaluation/external/Task912_OrgansMR/metrics.csv"] = file_sha256(metrics)
    (tampered / "bundle.json").write_text(json.dumps(bundle))
    home(tmp_path, monkeypatch, "our_home")
    with pytest.raises(BundleError, match="external/Task912_OrgansMR/metrics.csv"):
        import_bundle(tampered, external_store.registry)
    import_bundle(report.folder, external_store.registry)
    theirs, _ = _table(external_store)
    assert theirs.drop(columns=["configuration"]).equals(table.drop(columns=["configuration"]))


@pytest.mark.slow
def test_a_channel_map_scores_a_ct_run_on_a_ct_and_pet_task(external_runs, tmp_path: Path) -> None:
    """The CT run on a two-channel CT&PET task: refused without --channels; with --channels CT scored on the CT
    channel, the map recorded; the same map is up to date, another (the PET channel, by index) redoes it."""
    from helpers import prepare_synthetic_task, tiny_spec

    r = external_runs
    spec = tiny_spec(name="ExtPET", modality="CT&PET", channels=("CT", "PET"), seed=5, cases=4)
    pet_file, pet = prepare_synthetic_task(tmp_path, spec, dataset_id=998, plan=False)
    run = r.runs["pretrained"].folder
    base = ["evaluate", *r.registries, "--registry", str(pet_file), "--run", str(run), "--device", "cpu",
            "--on", pet.key]
    refused = run_segbook(*base, check=False)
    assert refused.returncode == 2 and "input channels differ" in refused.stderr
    folder = run / "evaluation" / "external" / pet.key
    assert not folder.exists()
    assert "evaluated: " in run_segbook(*base, "--channels", "CT").stdout
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["external"]["channel_map"] == [{"trained": "CT", "tested_index": 0, "tested": "CT"}]
    assert summary["external"]["shift"] == "CT -> CT&PET" and summary["num_cases"] == pet.test_cases
    assert "up to date: " in run_segbook(*base, "--channels", "ct").stdout
    assert "evaluated: " in run_segbook(*base, "--channels", "1").stdout
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["external"]["channel_map"] == [{"trained": "CT", "tested_index": 1, "tested": "PET"}]
