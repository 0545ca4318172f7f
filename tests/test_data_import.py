"""`segbook data`: source layouts, validation (every bad input named by case and file), atomic and repeatable
imports, SegBook's fixed test split, status and synthetic datasets. Planning is in test_plan.py."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import descendants, register_spec, source_of, tiny_spec, wait_until_gone
from segbook.cli.main import main
from segbook.data import (DatasetValidationError, PlainSource, SplitChangedError, SynthSpec, TargetSpec,
                          dataset_status, detect_layout, draw_split, import_dataset, read_source, read_split,
                          write_synthetic_dataset)
from segbook.data.split import held_out_count, resolve_split
from segbook.data.synth import SynthError, numbered_targets, synthesize_case, write_synthetic_task
from segbook.errors import SegbookError
from segbook.paths import Paths
from segbook.plan import raw_stamp
from segbook.registry import load_registry

BAD_ID = 970


def tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def raw_is_empty(paths: Paths) -> bool:
    """Nothing written: no dataset folder and no temporary leftovers."""
    return not paths.raw.exists() or not any(paths.raw.iterdir())


# --- the split --------------------------------------------------------------------------------------------------------

def test_split_is_deterministic_platform_independent_and_order_free() -> None:
    ids = [f"case_{i:03d}" for i in range(20)]
    split = draw_split(ids, 4, seed=0)
    # Golden value: SHA-256 ranks are the same on every platform and Python/numpy version.
    assert split.test == ("case_000", "case_011", "case_012", "case_016")
    assert len(split.train) == 16 and not set(split.train) & set(split.test)
    shuffled = ids[:]
    random.Random(1).shuffle(shuffled)
    assert draw_split(shuffled, 4, seed=0) == split
    assert draw_split(ids, 4, seed=1).test != split.test
    # A new case moves at most one case out of the test set (ranks of the others do not change).
    grown = draw_split(ids + ["case_999"], 4, seed=0)
    assert len(set(grown.test) - set(split.test)) <= 1


def test_held_out_count_follows_the_registry() -> None:
    assert held_out_count(131, 104, 27) == 27
    assert held_out_count(130, 104, 27) == 27  # the same ratio when the download has one case less
    assert held_out_count(10, 104, 27) == 2
    assert held_out_count(2, 1, 1) == 1
    with pytest.raises(SegbookError, match="at least 2"):
        held_out_count(1, 4, 1)


def test_stored_split_is_kept_and_changes_need_resplit() -> None:
    ids = [f"c{i}" for i in range(10)]
    stored = draw_split(ids, 2, seed=7)
    assert resolve_split(reversed(ids), 3, stored) == stored  # stable even if the registry's count changed
    with pytest.raises(SplitChangedError, match=r"1 added: c10; 1 removed: c0.*--resplit"):
        resolve_split(ids[1:] + ["c10"], 2, stored)
    with pytest.raises(SplitChangedError, match="seed 7, not 3"):
        resolve_split(ids, 2, stored, seed=3)
    assert resolve_split(ids, 2, stored, seed=3, resplit=True).seed == 3


# --- every layout -----------------------------------------------------------------------------------------------------

LAYOUT_CASES = {
    # layout: (spec, held-out cases written to imagesTs, with labelsTs)
    "v1": (tiny_spec("LayoutV1", size=(24, 24, 16), cases=6), 2, True),
    "v2": (tiny_spec("LayoutV2", size=(24, 24, 16), cases=6), 0, True),
    "msd": (tiny_spec("LayoutMSD", "MRI", ("T1", "T2"), size=(24, 24, 16), cases=6), 2, False),
    "plain": (tiny_spec("LayoutPlain", "MRI", ("T1", "T2"), size=(24, 24, 16), cases=6), 0, True),
}


@pytest.mark.parametrize("layout", list(LAYOUT_CASES))
def test_every_layout_imports_the_exact_voxels_with_the_split(tmp_path: Path, segbook_home: Path,
                                                              layout: str) -> None:
    spec, held_out, held_out_labels = LAYOUT_CASES[layout]
    written = write_synthetic_dataset(spec, tmp_path / "src", layout, dataset_id=971, held_out=held_out,
                                      held_out_labels=held_out_labels)
    if layout != "plain":
        assert detect_layout(written.path) == layout
    labelled = spec.cases - (0 if held_out_labels else held_out)
    _, entry = register_spec(tmp_path, replace(spec, cases=labelled), 971)
    report = import_dataset(entry, source_of(written), progress=False)

    folder = Paths.from_env().raw / entry.nnunet_name
    split = read_split(folder)
    assert report.split == split and len(split.train) + len(split.test) == labelled
    assert split.test == draw_split(spec.case_ids[:labelled], len(split.test)).test
    if not held_out_labels:
        assert [p.kind for p in report.validation.warnings] == ["unlabelled"]
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["channel_names"] == entry.channel_names_json and dataset["labels"] == entry.labels_json
    assert dataset["numTraining"] == len(split.train) and dataset["file_ending"] == ".nii.gz"
    for subset, ids in (("Tr", split.train), ("Ts", split.test)):
        assert sorted(p.name for p in (folder / f"labels{subset}").iterdir()) == [f"{c}.nii.gz" for c in ids]
        for case_id in ids:
            images, labels = synthesize_case(spec, spec.case_ids.index(case_id))
            label = sitk.ReadImage(str(folder / f"labels{subset}" / f"{case_id}.nii.gz"))
            assert np.array_equal(sitk.GetArrayFromImage(label), labels)
            assert label.GetSpacing() == pytest.approx(spec.spacing)
            for channel, expected in enumerate(images):
                image = sitk.ReadImage(str(folder / f"images{subset}" / f"{case_id}_{channel:04d}.nii.gz"))
                assert np.array_equal(sitk.GetArrayFromImage(image), expected)
                assert image.GetOrigin() == label.GetOrigin() and image.GetDirection() == label.GetDirection()


def test_plain_folders_with_one_folder_per_case(tmp_path: Path, segbook_home: Path) -> None:
    """BraTS-style: `{case}/{case}_{channel}.nii.gz` and `{case}/{case}_seg.nii.gz` in one tree."""
    spec = tiny_spec("PerCase", "MRI", ("FLAIR", "T1"), size=(20, 20, 12), cases=4)
    written = write_synthetic_dataset(spec, tmp_path / "src", "plain")
    tree = tmp_path / "tree"
    for case_id in spec.case_ids:
        (tree / case_id).mkdir(parents=True)
        for token in ("flair", "t1"):
            shutil.copy(written.images / f"{case_id}_{token}.nii.gz", tree / case_id / f"{case_id}_{token}.nii.gz")
        shutil.copy(written.labels / f"{case_id}.nii.gz", tree / case_id / f"{case_id}_seg.nii.gz")
    (tree / "README.txt").write_text("notes")
    _, entry = register_spec(tmp_path, spec, 972)
    source = PlainSource(tree, tree, "{case}/{case}_{channel}.nii.gz", "{case}/{case}_seg.nii.gz", ("flair", "t1"))
    report = import_dataset(entry, source, progress=False)
    assert len(report.split.train) + len(report.split.test) == 4
    assert [(p.kind, Path(p.file).name) for p in report.validation.warnings] == [("unmatched-file", "README.txt")]


def test_v1_dataset_json_without_optional_keys_and_other_formats(tmp_path: Path, segbook_home: Path) -> None:
    """Old task folders: dataset.json with only some keys, `.nii` files and float labels holding whole numbers."""
    spec = tiny_spec("OldV1", size=(20, 20, 12), cases=4)
    written = write_synthetic_dataset(spec, tmp_path / "src", "v1")
    (written.path / "dataset.json").write_text(json.dumps({"name": "OldV1", "modality": {"0": "CT"}}))
    first = spec.case_ids[0]
    image_path = written.path / "imagesTr" / f"{first}_0000.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(image_path)), str(image_path.with_name(f"{first}_0000.nii")))
    image_path.unlink()
    label_path = written.path / "labelsTr" / f"{first}.nii.gz"
    sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(label_path)), sitk.sitkFloat32), str(label_path))
    _, entry = register_spec(tmp_path, spec, 973)
    report = import_dataset(entry, written.path, progress=False)
    assert report.written == {"copied": 6, "converted": 2} and not report.validation.problems
    folder = Paths.from_env().raw / entry.nnunet_name
    label = next(folder.glob(f"labels*/{first}.nii.gz"))
    assert sitk.ReadImage(str(label)).GetPixelID() == sitk.sitkUInt8


# --- bad inputs: each has its own message, and nothing is written -----------------------------------------------------

BAD_SPEC = tiny_spec("Bad", "MRI", ("T1", "T2"), size=(20, 20, 12), cases=4)


@pytest.fixture(scope="module")
def bad_source_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_dataset(BAD_SPEC, tmp_path_factory.mktemp("bad"), "v2", dataset_id=BAD_ID).path


@pytest.fixture
def bad_source(tmp_path: Path, bad_source_template: Path) -> Path:
    return Path(shutil.copytree(bad_source_template, tmp_path / bad_source_template.name))


def _edit(path: Path, change) -> None:
    """Rewrite an image through `change(image) -> image`."""
    sitk.WriteImage(change(sitk.ReadImage(str(path))), str(path), useCompression=True)


def _set_voxels(path: Path, value: float, dtype=None) -> None:
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image).astype(dtype or sitk.GetArrayViewFromImage(image).dtype)
    array[2:4, 5:7, 5:7] = value
    changed = sitk.GetImageFromArray(array)
    changed.CopyInformation(image)
    sitk.WriteImage(changed, str(path), useCompression=True)


def _with(change):
    def apply(image):
        change(image)
        return image
    return apply


def _truncate(path: Path, size: int | None = None) -> None:
    path.write_bytes(path.read_bytes()[: size or path.stat().st_size // 2])


def _four_d(path: Path) -> None:
    """Replace a 3-D image by a 4-D one holding it twice (an MSD-style file where one volume belongs)."""
    image = sitk.ReadImage(str(path))
    sitk.WriteImage(sitk.JoinSeries([image, image]), str(path), useCompression=True)


IMG, IMG1, LAB = "imagesTr/bad_001_0000.nii.gz", "imagesTr/bad_001_0001.nii.gz", "labelsTr/bad_001.nii.gz"

BAD_INPUTS = {
    "truncated": (lambda s: _truncate(s / IMG), "unreadable", IMG, "truncated or corrupt"),
    "not an image": (lambda s: (s / LAB).write_bytes(b"not an image"), "unreadable", LAB,
                     'cannot read the header: Unable to determine ImageIO reader for "bad_001.nii.gz" (the file is '
                     "text, not an image; it begins 'not an image')"),
    "header cut short": (lambda s: _truncate(s / LAB, 60), "unreadable", LAB,
                         'cannot read the header: Unable to determine ImageIO reader for "bad_001.nii.gz" (its gzip '
                         "data breaks off or is damaged: the file is truncated or corrupt)"),
    "label spacing": (lambda s: _edit(s / LAB, _with(lambda i: i.SetSpacing((1.5, 1.5, 3.0)))),
                      "geometry", LAB, "label differs from channel 0 (bad_001_0000.nii.gz): spacing (1.5, 1.5, 3)"),
    "label origin": (lambda s: _edit(s / LAB, _with(lambda i: i.SetOrigin((0.0, 0.0, 0.0)))),
                     "geometry", LAB, "origin (0, 0, 0) vs"),
    "label direction": (lambda s: _edit(s / LAB, _with(lambda i: i.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1)))),
                        "geometry", LAB, "direction (-1, 0, 0"),
    "label shape": (lambda s: _edit(s / LAB, lambda i: i[:, :, :10]), "geometry", LAB, "shape (20, 20, 10) vs "
                                                                                       "(20, 20, 12)"),
    "channel spacing": (lambda s: _edit(s / IMG1, _with(lambda i: i.SetSpacing((1.6, 1.5, 2.5)))),
                        "geometry", IMG1, "channel 1 differs from channel 0"),
    "missing channel": (lambda s: (s / IMG1).unlink(), "channels", IMG, "missing channel(s) 1"),
    "extra channel": (lambda s: shutil.copy(s / IMG, s / "imagesTr/bad_001_0002.nii.gz"), "channels", IMG,
                      "unexpected channel(s) 2"),
    "2-D image": (lambda s: _edit(s / IMG, lambda i: i[:, :, 3]), "dimension", IMG, "2-D image"),
    "4-D image": (lambda s: _four_d(s / IMG), "dimension", IMG, "a 4-D image of size (20, 20, 12, 2); expected a 3-D"),
    "undeclared label": (lambda s: _set_voxels(s / LAB, 9), "label-values", LAB,
                         "values [9] are not declared (registry: 0=background, 1=organ, 2=vessel, 3=tumour)"),
    "non-integer label": (lambda s: _set_voxels(s / LAB, 0.5, np.float32), "non-integer-labels", LAB,
                          "voxels with fractional values, e.g. [0.5]"),
    "NaN intensities": (lambda s: _set_voxels(s / IMG, np.nan), "non-finite", IMG,
                        "8 NaN and 0 infinite voxels (first at x y z (5, 5, 2))"),
    "infinite intensities": (lambda s: _set_voxels(s / IMG1, np.inf), "non-finite", IMG1, "0 NaN and 8 infinite"),
    "duplicate file": (lambda s: sitk.WriteImage(sitk.ReadImage(str(s / LAB)), str(s / "labelsTr/bad_001.nii")),
                       "duplicate", "labelsTr/bad_001.nii", "several label files"),
    "duplicate case id": (lambda s: [shutil.copy(p, p.with_name(p.name.replace("bad_001", "BAD_001")))
                                     for p in s.glob("*/bad_001*")], "duplicate", None, "differ only in upper/lower"),
    "image without label": (lambda s: (s / LAB).unlink(), "missing-label", IMG, "no label file for this case"),
    "label without image": (lambda s: [(s / IMG).unlink(), (s / IMG1).unlink()], "missing-image", LAB,
                            "label has no image files"),
    "channels in dataset.json": (lambda s: (s / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "T1", "1": "T2", "2": "FLAIR"}, "labels": {}, "file_ending": ".nii.gz"})),
        "source-metadata", "dataset.json", "declares 3 channel(s) ['T1', 'T2', 'FLAIR'], the registry entry 2"),
}


@pytest.mark.parametrize("problem", list(BAD_INPUTS))
def test_bad_input_is_reported_by_case_and_file_and_nothing_is_written(tmp_path: Path, segbook_home: Path,
                                                                      bad_source: Path, problem: str) -> None:
    corrupt, kind, file, text = BAD_INPUTS[problem]
    corrupt(bad_source)
    _, entry = register_spec(tmp_path, BAD_SPEC, BAD_ID)
    with pytest.raises(DatasetValidationError) as caught:
        import_dataset(entry, bad_source, progress=False)
    errors = caught.value.report.errors
    assert kind in {p.kind for p in errors}, caught.value.report.format()
    mine = [p for p in errors if p.kind == kind]
    assert any(text in p.message for p in mine), [p.message for p in mine]
    if file is not None:
        assert any(p.file and p.file.endswith(file) for p in mine)
    if file and file.startswith(("images", "labels")):
        assert all(p.case == "bad_001" for p in mine)
    message = str(caught.value)
    assert "nothing was imported" in message and "fix:" in message
    assert raw_is_empty(Paths.from_env())


def _link(path: Path, target: str | Path) -> None:
    path.unlink(missing_ok=True)
    os.symlink(target, path)


BROKEN_LINKS = {
    # a case file that is a symbolic link leading to no file: (make it, the file, what the message says)
    "label links to itself": (lambda s: _link(s / LAB, "bad_001.nii.gz"), LAB, "symbolic link loop"),
    "image links in a loop of two": (lambda s: [_link(s / IMG, s / "partner"), _link(s / "partner", s / IMG)], IMG,
                                     "symbolic link loop"),
    "label links to a missing file": (lambda s: _link(s / LAB, "gone.nii.gz"), LAB,
                                      "symbolic link to gone.nii.gz, which cannot be followed: No such file"),
}


@pytest.mark.parametrize("problem", list(BROKEN_LINKS))
def test_a_broken_symbolic_link_is_reported_as_one(tmp_path: Path, segbook_home: Path, bad_source: Path,
                                                  problem: str) -> None:
    """Not as the case missing its label or image: the file is there by name, but leads nowhere."""
    make, file, text = BROKEN_LINKS[problem]
    make(bad_source)
    _, entry = register_spec(tmp_path, BAD_SPEC, BAD_ID)
    with pytest.raises(DatasetValidationError) as caught:
        import_dataset(entry, bad_source, progress=False)
    [found] = caught.value.report.errors
    assert (found.kind, found.case, found.file) == ("broken-link", "bad_001", str(bad_source / file))
    assert found.message.startswith(text), found.message
    assert raw_is_empty(Paths.from_env())


@pytest.mark.parametrize("layout", ["v2", "plain"])
def test_a_channel_the_registry_lacks_is_an_error_in_every_layout(tmp_path: Path, segbook_home: Path,
                                                                  layout: str) -> None:
    """Two channels (`_0000`, `_0001`) for a one-channel registry entry: refused, never imported with one dropped."""
    spec = tiny_spec("OneChannel", size=(16, 16, 8), cases=3)
    written = write_synthetic_dataset(spec, tmp_path / "src", layout, dataset_id=975)
    images = written.images if layout == "plain" else written.path / "imagesTr"
    for case_id in spec.case_ids:
        if layout == "plain":
            (images / f"{case_id}.nii.gz").rename(images / f"{case_id}_0000.nii.gz")
        shutil.copy(images / f"{case_id}_0000.nii.gz", images / f"{case_id}_0001.nii.gz")
    _, entry = register_spec(tmp_path, spec, 975)
    with pytest.raises(DatasetValidationError) as caught:
        import_dataset(entry, source_of(written), progress=False)
    report = caught.value.report
    assert [(p.kind, p.case, p.message) for p in report.errors] == [
        ("channels", case_id, "unexpected channel(s) 1; the registry declares 1") for case_id in spec.case_ids]
    assert not report.warnings
    assert raw_is_empty(Paths.from_env())


def test_msd_file_with_the_wrong_number_of_volumes(tmp_path: Path, segbook_home: Path) -> None:
    spec = tiny_spec("BadMSD", "MRI", ("T1", "T2"), size=(16, 16, 8), cases=3)
    written = write_synthetic_dataset(spec, tmp_path / "src", "msd")
    path = written.path / "imagesTr" / f"{spec.case_ids[1]}.nii.gz"
    volumes = [sitk.ReadImage(str(path))[:, :, :, i] for i in (0, 1, 1)]
    sitk.WriteImage(sitk.JoinSeries(volumes), str(path))
    _, entry = register_spec(tmp_path, spec, 974)
    with pytest.raises(DatasetValidationError, match=r"case badmsd_001: .*3 volume\(s\); the registry declares 2"):
        import_dataset(entry, written.path, progress=False)


def test_empty_label_maps_and_count_mismatches_are_warnings(tmp_path: Path, segbook_home: Path,
                                                            bad_source: Path) -> None:
    _edit(bad_source / LAB, lambda image: image * 0)
    _, entry = register_spec(tmp_path, replace(BAD_SPEC, cases=6), BAD_ID, test_cases=2)  # registry: 4 + 2
    report = import_dataset(entry, bad_source, progress=False)
    kinds = {(p.kind, p.case) for p in report.validation.warnings}
    assert kinds == {("empty-label", "bad_001"), ("case-count", None)}
    assert len(report.split.test) == 1  # 4 cases at the registry's ratio 2 of 6


def test_every_problem_is_reported_at_once_grouped_with_fixes(tmp_path: Path, segbook_home: Path,
                                                              bad_source: Path) -> None:
    _set_voxels(bad_source / "imagesTr/bad_000_0000.nii.gz", np.nan)
    _set_voxels(bad_source / "labelsTr/bad_002.nii.gz", 5)
    (bad_source / "labelsTr/bad_003.nii.gz").unlink()
    _, entry = register_spec(tmp_path, BAD_SPEC, BAD_ID)
    with pytest.raises(DatasetValidationError) as caught:
        import_dataset(entry, bad_source, num_processes=2, progress=False)
    report = caught.value.report
    assert sorted((p.kind, p.case) for p in report.errors) == [
        ("label-values", "bad_002"), ("missing-label", "bad_003"), ("non-finite", "bad_000")]
    text = report.format()
    assert text.index("ERROR: label values") < text.index("ERROR: images with NaN") < text.index("ERROR: images "
                                                                                                   "without a label")
    assert text.count("  fix: ") == 4  # and one for the warning: 3 labelled cases, the registry lists 4
    assert text.endswith("3 cases checked: 3 error(s), 1 warning(s) -> not imported")


# --- atomic, repeatable -----------------------------------------------------------------------------------------------

def test_import_is_repeatable_and_a_noop_when_unchanged(tmp_path: Path, segbook_home: Path,
                                                        bad_source: Path) -> None:
    _, entry = register_spec(tmp_path, BAD_SPEC, BAD_ID)
    paths = Paths.from_env()
    folder = paths.raw / entry.nnunet_name
    first = import_dataset(entry, bad_source, progress=False)
    digest, stamp = tree_digest(folder), raw_stamp(entry, paths)
    assert not first.skipped and first.written == {"copied": 12, "converted": 0}
    assert import_dataset(entry, bad_source, progress=False).skipped
    forced = import_dataset(entry, bad_source, force=True, num_processes=2, progress=False)
    assert not forced.skipped and tree_digest(folder) == digest and raw_stamp(entry, paths) == stamp
    # Another copy of the same data imports to the same bytes, and to the same split.
    copy = Path(shutil.copytree(bad_source, tmp_path / "copy"))
    import_dataset(entry, copy, progress=False)
    changed = tree_digest(folder)
    assert {k: v for k, v in changed.items() if k != "segbook_import.json"} == \
        {k: v for k, v in digest.items() if k != "segbook_import.json"}
    assert sorted(p.name for p in paths.raw.iterdir()) == [entry.nnunet_name]


def test_failed_or_interrupted_import_keeps_the_previous_dataset(tmp_path: Path, segbook_home: Path,
                                                                  bad_source: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import segbook.data.importer as importer

    _, entry = register_spec(tmp_path, BAD_SPEC, BAD_ID)
    paths = Paths.from_env()
    import_dataset(entry, bad_source, progress=False)
    before = tree_digest(paths.raw / entry.nnunet_name)

    backup = Path(shutil.copy(bad_source / IMG, tmp_path / "backup.nii.gz"))
    _set_voxels(bad_source / IMG, np.nan)
    with pytest.raises(DatasetValidationError):
        import_dataset(entry, bad_source, force=True, progress=False)
    assert tree_digest(paths.raw / entry.nnunet_name) == before
    shutil.copy(backup, bad_source / IMG)

    calls = []
    original = importer._place

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(importer, "_place", interrupted)
    with pytest.raises(KeyboardInterrupt):
        import_dataset(entry, bad_source, force=True, progress=False)
    assert tree_digest(paths.raw / entry.nnunet_name) == before
    assert sorted(p.name for p in paths.raw.iterdir()) == [entry.nnunet_name]


HOLD_CLAIM = """
import sys, time
from segbook.data.folders import dataset_claim
from segbook.paths import Paths
from segbook.registry import load_registry
entry = load_registry([sys.argv[1]]).get(sys.argv[2])
paths = Paths.from_env()
with dataset_claim(entry, paths):
    (paths.raw / f".{entry.nnunet_name}.live.partial").mkdir()  # what a running import is writing
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_killed_import_s_leftovers_are_repaired_by_the_next_status_never_under_a_live_one(
        tmp_path: Path, segbook_home: Path, capsys: pytest.CaptureFixture) -> None:
    spec = tiny_spec("KilledImport", cases=40)
    registry_file, entry = register_spec(tmp_path, spec, 968)
    source = write_synthetic_dataset(spec, tmp_path / "source", layout="v2", dataset_id=968).path
    paths = Paths.from_env()
    import_dataset(entry, source, progress=False)
    before = tree_digest(paths.raw / entry.nnunet_name)

    command = [sys.executable, "-m", "segbook.cli.main", "data", "import", "--registry", str(registry_file),
               "--task", entry.key, "--from", str(source), "--force", "-np", "1"]
    importing = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
    partial = lambda: list(paths.raw.glob(f".{entry.nnunet_name}.*.partial/imagesTr/*"))  # noqa: E731
    deadline = time.time() + 120
    while time.time() < deadline and importing.poll() is None and not partial():
        time.sleep(0.01)
    assert importing.poll() is None, "the import finished before it could be killed"
    os.killpg(importing.pid, signal.SIGKILL)
    importing.wait()
    assert partial() and tree_digest(paths.raw / entry.nnunet_name) == before
    capsys.readouterr()
    assert main(["data", "status", "--registry", str(registry_file)]) == 0
    assert f"repaired {entry.nnunet_name}" in capsys.readouterr().err
    assert sorted(p.name for p in paths.raw.iterdir()) == [entry.nnunet_name]
    assert tree_digest(paths.raw / entry.nnunet_name) == before

    live = paths.raw / f".{entry.nnunet_name}.live.partial"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_CLAIM, str(registry_file), entry.key],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["data", "status", "--registry", str(registry_file)]) == 0
        assert live.is_dir(), "status removed what a live process is writing"
    finally:
        holder.kill()
        holder.wait()
    assert main(["data", "status", "--registry", str(registry_file)]) == 0
    assert not live.exists() and tree_digest(paths.raw / entry.nnunet_name) == before


def test_a_killed_import_takes_its_worker_processes_along(tmp_path: Path, segbook_home: Path) -> None:
    """Issue 22: kill -9 of `segbook data import` alone (the out-of-memory killer, or `kill -9 PID`; not its process
    group): its spawned worker processes (about 145 MB each) end with it instead of waiting for work forever, and
    the next import takes over the dead one's claim and imports."""
    spec = tiny_spec("KilledPool", cases=40)
    registry_file, entry = register_spec(tmp_path, spec, 967)
    source = write_synthetic_dataset(spec, tmp_path / "source", layout="v2", dataset_id=967).path
    command = [sys.executable, "-m", "segbook.cli.main", "data", "import", "--registry", str(registry_file),
               "--task", entry.key, "--from", str(source), "-np", "2"]
    importing = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
    try:
        workers: list[int] = []
        deadline = time.monotonic() + 120
        while len(workers) < 2 and importing.poll() is None and time.monotonic() < deadline:
            workers = [pid for pid in descendants(importing.pid) if b"spawn_main" in _cmdline(pid)]
            time.sleep(0.05)
        assert len(workers) >= 2 and importing.poll() is None, "the import did not start its workers"
        below = descendants(importing.pid)  # the workers, and multiprocessing's resource tracker
        os.kill(importing.pid, signal.SIGKILL)
        importing.wait()
        assert not wait_until_gone(below, 10), "worker processes outlived the import killed outright"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(importing.pid, signal.SIGKILL)  # on failure: leave nothing behind
    assert main(["data", "import", "--registry", str(registry_file), "--task", entry.key, "--from", str(source),
                 "-np", "2"]) == 0
    assert sorted(p.name for p in Paths.from_env().raw.iterdir()) == [entry.nnunet_name]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_changed_cases_keep_the_split_until_resplit(tmp_path: Path, segbook_home: Path, bad_source: Path) -> None:
    _, entry = register_spec(tmp_path, BAD_SPEC, BAD_ID)
    paths = Paths.from_env()
    first = import_dataset(entry, bad_source, seed=3, progress=False)
    assert first.split.seed == 3
    for path in bad_source.glob("*/bad_003*"):
        path.unlink()
    with pytest.raises(SplitChangedError, match=r"0 added: none; 1 removed: bad_003.*--resplit"):
        import_dataset(entry, bad_source, progress=False)
    assert read_split(paths.raw / entry.nnunet_name) == first.split
    again = import_dataset(entry, bad_source, resplit=True, progress=False)
    assert again.split.seed == 0 and again.split.case_ids == {"bad_000", "bad_001", "bad_002"}


def test_a_folder_with_the_same_dataset_id_is_refused(tmp_path: Path, segbook_home: Path, bad_source: Path) -> None:
    _, entry = register_spec(tmp_path, BAD_SPEC, BAD_ID)
    other = Paths.from_env().preprocessed / f"Dataset{BAD_ID}_Other"
    other.mkdir(parents=True)
    with pytest.raises(SegbookError, match=f"Dataset{BAD_ID}_Other has dataset id {BAD_ID}"):
        import_dataset(entry, bad_source, progress=False)


def test_reading_sources_needs_no_image_reads(tmp_path: Path) -> None:
    spec = tiny_spec("Listing", size=(12, 12, 8), cases=3)
    written = write_synthetic_dataset(spec, tmp_path, "v1")
    (written.path / "imagesTr" / "._tiny_000_0000.nii.gz").write_bytes(b"macOS resource fork")
    (written.path / "imagesTr" / "notes.txt").write_text("")
    found = read_source(written.path, n_channels=1)
    assert found.layout == "v1" and [c.case_id for c in found.cases] == spec.case_ids
    assert [(p.kind, Path(p.file).name) for p in found.problems] == [("unmatched-file", "notes.txt")]
    with pytest.raises(SegbookError, match="no imagesTr folder"):
        read_source(tmp_path, n_channels=1)
    with pytest.raises(SegbookError, match="channel token"):
        read_source(PlainSource(written.path / "imagesTr", written.path / "labelsTr", "{case}_{channel}.nii.gz",
                                channel_tokens=("a", "b")), n_channels=1)


# --- given test splits: a file, or the source's own test set ---------------------------------------------------------

GIVEN_SPEC = tiny_spec("Given", size=(20, 20, 12), cases=6)  # cases given_000 ... given_005; registry: 5 train, 1 test
GIVEN_ID = 972


@pytest.fixture
def given_task(tmp_path: Path, segbook_home: Path):
    written = write_synthetic_dataset(GIVEN_SPEC, tmp_path / "src", "v2", dataset_id=GIVEN_ID)
    registry_file, entry = register_spec(tmp_path, GIVEN_SPEC, GIVEN_ID)
    return written.path, registry_file, entry


@pytest.mark.parametrize("name, content", [
    ("test.json", '["given_004"]'),
    ("split.json", '{"train": ["given_000", "given_001", "given_002", "given_003", "given_005"], '
                   '"test": ["given_004"]}'),
    ("test.csv", "case\ngiven_004\n"),
    ("split.csv", "case_id,subset\n" + "".join(f"given_00{i},{'test' if i == 4 else 'train'}\n" for i in range(6))),
])
def test_a_split_file_gives_the_test_set_and_its_sha256_is_kept(given_task, tmp_path: Path, name: str,
                                                                 content: str) -> None:
    source, _, entry = given_task
    split_file = tmp_path / name
    split_file.write_text(content)
    report = import_dataset(entry, source, split_file=split_file, progress=False)
    folder = Paths.from_env().raw / entry.nnunet_name
    split = read_split(folder)
    assert report.split == split and split.test == ("given_004",) and len(split.train) == 5
    assert (split.algorithm, split.seed, split.source) == ("user-file", None, str(split_file.resolve()))
    stored = json.loads((folder / "segbook_split.json").read_text())
    expected = hashlib.sha256(json.dumps({"test": ["given_004"], "train": sorted(split.train)},
                                         separators=(",", ":")).encode()).hexdigest()
    assert stored["sha256"] == split.sha256 == expected
    assert json.loads((folder / "segbook_import.json").read_text())["split"]["sha256"] == expected
    assert sorted(p.name for p in (folder / "labelsTs").iterdir()) == ["given_004.nii.gz"]
    assert f"given by {split_file.resolve()}, SHA-256 {expected}" in report.summary()
    assert import_dataset(entry, source, split_file=split_file, progress=False).skipped
    assert import_dataset(entry, source, progress=False).split == split  # kept when re-imported without it


@pytest.mark.parametrize("content, message", [
    ('["given_004", "given_9"]', "case given_9: is not a labelled case of the source (did you mean given_005?)"),
    ('{"test": ["given_004"], "train": ["given_000", "given_001", "given_002", "given_003"]}',
     "case given_005: is in neither the test nor the train list"),
    ('{"test": ["given_004", "given_001"], "train": ["given_000", "given_001", "given_002", "given_003", '
     '"given_005"]}', "case given_001: is in both the test and the train list"),
    ('["given_004", "given_003", "given_004"]', "case given_004: is listed 2 times in the test list"),
    ('[]', "leaves 0 test and 6 train case(s); both sides need at least one"),
])
def test_a_split_file_that_does_not_fit_the_cases_is_refused_and_nothing_written(
        given_task, tmp_path: Path, capsys: pytest.CaptureFixture, content: str, message: str) -> None:
    source, registry_file, entry = given_task
    split_file = tmp_path / "split.json"
    split_file.write_text(content)
    with pytest.raises(DatasetValidationError, match=re.escape(message)):
        import_dataset(entry, source, split_file=split_file, progress=False)
    assert not Paths.from_env().raw.exists()
    assert main(["data", "import", "--registry", str(registry_file), "--task", entry.key, "--from", str(source),
                 "--split", str(split_file)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"segbook: error: {entry.key}: the source dataset has") and message in error
    assert "ERROR: a given test split that does not fit the cases" in error
    assert not Paths.from_env().raw.exists()


def test_split_files_that_cannot_be_read_and_contradicting_options(given_task, tmp_path: Path) -> None:
    source, _, entry = given_task
    for name, content, message in (("s.json", "{oops", "is not valid JSON"),
                                   ("s.json", '{"train": ["given_000"]}', "must hold a list of test case ids"),
                                   ("s.csv", "given_004,holdout\n", "the second column says test or train")):
        (tmp_path / name).write_text(content)
        with pytest.raises(SegbookError, match=message):
            import_dataset(entry, source, split_file=tmp_path / name, progress=False)
    with pytest.raises(SegbookError, match="cannot read the split file"):
        import_dataset(entry, source, split_file=tmp_path / "missing.json", progress=False)
    with pytest.raises(SegbookError, match="--split and --keep-source-split both give the test split"):
        import_dataset(entry, source, split_file=tmp_path / "s.json", keep_source_split=True, progress=False)
    with pytest.raises(SegbookError, match="--seed and --resplit draw a test split"):
        import_dataset(entry, source, keep_source_split=True, seed=1, progress=False)
    assert not Paths.from_env().raw.exists()


def test_a_split_count_other_than_the_registry_s_is_a_warning(given_task, tmp_path: Path) -> None:
    source, _, entry = given_task
    (tmp_path / "two.json").write_text('["given_001", "given_004"]')
    report = import_dataset(entry, source, split_file=tmp_path / "two.json", progress=False)
    assert report.split.test == ("given_001", "given_004")
    assert [p.kind for p in report.validation.warnings] == ["split-count"]
    assert "holds 2 test case(s), the registry's test split 1" in report.validation.warnings[0].message


def test_the_source_s_own_test_set_is_kept_when_its_size_is_the_registry_s(tmp_path: Path,
                                                                          segbook_home: Path) -> None:
    spec = tiny_spec("Source", size=(20, 20, 12), cases=6)
    written = write_synthetic_dataset(spec, tmp_path / "src", "v1", dataset_id=973, held_out=1)
    _, entry = register_spec(tmp_path, spec, 973)  # 5 train + 1 test
    assert draw_split(spec.case_ids, 1).test == ("source_002",)  # a draw would hold out another case
    report = import_dataset(entry, written.path, keep_source_split=True, progress=False)
    assert report.split.test == ("source_005",) and report.split.algorithm == "source-test-set"
    assert read_split(Paths.from_env().raw / entry.nnunet_name).source == str(written.path)

    two = write_synthetic_dataset(spec, tmp_path / "two", "v1", dataset_id=974, held_out=2)
    _, other = register_spec(tmp_path, spec, 974, filename="other.yaml")
    with pytest.raises(DatasetValidationError, match=r"the source's labelled test set holds 2 test case\(s\), the "
                                                     r"registry's test split 1; --keep-source-split keeps"):
        import_dataset(other, two.path, keep_source_split=True, progress=False)
    plain = write_synthetic_dataset(spec, tmp_path / "plain", "plain", dataset_id=974)
    with pytest.raises(SegbookError, match="ships no labelled test set"):
        import_dataset(other, source_of(plain), keep_source_split=True, progress=False)
    assert not (Paths.from_env().raw / other.nnunet_name).exists()


# --- synthetic data ---------------------------------------------------------------------------------------------------

def test_synthetic_data_is_deterministic_and_prototypes_look_alike() -> None:
    spec = SynthSpec(cases=2, size=(32, 32, 20), targets=(TargetSpec("liver", prototype=3),
                                                          TargetSpec("nodule", kind="lesion", within="liver")))
    images, labels = synthesize_case(spec, 0)
    again, labels_again = synthesize_case(spec, 0)
    assert np.array_equal(images[0], again[0]) and np.array_equal(labels, labels_again)
    assert images[0].dtype == np.int16 and set(np.unique(labels)) == {0, 1, 2}
    # The same prototype in another task (other seed, other size) sits at the same place with the same intensity.
    other = SynthSpec(cases=1, size=(32, 32, 20), seed=9, targets=(TargetSpec("organ_a", prototype=3),))
    other_images, other_labels = synthesize_case(other, 0)
    centre = lambda mask: np.argwhere(mask).mean(0)  # noqa: E731
    assert np.abs(centre(labels >= 1) - centre(other_labels == 1)).max() < 4
    assert abs(np.median(images[0][labels == 1]) - np.median(other_images[0][other_labels == 1])) < 15
    mri = SynthSpec(cases=1, modality="MRI", channels=("T1", "T2"), size=(16, 16, 8))
    mri_images, _ = synthesize_case(mri, 0)
    assert len(mri_images) == 2 and mri_images[0].dtype == np.float32 and (mri_images[0] >= 0).all()


def test_cli_synth_import_status_and_a_failing_import(tmp_path: Path, segbook_home: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "synthetic"
    assert main(["data", "synth", "--out", str(out), "--layout", "msd", "--modality", "MRI", "--channels", "T1",
                 "T2", "--cases", "5", "--size", "16", "16", "8", "--lesions", "1", "--id", "975"]) == 0
    printed = capsys.readouterr().out
    command = printed.splitlines()[-1].removeprefix("import with: segbook ").split()
    registry = out / "registry.yaml"
    assert main(command + ["--num-processes", "1"]) == 0
    assert "imported 5 cases (4 train, 1 test)" in capsys.readouterr().out

    assert main(["data", "status", "--registry", str(registry), "--present", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [{"task": "Task975_Synthetic", "dataset": "Dataset975_Synthetic", "raw": "yes",
                     "validated": "yes", "split": "4/1", "planned": "no", "preprocessed": "no"}]

    (out / "Task975_Synthetic" / "labelsTr" / "synthetic_000.nii.gz").write_bytes(b"broken")
    assert main(command + ["--force"]) == 2
    err = capsys.readouterr().err
    assert "segbook: error: Task975_Synthetic: the source dataset has 1 error(s)" in err
    assert "case synthetic_000: " in err and "fix: re-download" in err


def test_synth_targets_and_tasks_as_the_cli_makes_them(tmp_path: Path, segbook_home: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    targets = numbered_targets(2, lesions=1)
    assert [(t.name, t.kind, t.prototype, t.within) for t in targets] == [
        ("structure_1", "structure", 0, None), ("structure_2", "structure", 1, None),
        ("lesion_1", "lesion", None, "structure_1")]
    assert numbered_targets(1) == (TargetSpec("structure_1", prototype=0),)

    spec = SynthSpec(name="Two Channels", cases=4, size=(16, 16, 8), modality="MRI", channels=("T1", "T2"),
                     targets=targets)
    task = write_synthetic_task(spec, tmp_path / "out", layout="plain", dataset_id=974)
    assert (task.key, task.registry) == ("Task974_TwoChannels", tmp_path / "out" / "registry.yaml")
    assert task.dataset.channel_tokens == ["t1", "t2"] and sorted(p.name for p in task.dataset.images.iterdir())[:2] \
        == ["twochannels_000_t1.nii.gz", "twochannels_000_t2.nii.gz"]
    entry = load_registry([task.registry]).get(task.key)
    assert (entry.channels, entry.test_cases, entry.target) == (["T1", "T2"], 1, "Structure&Lesion")
    command = task.import_command()
    assert command.startswith(f"segbook data import --registry {task.registry} --task Task974_TwoChannels --images ")
    assert "--image-pattern '{case}_{channel}.nii.gz' --channel-tokens t1 t2" in command
    assert main([*shlex.split(command)[1:], "--num-processes", "1"]) == 0
    assert "imported 4 cases (3 train, 1 test)" in capsys.readouterr().out

    with pytest.raises(SynthError, match="target names must be unique") as error:
        SynthSpec(targets=(TargetSpec("organ"), TargetSpec("organ")))
    assert isinstance(error.value, SegbookError) and isinstance(error.value, ValueError)
    with pytest.raises(SynthError, match="unknown layout 'v3'"):
        write_synthetic_task(spec, tmp_path / "other", layout="v3")


def test_status_has_one_row_per_registered_task(tmp_path: Path, segbook_home: Path) -> None:
    registry_file, entry = register_spec(tmp_path, tiny_spec("Listed"), 976)
    registry = load_registry([registry_file])
    rows = dataset_status(registry)
    assert [r["task"] for r in rows] == [e.key for e in registry]
    assert rows[-1] == {"task": entry.key, "dataset": entry.nnunet_name, "raw": "no", "validated": "no",
                        "split": "-", "planned": "no", "preprocessed": "no"}
    assert dataset_status(registry, present_only=True) == []


def test_cli_synth_writes_a_ct_and_pet_task_that_imports(tmp_path: Path, segbook_home: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """`--modality CT&PET` (channels CT PET by default): a CT image in HU and a PET uptake image in which every
    structure is hotter than the body and lesions hottest; CT with a PET channel is refused naming CT&PET."""
    out = tmp_path / "petct"
    assert main(["data", "synth", "--out", str(out), "--modality", "CT&PET", "--cases", "4", "--size", "16", "16",
                 "8", "--lesions", "1", "--id", "973"]) == 0
    command = capsys.readouterr().out.splitlines()[-1].removeprefix("import with: segbook ").split()
    entry = load_registry([out / "registry.yaml"]).get("Task973_Synthetic")
    assert (entry.modality, entry.channels) == ("CT&PET", ["CT", "PET"])
    assert main(command + ["--num-processes", "1"]) == 0
    assert "imported 4 cases (3 train, 1 test)" in capsys.readouterr().out

    spec = SynthSpec(cases=1, size=(24, 24, 12), modality="CT&PET", targets=numbered_targets(1, lesions=1))
    (ct, pet), labels = synthesize_case(spec, 0)
    assert ct.dtype == np.int16 and pet.dtype == np.float32 and (pet >= 0).all()
    body = np.median(pet[(labels == 0) & (ct > -500)])
    structure, lesion = np.median(pet[labels == 1]), np.median(pet[labels == 2])
    assert 0.8 < body < 1.2 and structure > 1.3 * body and lesion > 2.5 * structure
    assert main(["data", "synth", "--out", str(tmp_path / "bad"), "--channels", "CT", "PET"]) == 2
    assert "segbook: error: a CT task's channels are all named CT, not CT, PET: for CT with PET use the modality " \
           "CT&PET" in capsys.readouterr().err
    with pytest.raises(SynthError, match="a CT&PET task has a channel named CT and at least one other"):
        SynthSpec(modality="CT&PET", channels=("PET",))
