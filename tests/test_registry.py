"""The dataset registry: completeness, the paper's figures, lookups, user files and the `tasks` command."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from segbook.cli.main import main
from segbook.errors import SegbookError
from segbook.registry import (
    TOTALSEG_V1_CLASSES,
    DatasetEntry,
    Registry,
    RegistryError,
    TaskLookupError,
    builtin_registry_path,
    load_registry,
)

ROOT = Path(__file__).resolve().parents[1]
DUPLICATED_NUMBERS = ("044", "051", "701", "702")

MY_DATASET = {
    "key": "Task950_MyLiver", "name": "MyLiver", "dataset_id": 950, "modality": "CT", "channels": ["CT"],
    "target": "Structure&Lesion", "cases": 60, "train_cases": 48, "test_cases": 12, "region": "Abdominal",
    "bone": False, "vessel": False,
    "labels": [{"index": 0, "name": "background", "kind": "background"},
               {"index": 1, "name": "Liver", "kind": "structure", "seen": True, "totalseg_classes": ["liver"]},
               {"index": 2, "name": "Liver tumour", "kind": "lesion"}],
}


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No user registry or nnU-Net folders of the machine running the tests."""
    monkeypatch.delenv("SEGBOOK_REGISTRY", raising=False)
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("SEGBOOK_HOME", str(tmp_path / "home"))


def write_registry(path: Path, *entries: dict) -> Path:
    path.write_text(yaml.safe_dump({"datasets": list(entries)}, sort_keys=False))
    return path


# --- completeness and the paper's figures ---------------------------------------------------------------------------

def test_all_87_datasets_load_in_the_papers_order(registry: Registry) -> None:
    assert len(registry) == 87
    numbers = [int(e.paper_task) for e in registry]
    assert numbers == sorted(numbers)
    assert registry.entries[0].key == "Task001_BrainTumour" and registry.entries[-1].key == "Task966_HaN-Seg"


def test_builtin_file_is_package_data_and_the_root_file() -> None:
    assert builtin_registry_path().resolve() == (ROOT / "dataset_registry.yaml").resolve()


def test_scale_counts_and_proportions_match_the_paper(registry: Registry) -> None:
    summary = registry.summary()
    assert summary.by_scale == {"small": 35, "medium": 37, "large": 15}
    assert {s: round(p, 2) for s, p in summary.scale_percent.items()} == {"small": 40.23, "medium": 42.53,
                                                                        "large": 17.24}


def test_modality_target_counts_match_the_paper(registry: Registry) -> None:
    grid = registry.summary().by_modality_target
    assert grid["CT"] == {"Lesion": 11, "Seen Structure": 17, "Unseen Structure": 9, "Structure&Lesion": 9}
    assert grid["MRI"] == {"Lesion": 12, "Seen Structure": 9, "Unseen Structure": 9, "Structure&Lesion": 7}
    assert grid["CT&PET"] == {"Lesion": 3, "Seen Structure": 0, "Unseen Structure": 0, "Structure&Lesion": 0}
    assert grid["Ultrasound"] == {"Lesion": 1, "Seen Structure": 0, "Unseen Structure": 0, "Structure&Lesion": 0}


def test_scale_is_derived_at_the_papers_thresholds() -> None:
    def scale(cases: int) -> str:
        return DatasetEntry.model_validate({**MY_DATASET, "cases": cases, "train_cases": cases - 1,
                                            "test_cases": 1}).scale

    assert [scale(n) for n in (99, 100, 399, 400)] == ["small", "medium", "medium", "large"]


def test_registry_keeps_the_papers_facts(registry: Registry, shared: Path) -> None:
    import csv

    with (shared / "segbook_datasets.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [e.key for e in registry] == [r["segbook_dataset"] for r in rows]
    for entry, row in zip(registry, rows):
        assert (entry.paper_task, entry.name, entry.modality, entry.target, entry.cases) == (
            row["paper_task"].removeprefix("Task"), row["paper_name"], row["modality"], row["target"],
            int(row["cases_paper"]))
        assert (entry.train_cases, entry.test_cases) == (int(row["train_cases"]), int(row["test_cases"]))
        assert len(entry.channels) == int(row["input_channels"])
        # The authors' plans, which `segbook plan` and `--plans paper` use.
        assert entry.reference_patch_size == json.loads(row["patch_size"])
        assert entry.reference_spacing == pytest.approx(json.loads(row["training_spacing"]), abs=1e-6)


# --- identity -------------------------------------------------------------------------------------------------------

def test_keys_ids_and_names_are_unique(registry: Registry) -> None:
    for values in ([e.key for e in registry], [e.dataset_id for e in registry], [e.nnunet_name for e in registry],
                   [e.name.casefold() for e in registry]):
        assert [v for v, n in Counter(values).items() if n > 1] == []


def test_unique_paper_numbers_are_kept_as_dataset_ids(registry: Registry) -> None:
    for entry in registry:
        if entry.paper_task not in DUPLICATED_NUMBERS:
            assert entry.dataset_id == int(entry.paper_task)


@pytest.mark.parametrize("number", DUPLICATED_NUMBERS)
def test_duplicated_numbers_get_distinct_explicit_ids(registry: Registry, number: str) -> None:
    pair = [e for e in registry if e.paper_task == number]
    assert len(pair) == 2
    assert len({e.dataset_id for e in pair}) == 2 and int(number) not in {e.dataset_id for e in pair}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    raw = {d["key"]: d for d in yaml.load(builtin_registry_path().read_text(), Loader=loader)["datasets"]}
    assert all(raw[e.key]["dataset_id"] == e.dataset_id for e in pair)


def test_totalsegmentator_classes_are_the_checkpoints_104() -> None:
    order = json.loads((ROOT / "stunet" / "data" / "totalsegmentator_v1_labels.json").read_text())
    assert set(order.values()) - {"background"} == TOTALSEG_V1_CLASSES and len(TOTALSEG_V1_CLASSES) == 104


# --- labels ---------------------------------------------------------------------------------------------------------

def test_labels_say_structure_or_lesion_and_seen(registry: Registry) -> None:
    liver = registry.get("Task003_Liver")
    assert [(label.name, label.kind, label.seen) for label in liver.labels] == [
        ("background", "background", None), ("Liver", "structure", True), ("Liver tumor", "lesion", None)]
    assert liver.labels[1].totalseg_classes == ["liver"]
    btcv = {label.name: label for label in registry.get("BTCV").labels}
    assert btcv["Left kidney"].totalseg_classes == ["kidney_left"] and btcv["Aorta"].seen
    hippocampus = registry.get("Hippocampus")
    assert {label.seen for label in hippocampus.foreground_labels} == {False}
    assert registry.get("LUNA16").labels[1].totalseg_classes == [
        "lung_lower_lobe_left", "lung_upper_lobe_left", "lung_lower_lobe_right", "lung_middle_lobe_right",
        "lung_upper_lobe_right"]
    assert registry.get("KiTS23").label_kind(2) == "lesion"


def test_every_dataset_is_valid_for_nnunet(registry: Registry) -> None:
    for entry in registry:
        assert list(entry.labels_json.values()) == list(range(len(entry.labels)))
        assert list(entry.channel_names_json) == [str(i) for i in range(len(entry.channels))]
        assert re.fullmatch(r"Dataset\d{3}_[A-Za-z0-9_-]+", entry.nnunet_name)


def test_derived_nnunet_values(registry: Registry) -> None:
    covid = registry.get("613")
    assert covid.nnunet_name == "Dataset613_COVID-19-20"
    assert covid.labels_json == {"background": 0, "COVID-19 lesion": 1}
    assert registry.get("autoPET").channel_names_json == {"0": "PET", "1": "CT"}
    assert registry.get("Task001").channel_names_json == {"0": "FLAIR", "1": "T1 weighted", "2": "T1Gd",
                                                          "3": "T2 weighted"}
    assert registry.get("KiTS23").nnunet_name == "Dataset046_KiTS23"


def test_corrected_label_names_are_recorded(registry: Registry) -> None:
    verse = registry.get("VerSe2020")
    assert [verse.labels[i].name for i in (8, 9, 16, 17, 28)] == [
        "Vertebrae T1", "Vertebrae T2", "Vertebrae T9", "Vertebrae T10", "Vertebrae T13"]
    assert any("renamed" in note for note in verse.notes)
    assert registry.get("Prostate").labels[2].name == "Prostate transition zone"


# --- lookups --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("query", ["613", "Task613", "task613", 613, "Task613_COVID-19-20", "task613_covid-19-20",
                                   "COVID-19-20", "covid-19-20", "covid_19_20", "Dataset613",
                                   "Dataset613_COVID-19-20"])
def test_lookup_forms_agree(registry: Registry, query: str | int) -> None:
    assert registry.get(query).key == "Task613_COVID-19-20"


@pytest.mark.parametrize(("query", "key"), [("45", "Task044_CrossMoDA23"), ("Dataset046", "Task044_KiTS23"),
                                            ("kits23", "Task044_KiTS23"), ("AMOS-CT", "Task051_AMOS_CT"),
                                            ("Task051_LAScarQS22_task2", "Task051_LAScarQS22_task2"),
                                            ("ISPY1-Tumor-SEG-Radiomics", "Task110_ISPY1-Tumor-SEG-Radiomics")])
def test_duplicated_datasets_can_each_be_named(registry: Registry, query: str, key: str) -> None:
    assert registry.get(query).key == key


@pytest.mark.parametrize("number", DUPLICATED_NUMBERS)
def test_ambiguous_number_lists_candidates_and_how_to_name_them(registry: Registry, number: str) -> None:
    with pytest.raises(TaskLookupError) as caught:
        registry.get(number)
    pair = [e for e in registry if e.paper_task == number]
    assert caught.value.candidates == pair
    for entry in pair:
        assert entry.key in str(caught.value) and f"Dataset{entry.dataset_id:03d}" in str(caught.value)
    with pytest.raises(TaskLookupError):
        registry.get(f"Task{number}")


def test_unknown_task_suggests_close_names(registry: Registry) -> None:
    with pytest.raises(TaskLookupError) as caught:
        registry.get("COVID19")
    assert [e.key for e in caught.value.suggestions][:1] == ["Task613_COVID-19-20"]
    assert "did you mean COVID-19-20" in str(caught.value)
    with pytest.raises(TaskLookupError) as caught:
        registry.get("brats")
    assert {"Task019_BraTS21", "Task899_BraTS2023_GLI"} <= {e.key for e in caught.value.suggestions}
    with pytest.raises(TaskLookupError, match="no dataset matches '999'"):
        registry.get("999")


def test_select_filters_case_insensitively(registry: Registry) -> None:
    assert len(registry.select(modality="mri", target="lesion")) == 12
    assert len(registry.select(modality="CT", target="seen")) == 17
    assert len(registry.select(modality="ct", target="unseen")) == 9
    assert len(registry.select(modality="MRI", target="structure&lesion")) == 7
    assert len(registry.select(modality="pet")) == 3 and len(registry.select(modality="ultrasound")) == 1
    assert len(registry.select(scale="SMALL")) == 35
    thoracic = registry.select(region="thoracic")
    assert thoracic and {e.region for e in thoracic} == {"Thoracic"}
    assert registry.select(region="head and neck") == registry.select(region="Head-and-Neck")
    with pytest.raises(SegbookError, match="unknown target 'tumour'"):
        registry.select(target="tumour")


# --- user registries ------------------------------------------------------------------------------------------------

def test_user_file_adds_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = write_registry(tmp_path / "mine.yaml", MY_DATASET)
    merged = load_registry([mine])
    assert len(merged) == 88 and merged.entries[-1].key == "Task950_MyLiver"
    assert merged.get("myliver").nnunet_name == "Dataset950_MyLiver" and merged.get("950").paper_task is None
    assert merged.sources["Task950_MyLiver"] == mine
    monkeypatch.setenv("SEGBOOK_REGISTRY", str(mine))
    assert load_registry().get("Dataset950").key == "Task950_MyLiver"
    assert len(load_registry([mine])) == 88  # the same file twice is the same entries, not a clash


def test_the_documented_example_is_a_working_registry(tmp_path: Path) -> None:
    docs = (ROOT / "docs" / "registry.md").read_text()
    example = re.search(r"```yaml\n(.*?)```", docs, re.S)[1]
    (tmp_path / "my_datasets.yaml").write_text(example)
    assert load_registry([tmp_path / "my_datasets.yaml"]).get("MyLiver").nnunet_name == "Dataset950_MyLiver"


def test_invalid_field_names_file_entry_and_field(tmp_path: Path) -> None:
    bad = dict(MY_DATASET, labels=[*MY_DATASET["labels"][:2], {"index": 2, "name": "Liver tumour", "kind": "tumour"}])
    path = write_registry(tmp_path / "bad.yaml", bad)
    with pytest.raises(RegistryError) as caught:
        load_registry([path])
    message = str(caught.value)
    assert str(path) in message and "'Task950_MyLiver'" in message and "'labels.2.kind'" in message
    assert "'tumour'" in message


@pytest.mark.parametrize(("change", "field", "words"), [
    ({"channels": ["T2"]}, "channels", "CT normalisation"),
    ({"dataset_id": 1000}, "dataset_id", "less than or equal to 999"),
    ({"test_cases": 30}, "test_cases", "train_cases + test_cases"),
    ({"colour": "red"}, "colour", "Extra inputs"),
    ({"labels": [MY_DATASET["labels"][0], MY_DATASET["labels"][2]]}, "labels", "0, 1, 2"),
    ({"labels": [*MY_DATASET["labels"][:2], {"index": 2, "name": "liver", "kind": "lesion"}]}, "labels", "unique"),
    ({"labels": [MY_DATASET["labels"][0], {"index": 1, "name": "Liver", "kind": "structure"}]}, "labels.1.seen",
     "seen: true or false"),
    ({"labels": [MY_DATASET["labels"][0], {"index": 1, "name": "Liver", "kind": "structure", "seen": True,
                                           "totalseg_classes": ["livr"]}]}, "labels.1.totalseg_classes", "liver"),
    ({"labels": [MY_DATASET["labels"][0], {"index": 1, "name": "Liver", "kind": "structure", "seen": True}]},
     "labels.1.totalseg_classes", "exactly when seen is true"),
])
def test_validation_errors_say_what_is_wrong(tmp_path: Path, change: dict, field: str, words: str) -> None:
    path = write_registry(tmp_path / "bad.yaml", {**MY_DATASET, **change})
    with pytest.raises(RegistryError, match=re.escape(f"field '{field}'")) as caught:
        load_registry([path])
    assert words in str(caught.value)


def test_entry_without_key_is_named_by_position(tmp_path: Path) -> None:
    keyless = {k: v for k, v in MY_DATASET.items() if k != "key"}
    path = write_registry(tmp_path / "bad.yaml", MY_DATASET, keyless)
    with pytest.raises(RegistryError, match=r"entry #2, field 'key': Field required"):
        load_registry([path])


def test_id_clash_names_both_files(tmp_path: Path) -> None:
    path = write_registry(tmp_path / "clash.yaml", dict(MY_DATASET, dataset_id=613))
    with pytest.raises(RegistryError) as caught:
        load_registry([path])
    message = str(caught.value)
    assert str(path) in message and str(builtin_registry_path()) in message
    assert "Task613_COVID-19-20" in message and "dataset id 613" in message


def test_key_clash_with_a_different_entry_is_an_error(tmp_path: Path) -> None:
    first = write_registry(tmp_path / "a.yaml", MY_DATASET)
    second = write_registry(tmp_path / "b.yaml", dict(MY_DATASET, cases=61))
    with pytest.raises(RegistryError, match="already defined differently") as caught:
        load_registry([first, second])
    assert str(first) in str(caught.value) and str(second) in str(caught.value)


def test_unreadable_files_are_registry_errors(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="cannot read"):
        load_registry([tmp_path / "missing.yaml"])
    (tmp_path / "broken.yaml").write_text("datasets: [\n")
    with pytest.raises(RegistryError, match="not valid YAML"):
        load_registry([tmp_path / "broken.yaml"])
    (tmp_path / "list.yaml").write_text("- key: x\n")
    with pytest.raises(RegistryError, match="one key, 'datasets'"):
        load_registry([tmp_path / "list.yaml"])


def pasted_registry(tmp_path: Path) -> tuple[Path, int]:
    """Two registry files pasted into one: `datasets:` twice; returns the file and the second key's line."""
    first = write_registry(tmp_path / "first.yaml", MY_DATASET).read_text()
    other = dict(MY_DATASET, key="Task951_Other", name="Other", dataset_id=951)
    second = write_registry(tmp_path / "second.yaml", other).read_text()
    pasted = tmp_path / "pasted.yaml"
    pasted.write_text(first + second)
    return pasted, len(first.splitlines()) + 1


def test_a_repeated_top_level_key_is_an_error_naming_both_lines(tmp_path: Path, segbook_home: Path) -> None:
    pasted, second_line = pasted_registry(tmp_path)
    with pytest.raises(RegistryError) as caught:
        load_registry([pasted])
    assert str(caught.value).startswith(f"{pasted}: key 'datasets' appears twice (lines 1 and {second_line})")


def test_a_repeated_key_inside_an_entry_is_an_error(tmp_path: Path, segbook_home: Path) -> None:
    lines = yaml.safe_dump({"datasets": [MY_DATASET]}, sort_keys=False).splitlines()
    name_line, labels_line = lines.index("  name: MyLiver") + 1, lines.index("  labels:") + 1
    lines.insert(labels_line - 1, "  name: MyOtherLiver")  # the entry would silently be named MyOtherLiver
    path = tmp_path / "nested.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RegistryError, match=re.escape(f"key 'name' appears twice (lines {name_line} and "
                                                      f"{labels_line})")):
        load_registry([path])


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path: Path, segbook_home: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("datasets:\n  - key: Task950_MyLiver\n    name: MyLiver\n\tcases: 60\n")
    with pytest.raises(RegistryError, match=re.escape(f"{path}: not valid YAML: line 4, column 1: ")) as caught:
        load_registry([path])
    assert "tab" in str(caught.value)
    path.write_bytes(b"datasets:\n  - key: Task950_My\xe9Liver\n")  # Latin-1, not UTF-8
    with pytest.raises(RegistryError, match=re.escape(f"{path}: not UTF-8 text")):
        load_registry([path])


def test_cli_reports_a_repeated_key_without_a_traceback(tmp_path: Path, segbook_home: Path) -> None:
    pasted, second_line = pasted_registry(tmp_path)
    result = subprocess.run([sys.executable, "-m", "segbook.cli.main", "tasks", "--registry", str(pasted)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"segbook: error: {pasted}: key 'datasets' appears twice (lines 1 and "
                                    f"{second_line})")
    assert "Traceback" not in result.stderr and not result.stdout


# --- the `tasks` command --------------------------------------------------------------------------------------------

def test_cli_lists_with_filters(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tasks", "--modality", "MRI", "--target", "lesion", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("key,paper_task,dataset_id") and len(lines) == 13
    assert main(["tasks", "--scale", "large", "--format", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert len(listed) == 15 and {d["scale"] for d in listed} == {"large"}
    assert main(["tasks"]) == 0
    assert "87 dataset(s)" in capsys.readouterr().out


def test_cli_show_says_where_the_data_is(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["tasks", "show", "covid-19-20"]) == 0
    out = capsys.readouterr().out
    assert "Dataset613_COVID-19-20" in out and "(absent)" in out and "COVID-19 lesion" in out
    folder = tmp_path / "home" / "nnUNet_raw" / "Dataset613_COVID-19-20"
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text("{}")
    assert main(["tasks", "show", "613", "--format", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["raw_status"] == "present" and shown["raw_folder"] == str(folder)


def test_cli_show_ambiguous_number_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tasks", "show", "044"]) == 2
    err = capsys.readouterr().err
    assert "ambiguous" in err and "Task044_CrossMoDA23" in err and "Task044_KiTS23" in err


def test_cli_summary_reproduces_the_papers_figures(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tasks", "summary"]) == 0
    out = capsys.readouterr().out
    assert all(share in out for share in ("40.23%", "42.53%", "17.24%"))
    assert main(["tasks", "summary", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["by_scale"] == {"small": 35, "medium": 37, "large": 15}


def test_cli_registry_option_before_or_after_the_action(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    mine = str(write_registry(tmp_path / "mine.yaml", MY_DATASET))
    assert main(["tasks", "--registry", mine, "show", "MyLiver"]) == 0
    assert main(["tasks", "show", "950", "--registry", mine]) == 0
    assert capsys.readouterr().out.count("nnU-Net dataset  Dataset950_MyLiver") == 2


def test_scale_thresholds_are_per_entry_and_validated(tmp_path):
    import yaml

    entry = {"key": "Task950_Toy", "name": "Toy", "dataset_id": 950, "modality": "CT", "channels": ["CT"],
             "target": "Seen Structure", "cases": 12, "train_cases": 10, "test_cases": 2, "region": "Other",
             "bone": False, "vessel": False,
             "labels": [{"index": 0, "name": "background", "kind": "background"},
                        {"index": 1, "name": "liver", "kind": "structure", "seen": True,
                         "totalseg_classes": ["liver"]}]}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump({"datasets": [entry]}))
    assert load_registry([path]).get("Task950_Toy").scale == "small"
    path.write_text(yaml.safe_dump({"datasets": [{**entry, "scale_thresholds": [10, 20]}]}))
    assert load_registry([path]).get("Task950_Toy").scale == "medium"
    path.write_text(yaml.safe_dump({"datasets": [{**entry, "scale_thresholds": [20, 10]}]}))
    with pytest.raises(RegistryError, match="scale_thresholds"):
        load_registry([path])
