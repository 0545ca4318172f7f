"""`segbook plan`: nnU-Net fingerprint, planning and preprocessing end to end on CPU, for every source layout and
for a real CT; re-running is a no-op, a changed source invalidates what was preprocessed from it."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import SimpleITK as sitk
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

from helpers import (FINGERPRINT_SAMPLES, REFERENCE_PLANS, prepare_synthetic_task, real_ct_cases, real_ct_entry,
                     register_spec, tiny_spec)
from segbook.cli.main import main
from segbook.data import DatasetValidationError, PlainSource, import_dataset, read_split
from segbook.data.status import task_status
from segbook.data.synth import write_registry_file
from segbook.errors import SegbookError
from segbook.paths import Paths
from segbook.plan import PlanResult, load_plan, plan_states, plan_task, verify_preprocessed
from segbook.registry import load_registry

LAYOUT_SPECS = {
    "v1": tiny_spec("PlanV1"),
    "v2": tiny_spec("PlanV2"),
    "msd": tiny_spec("PlanMSD", "MRI", ("T1", "T2")),
    "plain": tiny_spec("PlanPlain", "MRI", ("T1", "T2")),
}


def preprocessed_cases(result: PlanResult) -> set[str]:
    return {p.name.removesuffix(".pkl") for p in result.data_folder.glob("*.pkl")}


def assert_consistent_plan(result: PlanResult, train: tuple[str, ...], channels: int, modality: str) -> None:
    assert result.plans_file.is_file() and preprocessed_cases(result) == set(train)
    assert result.training_cases == len(train)
    gt = result.plans_file.parent / "gt_segmentations"
    assert sorted(p.name for p in gt.iterdir()) == [f"{c}.nii.gz" for c in train]
    expected = "CTNormalization" if modality == "CT" else "ZScoreNormalization"
    assert result.normalization == [expected] * channels
    assert len(result.stunet_strides) == 5 and all(len(s) == 3 for s in result.stunet_strides)
    assert result.nnunet_strides[0] == [1, 1, 1]
    for axis, size in enumerate(result.patch_size):
        assert size % math.prod(s[axis] for s in result.stunet_strides) == 0


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUT_SPECS))
def test_every_layout_imports_and_plans_end_to_end(tmp_path: Path, segbook_home: Path, layout: str) -> None:
    spec = LAYOUT_SPECS[layout]
    registry_file, entry = prepare_synthetic_task(tmp_path, spec, dataset_id=960, layout=layout)
    paths = Paths.from_env()
    split = read_split(paths.raw / entry.nnunet_name)
    result = load_plan(entry)
    assert_consistent_plan(result, split.train, len(spec.channels), spec.modality)
    assert not set(split.test) & preprocessed_cases(result)  # held-out cases never reach training
    again = plan_task(entry, num_processes=1, progress=False)
    assert again.skipped and again.seconds < 2 and again.plans_file == result.plans_file
    assert task_status(entry, paths) == {"task": entry.key, "dataset": entry.nnunet_name, "raw": "yes",
                                         "validated": "yes", "split": "6/2", "planned": "default",
                                         "preprocessed": "yes"}


@pytest.mark.slow
def test_changed_source_invalidates_the_preprocessed_data(tmp_path: Path, segbook_home: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    registry_file, entry = prepare_synthetic_task(tmp_path, tiny_spec("Invalidate"), dataset_id=961)
    paths = Paths.from_env()
    source = tmp_path / "synthetic_source" / entry.nnunet_name
    folder = paths.preprocessed / entry.nnunet_name
    planned = load_plan(entry)

    import_dataset(entry, source, force=True, progress=False)  # same source again: the plan stays valid
    assert main(["plan", "--registry", str(registry_file), "--task", entry.key, "-np", "1"]) == 0
    assert "up to date, nothing to do" in capsys.readouterr().out

    (folder / "splits_final.json").write_text("[]")  # made by nnU-Net's trainer from the old cases
    label = next((source / "labelsTr").iterdir())
    image = sitk.ReadImage(str(label))
    array = sitk.GetArrayFromImage(image)
    array[:2] = 0  # an annotator's correction
    corrected = sitk.GetImageFromArray(array)
    corrected.CopyInformation(image)
    sitk.WriteImage(corrected, str(label), useCompression=True)
    import_dataset(entry, source, progress=False)
    assert plan_states(entry) == {"default": "stale"}
    assert task_status(entry, paths)["preprocessed"] == "stale"
    with pytest.raises(SegbookError, match="raw data changed since; run `segbook plan"):
        load_plan(entry)

    lines: list[str] = []
    rebuilt = plan_task(entry, num_processes=1, progress=False, log=lines.append,
                        fingerprint_samples=FINGERPRINT_SAMPLES)
    assert not rebuilt.skipped and rebuilt.raw_stamp != planned.raw_stamp
    assert "raw data changed" in lines[0] and not (folder / "splits_final.json").exists()
    assert plan_states(entry) == {"default": "preprocessed"}


@pytest.mark.slow
def test_resenc_preset_reuses_the_fingerprint(tmp_path: Path, segbook_home: Path) -> None:
    _, entry = prepare_synthetic_task(tmp_path, tiny_spec("ResEnc"), dataset_id=962)
    fingerprint = Paths.from_env().preprocessed / entry.nnunet_name / "dataset_fingerprint.json"
    before = fingerprint.stat().st_mtime_ns
    lines: list[str] = []
    result = plan_task(entry, num_processes=1, planner="resenc-m", progress=False, log=lines.append)
    assert result.plans_identifier == "nnUNetResEncUNetMPlans" and result.plans_file.is_file()
    assert fingerprint.stat().st_mtime_ns == before and not any("fingerprint" in line for line in lines)
    assert plan_states(entry) == {"default": "preprocessed", "resenc-m": "preprocessed"}
    plans = json.loads(result.plans_file.read_text())
    assert plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"].endswith("ResidualEncoderUNet")
    with pytest.raises(SegbookError, match="unknown planner 'resenc-s'"):
        plan_task(entry, planner="resenc-s")


@pytest.mark.slow
def test_paper_plans_have_the_authors_patch_and_spacing_and_are_preprocessed(
        tmp_path: Path, segbook_home: Path, capsys: pytest.CaptureFixture) -> None:
    """The v2 plan of a task differs from a given reference; `--plans paper` is nnU-Net's planning at the reference
    patch and spacing (topology derived by nnU-Net), preprocessed and checked like any other plans."""
    registry_file, entry = prepare_synthetic_task(tmp_path, tiny_spec("Paper"), dataset_id=968,
                                                  fields=REFERENCE_PLANS)
    default = load_plan(entry)
    assert (default.patch_size, default.spacing) == ([24, 40, 40], pytest.approx([2.5, 1.5, 1.5]))
    assert default.comparison["differs"] == ["patch_size", "spacing"]
    assert main(["plan", "--registry", str(registry_file), "--task", entry.key, "--plans", "paper", "-np", "1"]) == 0
    out = capsys.readouterr().out
    assert "SegbookPaperPlans" in out and "the same as the authors'" in out

    paper = load_plan(entry, planner="paper")
    assert (paper.plans_identifier, paper.patch_size, paper.spacing) == (
        "SegbookPaperPlans", [16, 32, 32], pytest.approx([3.0, 2.0, 2.0]))
    plans = json.loads(paper.plans_file.read_text())["configurations"]["3d_fullres"]
    _, strides, kernels, _, _ = get_pool_and_conv_props([3.0, 2.0, 2.0], [16, 32, 32], 4, 999999)
    assert plans["architecture"]["arch_kwargs"]["strides"] == [list(s) for s in strides]  # nnU-Net's topology
    assert plans["architecture"]["arch_kwargs"]["kernel_sizes"] == [list(k) for k in kernels]
    assert paper.comparison == {"plans": "SegbookPaperPlans", "differs": [],
                                "segbook": {"patch_size": [16, 32, 32], "spacing": [3.0, 2.0, 2.0],
                                            "stages": len(strides)},
                                "authors": {"patch_size": [16, 32, 32], "spacing": [3.0, 2.0, 2.0],
                                            "stages": len(strides)}}
    paths = Paths.from_env()
    cases = verify_preprocessed(entry.nnunet_name, paths, "SegbookPaperPlans", task=entry.key)
    assert cases.count == entry.train_cases and paper.data_folder.name == "SegbookPaperPlans_3d_fullres"
    record = json.loads((paths.preprocessed / entry.nnunet_name / "segbook_plan.json").read_text())
    assert record["plans"]["SegbookPaperPlans"]["comparison"] == paper.comparison
    assert record["plans"]["nnUNetPlans"]["comparison"] == default.comparison
    assert plan_states(entry) == {"default": "preprocessed", "paper": "preprocessed"}
    dataset = infer_dataset_class(str(paper.data_folder))(str(paper.data_folder))
    data, _, _, _ = dataset.load_case(dataset.identifiers[0])
    assert data.shape == (1, 20, 30, 30)  # 24 x 40 x 40 voxels at 2.5 x 1.5 x 1.5 mm, resampled to 3 x 2 x 2 mm

    zscore = plan_task(entry, planner="paper-zscore", num_processes=1, progress=False)
    assert zscore.normalization == ["ZScoreNormalization"] and default.normalization == ["CTNormalization"]
    assert zscore.patch_size == [16, 32, 32]
    assert main(["tasks", "show", "--registry", str(registry_file), entry.key, "--format", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)["plans_comparison"]
    assert set(shown) == {"default", "paper", "paper-zscore"} and shown["paper"] == paper.comparison


def test_paper_plans_need_the_authors_plans_in_the_registry(tmp_path: Path, segbook_home: Path) -> None:
    _, entry = prepare_synthetic_task(tmp_path, tiny_spec("NoReference"), dataset_id=969, plan=False)
    with pytest.raises(SegbookError, match="holds no reference_patch_size and reference_spacing .* no --plans paper"):
        plan_task(entry, planner="paper")
    assert not Paths.from_env().preprocessed.exists()


def test_plan_needs_an_imported_task(tmp_path: Path, segbook_home: Path) -> None:
    _, entry = register_spec(tmp_path, tiny_spec("NotImported"), 963)
    with pytest.raises(SegbookError, match="is not imported .* run `segbook data import --task Task963_NotImported"):
        plan_task(entry)


@pytest.mark.slow
def test_real_ct_imports_validates_and_preprocesses(tmp_path: Path, segbook_home: Path, shared: Path) -> None:
    """The TotalSegmentator example (real anatomy, real headers, 41 of 117 classes present), cut into 6 cases."""
    images, labels = real_ct_cases(shared, tmp_path / "abdomen")
    registry_file = write_registry_file(tmp_path / "registry.yaml", real_ct_entry(shared, cases=6))
    entry = load_registry([registry_file]).get("AbdomenExample")
    source = PlainSource(images, labels)

    report = import_dataset(entry, source, num_processes=2, progress=False)
    assert report.validation.ok and {p.kind for p in report.validation.warnings} <= {"absent-label", "empty-label"}
    assert report.written == {"copied": 12, "converted": 0}
    raw = Paths.from_env().raw / entry.nnunet_name
    header = sitk.ReadImage(str(next((raw / "imagesTr").iterdir())))
    assert header.GetDirection() == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)

    result = plan_task(entry, num_processes=1, progress=False, fingerprint_samples=FINGERPRINT_SAMPLES)
    assert_consistent_plan(result, report.split.train, 1, "CT")
    assert result.spacing == pytest.approx([3.0, 3.0, 3.0])
    plans = json.loads(result.plans_file.read_text())
    assert plans["foreground_intensity_properties_per_channel"]["0"]["max"] > 200  # Hounsfield units seen


def test_real_ct_with_a_shifted_label_is_refused(tmp_path: Path, segbook_home: Path, shared: Path) -> None:
    images, labels = real_ct_cases(shared, tmp_path / "abdomen", pieces=(1, 2))
    shifted = labels / "abdomen_01.nii.gz"
    label = sitk.ReadImage(str(shifted))
    label.SetOrigin([o + d for o, d in zip(label.GetOrigin(), (1.5, 0.0, 0.0))])
    sitk.WriteImage(label, str(shifted))
    registry_file = write_registry_file(tmp_path / "registry.yaml", real_ct_entry(shared, cases=2))
    entry = load_registry([registry_file]).get("AbdomenExample")
    with pytest.raises(DatasetValidationError, match=r"case abdomen_01: .*abdomen_01.nii.gz: label differs from "
                                                     r"channel 0 \(abdomen_01_0000.nii.gz\): origin \(179.456"):
        import_dataset(entry, PlainSource(images, labels), progress=False)
    assert not Paths.from_env().raw.exists()



def _staged_cases(preprocessed: Path, name: str) -> list[Path]:
    return list(preprocessed.glob(f".{name}.*.partial/{name}/nnUNetPlans_3d_fullres/*.b2nd"))


@pytest.mark.slow
def test_a_replan_killed_during_preprocessing_keeps_the_previous_data(tmp_path: Path, segbook_home: Path) -> None:
    registry_file, entry = prepare_synthetic_task(tmp_path, tiny_spec("Killed", cases=24), dataset_id=964)
    paths = Paths.from_env()
    before = verify_preprocessed(entry.nnunet_name, paths, task=entry.key)
    assert before.count == 19 and before.version

    command = [sys.executable, "-m", "segbook.cli.main", "plan", "--registry", str(registry_file), "--task",
               entry.key, "--force", "-np", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None and not _staged_cases(paths.preprocessed,
                                                                                  entry.nnunet_name):
        time.sleep(0.01)
    assert process.poll() is None, "planning finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert 0 < len(_staged_cases(paths.preprocessed, entry.nnunet_name)) < 19  # killed half-way through

    assert plan_states(entry) == {"default": "preprocessed"}
    assert verify_preprocessed(entry.nnunet_name, paths, task=entry.key) == before  # training sees the old data
    assert task_status(entry, paths)["preprocessed"] == "yes"
    assert not _staged_cases(paths.preprocessed, entry.nnunet_name)  # status repaired what the kill left
    again = plan_task(entry, num_processes=1, progress=False, force=True)
    after = verify_preprocessed(entry.nnunet_name, paths, task=entry.key)
    assert not again.skipped and after.count == 19 and after.ids_sha256 == before.ids_sha256
    assert after.version != before.version
    assert [p.name for p in paths.preprocessed.iterdir()] == [entry.nnunet_name]


@pytest.mark.slow
def test_a_kill_between_the_swap_s_two_renames_is_repaired(tmp_path: Path, segbook_home: Path) -> None:
    _, entry = prepare_synthetic_task(tmp_path, tiny_spec("Swap"), dataset_id=965)
    paths = Paths.from_env()
    folder = paths.preprocessed / entry.nnunet_name
    before = verify_preprocessed(entry.nnunet_name, paths)
    os.replace(folder, folder.with_name(f".{folder.name}.0123456789ab.old"))  # the old version, moved aside
    (folder.with_name(f".{folder.name}.ba9876543210.partial") / folder.name).mkdir(parents=True)
    assert plan_states(entry) == {}
    lines: list[str] = []
    result = plan_task(entry, num_processes=1, progress=False, log=lines.append)
    assert result.skipped and verify_preprocessed(entry.nnunet_name, paths) == before
    assert any("restored" in line for line in lines) and any("deleted the unfinished" in line for line in lines)
    assert [p.name for p in paths.preprocessed.iterdir()] == [entry.nnunet_name]


@pytest.mark.slow
def test_two_plans_of_one_dataset_at_once_take_turns(tmp_path: Path, segbook_home: Path) -> None:
    registry_file, entry = prepare_synthetic_task(tmp_path, tiny_spec("Turns"), dataset_id=967, plan=False)
    command = [sys.executable, "-m", "segbook.cli.main", "plan", "--registry", str(registry_file), "--task",
               entry.key, "--force", "-np", "1"]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = [process.communicate(timeout=600) for process in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert any("waiting for dataset" in err for _, err in outputs)
    cases = verify_preprocessed(entry.nnunet_name, Paths.from_env())
    assert cases.count == entry.train_cases and plan_states(entry) == {"default": "preprocessed"}
