"""External validation (issue 25): which datasets validate which, label maps, evaluation on another dataset, the
external table."""

from __future__ import annotations

import json
from pathlib import Path

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
    assert all([s.name.casefold() for s in p.structures] == ["liver"] for p in liver)
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


def _map(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "map.yaml"
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
