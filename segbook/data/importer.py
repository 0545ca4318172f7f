"""`import_dataset`: turn a downloaded dataset into a clean nnU-Net v2 raw dataset that matches its registry entry.

Order of work: list the source (layouts.py), validate every case (validate.py), and only if nothing is wrong draw or
reuse the test split and build `nnUNet_raw/Dataset{id}_{Name}` in a temporary sibling folder that is renamed into
place at the end. Training cases go to imagesTr/labelsTr, the held-out test cases to imagesTs/labelsTs (nnU-Net
plans and trains on imagesTr only, so they cannot leak). Files already in the target format with a consistent
header are copied byte for byte; the rest (other formats, MSD 4-D files, float labels, headers that differ within
the tolerance) are rewritten with the first channel's geometry, which nnU-Net requires to match exactly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segbook import __version__
from segbook.data.folders import check_not_in_use, dataset_claim, raw_folder
from segbook.data.layouts import ImageRef, PlainSource, SourceCase, SourceDataset, read_source, split_ending
from segbook.data.problems import DatasetValidationError, ValidationReport, error, warning
from segbook.data.split import (FROM_FILE, FROM_SOURCE, GivenSplit, Split, check_given_split, held_out_count,
                                read_split, read_split_file, resolve_split, source_test_split, write_split)
from segbook.data.validate import DEFAULT_TOLERANCE, Header, parallel_map, read_header, same_geometry, validate_cases
from segbook.errors import SegbookError
from segbook.io import atomic_directory, atomic_write_json
from segbook.paths import Paths

if TYPE_CHECKING:
    from segbook.registry import DatasetEntry

IMPORT_RECORD = "segbook_import.json"
#: Bump when the importer writes different files for the same source, so old imports are redone.
IMPORT_FORMAT = 1


@dataclass
class ImportReport:
    """What an import did (or, with `skipped`, found already done)."""

    task: str
    dataset: str
    destination: Path
    layout: str
    source: str
    validation: ValidationReport
    split: Split | None = None
    skipped: bool = False
    written: dict[str, int] = field(default_factory=lambda: {"copied": 0, "converted": 0})
    seconds: float = 0.0
    repaired: list[str] = field(default_factory=list)  # what a killed import or planning had left, now repaired
    previous_split: str | None = None  # the SHA-256 of the test split this import replaced by another

    def summary(self) -> str:
        lines = [*(f"repaired: {line}" for line in self.repaired), self._outcome()]
        if self.split is not None and not self.skipped:
            lines.append(f"test split: {describe_split(self.split)}")
        if self.previous_split:
            lines.append(f"the test split changed (SHA-256 was {self.previous_split}): scores on the old test set "
                         "are not comparable with new ones; the results tables leave them out, naming them (evaluate "
                         "those runs again, or train them again where they trained beside the old split)")
        return "\n".join(lines)

    def _outcome(self) -> str:
        if self.skipped:
            return f"{self.dataset}: unchanged since the last import ({self.destination}); nothing to do"
        if self.split is None:
            return f"{self.dataset}: {len(self.validation.cases)} cases checked, no errors (nothing written)"
        return (f"{self.dataset}: imported {len(self.split.train) + len(self.split.test)} cases "
                f"({len(self.split.train)} train, {len(self.split.test)} test) from {self.source} ({self.layout} "
                f"layout) into {self.destination} in {self.seconds:.1f} s ({self.written['copied']} files copied, "
                f"{self.written['converted']} converted; {len(self.validation.warnings)} warning(s))")


def describe_split(split: Split) -> str:
    """How a split was made, and its SHA-256, in one line."""
    how = {FROM_SOURCE: f"the source's labelled test set ({split.source})",
           FROM_FILE: f"given by {split.source}"}.get(split.algorithm, f"drawn with seed {split.seed}")
    return f"{len(split.train)} train / {len(split.test)} test, {how}, SHA-256 {split.sha256}"


def read_import_record(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / IMPORT_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def check_dataset_id(entry: DatasetEntry, paths: Paths) -> None:
    """nnU-Net finds datasets by id: a second folder with this id under another name would make that ambiguous."""
    for root in (paths.raw, paths.preprocessed, paths.results):
        for other in sorted(root.glob(f"Dataset{entry.dataset_id:03d}_*")) if root.is_dir() else []:
            if other.name != entry.nnunet_name and other.is_dir():
                raise SegbookError(f"{other} has dataset id {entry.dataset_id}, which {entry.key} uses as "
                                   f"{entry.nnunet_name}; nnU-Net finds datasets by id, so move that folder away or "
                                   "register the dataset under another id")


def _content_id(entry: DatasetEntry, source: SourceDataset, seed: int | None, tolerance: float,
                given: Split | None) -> str:
    """Identifies an import's inputs: the registry entry, options (a given split by its content), and every source
    file's path, size and mtime."""
    digest = hashlib.sha256()
    settings = {"format": IMPORT_FORMAT, "entry": entry.model_dump(mode="json"), "layout": source.layout,
                "location": source.location, "settings": source.settings, "seed": seed, "tolerance": tolerance,
                "split": None if given is None else [given.algorithm, given.sha256]}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for path in sorted(set(source.files)):
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _labels(entry: DatasetEntry) -> dict[int, str]:
    return {label.index: label.name for label in entry.labels}


def validate_source(entry: DatasetEntry, source: Path | PlainSource, layout: str = "auto", num_processes: int = 1,
                    tolerance: float = DEFAULT_TOLERANCE,
                    progress: bool = True) -> tuple[SourceDataset, ValidationReport]:
    """Read and check a source against its registry entry; writes nothing and does not raise on problems."""
    found = read_source(source, len(entry.channels), layout)
    return found, _validate(entry, found, num_processes, tolerance, progress)


def _validate(entry: DatasetEntry, found: SourceDataset, num_processes: int, tolerance: float,
              progress: bool, split_problems: list | None = None) -> ValidationReport:
    problems = list(found.problems) + list(split_problems or [])
    expected = entry.train_cases + entry.test_cases
    if not found.cases and not any(p.severity == "error" for p in problems):
        problems.append(error("no-cases", f"no labelled cases found in {found.location}"))
    elif found.cases and len(found.cases) != expected:
        problems.append(warning("case-count", f"found {len(found.cases)} labelled cases; the registry lists "
                                              f"{entry.train_cases} train + {entry.test_cases} test = {expected}"))
    return validate_cases(found.cases, entry.channels, _labels(entry), num_processes, tolerance, progress, problems)


def import_dataset(entry: DatasetEntry, source: Path | PlainSource, paths: Paths | None = None, *,
                   layout: str = "auto", num_processes: int = 1, seed: int | None = None, resplit: bool = False,
                   force: bool = False, check_only: bool = False, tolerance: float = DEFAULT_TOLERANCE,
                   progress: bool = True, split_file: str | Path | None = None,
                   keep_source_split: bool = False) -> ImportReport:
    """Validate `source` and write it as `nnUNet_raw/{entry.nnunet_name}` with SegBook's train/test split.

    The split is drawn (`seed`: default the stored one's, else 0), or given: `split_file` (test ids, see
    `segbook.data.split.read_split_file`) or, with `keep_source_split`, the labelled test set the source ships when
    it has exactly the registry's test count. A given split is checked against the cases first.

    Raises DatasetValidationError (nothing written) when any case has an error or a given split does not fit the
    cases, SplitChangedError when the cases differ from those of the stored split (unless `resplit`). An unchanged
    source is not imported again unless `force`. `check_only` validates and stops.
    """
    started = time.perf_counter()
    paths = paths or Paths.from_env()
    check_dataset_id(entry, paths)
    given = _given_split(split_file, keep_source_split, seed, resplit)
    found = read_source(source, len(entry.channels), layout)
    split, split_problems = _checked_split(entry, found, given, keep_source_split)
    if check_only:
        report = _validate(entry, found, num_processes, tolerance, progress, split_problems)
        if report.errors:
            raise DatasetValidationError(report, entry.key)
        return ImportReport(entry.key, entry.nnunet_name, raw_folder(entry, paths), found.layout, found.location,
                            report)
    with dataset_claim(entry, paths) as repaired:
        result = _import(entry, found, paths, num_processes, seed, resplit, force, tolerance, progress,
                         (split, split_problems))
    result.repaired = repaired
    result.seconds = time.perf_counter() - started
    return result


def _given_split(split_file: str | Path | None, keep_source_split: bool, seed: int | None,
                 resplit: bool) -> GivenSplit | None:
    """The split file read (None without one); options that contradict each other are refused before the source
    is even listed."""
    if split_file is not None and keep_source_split:
        raise SegbookError("--split and --keep-source-split both give the test split: choose one")
    if (split_file is not None or keep_source_split) and (seed is not None or resplit):
        raise SegbookError("--seed and --resplit draw a test split; with --split or --keep-source-split the split "
                           "is given: leave them out")
    return None if split_file is None else read_split_file(split_file)


def _checked_split(entry: DatasetEntry, found: SourceDataset, given: GivenSplit | None,
                   keep_source_split: bool) -> tuple[Split | None, list]:
    """The given split (the file's, or the source's own test set) checked against the source's cases: the split
    and warnings, or a DatasetValidationError before any image is read or anything written."""
    if keep_source_split:
        if not found.test_ids:
            raise SegbookError(f"{found.location} ships no labelled test set (labelsTs) to keep; leave out "
                               "--keep-source-split to draw the split, or give one with --split FILE")
        given = source_test_split(found.test_ids, found.location)
    if given is None:
        return None, []
    case_ids = [case.case_id for case in found.cases]
    split, problems = check_given_split(given, case_ids, entry.test_cases, exact_count=keep_source_split)
    if split is None:
        raise DatasetValidationError(ValidationReport(problems, case_ids), entry.key)
    return split, problems


def _import(entry: DatasetEntry, found: SourceDataset, paths: Paths, num_processes: int, seed: int | None,
            resplit: bool, force: bool, tolerance: float, progress: bool,
            given: tuple[Split | None, list]) -> ImportReport:
    """Validate and write, holding the dataset's claim (no other import or planning of it runs meanwhile)."""
    destination = raw_folder(entry, paths)
    split, split_problems = given
    content_id = _content_id(entry, found, seed, tolerance, split)
    record = read_import_record(destination)
    if (record and record.get("content_id") == content_id and (destination / "dataset.json").is_file()
            and not (force or resplit)):
        return ImportReport(entry.key, entry.nnunet_name, destination, found.layout, found.location,
                            ValidationReport(), read_split(destination), skipped=True)
    check_not_in_use(entry, paths, f"Importing {entry.key} again")
    report = _validate(entry, found, num_processes, tolerance, progress, split_problems)
    if report.errors:
        raise DatasetValidationError(report, entry.key)
    result = ImportReport(entry.key, entry.nnunet_name, destination, found.layout, found.location, report)
    n_test = held_out_count(len(found.cases), entry.train_cases, entry.test_cases)
    stored = read_split(destination) if destination.is_dir() else None
    result.split = split or resolve_split([c.case_id for c in found.cases], n_test, stored, seed, resplit)
    if stored is not None and stored.sha256 != result.split.sha256:
        result.previous_split = stored.sha256
    with atomic_directory(destination, replace=True) as building:
        result.written = _write_cases(entry, found.cases, result.split, building, num_processes, progress)
        _write_metadata(entry, found, result, building, content_id, tolerance)
        check_not_in_use(entry, paths, f"Importing {entry.key} again")  # a run may have started meanwhile
    return result


def _write_cases(entry: DatasetEntry, cases: list[SourceCase], split: Split, folder: Path, num_processes: int,
                 progress: bool) -> dict[str, int]:
    test = set(split.test)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir()
    jobs = [(case, "Ts" if case.case_id in test else "Tr") for case in cases]
    write = functools.partial(_write_case, folder=folder, file_ending=entry.file_ending)
    counts = {"copied": 0, "converted": 0}
    for outcome in parallel_map(write, jobs, num_processes, "importing", progress):
        for key, value in outcome.items():
            counts[key] += value
    return counts


def _write_case(job: tuple[SourceCase, str], folder: Path, file_ending: str) -> dict[str, int]:
    case, subset = job
    reference = read_header(case.images[0].path)
    loaded: dict[Path, Any] = {}  # an MSD file holds every channel: read it once
    outcomes = [_place(ref, folder / f"images{subset}" / f"{case.case_id}_{channel:04d}{file_ending}",
                       reference, False, loaded)
                for channel, ref in enumerate(case.images)]
    outcomes.append(_place(ImageRef(case.label), folder / f"labels{subset}" / f"{case.case_id}{file_ending}",
                           reference, True, loaded))
    return {"copied": outcomes.count("copied"), "converted": outcomes.count("converted")}


def _place(ref: ImageRef, target: Path, reference: Header, is_label: bool, loaded: dict[Path, Any]) -> str:
    """Copy the file when it is already what nnU-Net needs, otherwise rewrite it on the reference grid."""
    import SimpleITK as sitk

    header = read_header(ref.path)
    ending = split_ending(ref.path.name)[1].lower()
    copyable = (ref.volume is None and target.name.lower().endswith(ending) and same_geometry(reference, header)
                and (not is_label or "integer" in header.pixel_type))
    if copyable:
        shutil.copyfile(ref.path, target)
        return "copied"
    if ref.path not in loaded:
        loaded[ref.path] = sitk.ReadImage(str(ref.path))
    image = loaded[ref.path]
    if ref.volume is not None:
        size = list(image.GetSize())
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, ref.volume])
    if is_label and "integer" not in header.pixel_type:
        maximum = float(sitk.GetArrayViewFromImage(image).max())
        image = sitk.Cast(sitk.Round(image), sitk.sitkUInt8 if maximum < 256 else sitk.sitkUInt16)
    image.SetSpacing(reference.spacing)
    image.SetOrigin(reference.origin)
    image.SetDirection(reference.direction)
    sitk.WriteImage(image, str(target), useCompression=True)
    return "converted"


def dataset_json(entry: DatasetEntry, n_train: int, n_test: int) -> dict:
    """nnU-Net v2's dataset.json, built from the registry (never from the source's own metadata)."""
    return {
        "name": entry.name,
        "description": f"{entry.key}, imported by segbook {__version__}",
        "reference": entry.citation,
        "licence": entry.licence,
        "channel_names": entry.channel_names_json,
        "labels": entry.labels_json,
        "numTraining": n_train,
        "file_ending": entry.file_ending,
        "segbook": {"task": entry.key, "paper_task": entry.paper_task, "modality": entry.modality,
                    "target": entry.target, "numTest": n_test},
    }


def _write_metadata(entry: DatasetEntry, found: SourceDataset, result: ImportReport, folder: Path,
                    content_id: str, tolerance: float) -> None:
    split = result.split
    atomic_write_json(folder / "dataset.json", dataset_json(entry, len(split.train), len(split.test)))
    write_split(folder, split, entry.train_cases, entry.test_cases)
    atomic_write_json(folder / IMPORT_RECORD, {
        "format": IMPORT_FORMAT, "segbook_version": __version__, "task": entry.key, "dataset": entry.nnunet_name,
        "content_id": content_id, "layout": found.layout, "source": found.location, "settings": found.settings,
        "tolerance": tolerance, "validated": True, "cases": len(split.train) + len(split.test),
        "train": len(split.train), "test": len(split.test), "split": split.record(), "files": result.written,
        "warnings": [p.__dict__ for p in result.validation.warnings],
    })
