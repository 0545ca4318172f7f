"""Results bundles: a group's runs at case level, exported without local paths and imported beside local runs.

`export_bundle` writes, for every evaluated run under a results folder, its `run.json` (absolute paths and
tracebacks stripped), `evaluation/summary.json` and `evaluation/metrics.csv`, in nnU-Net's run-folder layout under
`runs/`, and `bundle.json`: format version, creation time, segbook version, the registry facts of each dataset
(labels, SHA-256 of its registry entry) and the test split its runs were scored on, and each file's SHA-256.

`import_bundle` treats the bundle as untrusted input: every name, file, JSON field and CSV cell is checked, and the
per-label means of `summary.json` must follow from `metrics.csv`, before anything is written; the bundle is then
copied (and the copies checked against the validated hashes) into `$SEGBOOK_HOME/results/bundles/NAME/` in one
rename. There its runs lie in the same layout as local runs, so `collect_results` reads them like local runs (source
`bundle:NAME`) and every table and statistic, per-case ones included, works on them unchanged. A bundle whose runs
of a dataset were scored on another test split than the local one is imported but kept apart: the tables show those
runs as configurations of their own (`large pretrained [bundle:NAME, other split]`, `segbook.results.cells`), never
averaged or compared with local runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segbook import claims
from segbook.errors import SegbookError
from segbook.evaluation.files import (MAX_CSV_BYTES, MAX_JSON_BYTES, SHA256_PATTERN, EvaluationFileError,
                                      check_external, check_run, file_sha256, other_run, read_json)
from segbook.io import atomic_directory, atomic_write_json, now, sweep_leftovers
from segbook.paths import Paths
from segbook.registry import DatasetEntry, Registry, load_registry
from segbook.results.collect import BUNDLE_NAME, BUNDLE_RUNS, bundles_dir
from segbook.backbones import recorded
from segbook.backbones.recorded import RecordError
from segbook.runs import (EVALUATION, EXTERNAL, MANIFEST, METRICS, MODELS, RUN_GLOB, SUMMARY, FolderParts,
                          external_root, recorded_backbone)

FORMAT = "segbook-results-bundle"
FORMAT_VERSION = 1
BUNDLE_FILE = "bundle.json"
#: bundle.json's records of the users' backbones its runs trained, by model name (`segbook.backbones.recorded`).
BACKBONES = "backbones"
RUN_FILES = (MANIFEST, f"{EVALUATION}/{SUMMARY}", f"{EVALUATION}/{METRICS}")
RUN_FOLDER_PATTERN = re.compile(r"Dataset\d{1,6}_[A-Za-z0-9_-]{1,100}/SegbookTrainer_[A-Za-z0-9_-]{1,150}"
                                r"__[A-Za-z0-9_-]{1,100}__3d_fullres/fold_(all|\d)")
#: A run's external evaluations travel beside its own files: `evaluation/external/<tested task>[__all-cases]/`'s
#: summary.json and metrics.csv, both, checked on import as local ones are (`check_external`).
EXTERNAL_FILE = re.compile(rf"{EVALUATION}/{EXTERNAL}/([A-Za-z0-9][A-Za-z0-9_-]{{0,120}})/"
                           rf"({re.escape(SUMMARY)}|{re.escape(METRICS)})")
MAX_RUNS = 100_000
_WINDOWS_ABSOLUTE = re.compile(r"^[A-Za-z]:[\\/]")
MAX_LISTED = 30


class BundleError(SegbookError):
    """A bundle that cannot be exported or imported as it is; nothing was written."""


@dataclass
class ExportReport:
    """What `export_bundle` wrote, and how many evaluated runs it left out."""

    name: str
    folder: Path
    runs: int
    left_out: int


@dataclass
class ImportReport:
    """What `import_bundle` did: where the bundle went, its runs, and the datasets kept apart by their split."""

    name: str
    folder: Path
    runs: int
    already_imported: bool = False
    #: task -> (the bundle's split SHA-256, the local one): runs never averaged with local runs.
    other_splits: dict[str, tuple[str, str]] = field(default_factory=dict)


# --- export ----------------------------------------------------------------------------------------------------


def export_bundle(out: str | os.PathLike, results_dir: str | os.PathLike | None = None,
                  registry: Registry | None = None, paths: Paths | None = None,
                  name: str | None = None) -> ExportReport:
    """Write every evaluated run (with its metrics.csv) under `results_dir` (default: nnU-Net's results folder)
    into a new bundle folder `out`, atomically. `name` (default: `out`'s name) is what importers see as
    `bundle:NAME`. Evaluated runs without metrics.csv (or of datasets the registry does not know) are left out
    and counted."""
    paths = paths or Paths.from_env()
    registry = registry or load_registry()
    out = Path(out)
    name = name or out.name
    if not BUNDLE_NAME.fullmatch(name):
        raise BundleError(f"bundle name {name!r}: use letters, digits, '_', '.' and '-' (64 at most), starting with "
                          "a letter or digit (--bundle-name NAME)")
    if out.exists():
        raise BundleError(f"{out} exists already: export into a new folder")
    root = Path(results_dir) if results_dir is not None else paths.results
    by_id = {entry.dataset_id: entry for entry in registry}
    runs, datasets, plug_ins = [], {}, {}
    skipped = 0
    with atomic_directory(out) as partial:
        for folder in sorted(root.glob(RUN_GLOB)):
            parts = _exported_parts(folder, plug_ins)
            entry = by_id.get(parts.dataset_id) if parts else None
            if entry is None or not all((folder / file).is_file() for file in RUN_FILES):
                skipped += (folder / EVALUATION).is_dir()
                continue
            relative = folder.relative_to(root).as_posix()
            run = _export_run(folder, partial / BUNDLE_RUNS / relative, relative)
            runs.append(run)
            record = datasets.setdefault(entry.key, _dataset_record(entry))
            record["splits"] = sorted({*record["splits"], *([run["split"]] if run["split"] else [])})
        if not runs:
            raise BundleError(f"no evaluated run with its metrics.csv under {root}: nothing to export")
        import segbook

        atomic_write_json(partial / BUNDLE_FILE, {
            "format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "created_at": now(),
            "segbook_version": segbook.__version__, "datasets": datasets, "runs": runs,
            **({BACKBONES: plug_ins} if plug_ins else {})})
    return ExportReport(name, out, len(runs), skipped)


def _exported_parts(folder: Path, plug_ins: dict[str, Any]) -> FolderParts | None:
    """The run's parts, a user's backbone known from its run.json's record (no code runs: an export only copies),
    which `plug_ins` collects by name, without local paths, for importers to list its runs without the file."""
    try:
        recorded_backbone(folder, run_code=False)
    except RecordError:
        return None  # `segbook results` names it; an export leaves it out
    parts = FolderParts.parse(folder)
    if parts is not None and parts.identity.model not in MODELS:
        record = json.loads((folder / MANIFEST).read_text()).get(recorded.KEY)
        plug_ins.setdefault(parts.identity.model, without_local_paths(record))
    return parts


def _export_run(folder: Path, target: Path, relative: str) -> dict[str, Any]:
    (target / EVALUATION).mkdir(parents=True)
    manifest = without_local_paths(json.loads((folder / MANIFEST).read_text()))
    summary = without_local_paths(json.loads((folder / EVALUATION / SUMMARY).read_text()))
    atomic_write_json(target / MANIFEST, manifest)
    atomic_write_json(target / EVALUATION / SUMMARY, summary)
    shutil.copyfile(folder / EVALUATION / METRICS, target / EVALUATION / METRICS)
    names = [*RUN_FILES, *_export_external(folder, target)]
    return {"folder": relative, "split": (summary.get("split") or {}).get("sha256"),
            "files": {name: file_sha256(target / name) for name in names}}


def _export_external(folder: Path, target: Path) -> list[str]:
    """The run's complete external evaluations (both files; hidden, unfinished ones never), paths stripped."""
    names = []
    root = external_root(folder)
    for external in sorted(root.iterdir()) if root.is_dir() else []:
        relative = f"{EVALUATION}/{EXTERNAL}/{external.name}"
        if not (EXTERNAL_FILE.fullmatch(f"{relative}/{SUMMARY}") and (external / SUMMARY).is_file()
                and (external / METRICS).is_file()):
            continue
        (target / relative).mkdir(parents=True)
        atomic_write_json(target / relative / SUMMARY,
                          without_local_paths(json.loads((external / SUMMARY).read_text())))
        shutil.copyfile(external / METRICS, target / relative / METRICS)
        names += [f"{relative}/{SUMMARY}", f"{relative}/{METRICS}"]
    return names


def _dataset_record(entry: DatasetEntry) -> dict[str, Any]:
    return {"dataset_id": entry.dataset_id, "labels": _labels(entry), "registry_sha256": _entry_sha256(entry),
            "splits": []}


def _labels(entry: DatasetEntry) -> list[list[Any]]:
    return [[label.index, label.name, label.kind] for label in entry.labels]


def _entry_sha256(entry: DatasetEntry) -> str:
    """The registry version of a dataset: the SHA-256 of its registry entry."""
    return hashlib.sha256(json.dumps(entry.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def without_local_paths(value: Any) -> Any:
    """`value` with every absolute path (POSIX, Windows or ~) replaced by None and tracebacks dropped: a bundle
    says nothing about the machine it came from."""
    if isinstance(value, dict):
        return {key: without_local_paths(item) for key, item in value.items() if key != "traceback"}
    if isinstance(value, list):
        return [without_local_paths(item) for item in value]
    return None if _is_absolute_path(value) else value


def _is_absolute_path(value: Any) -> bool:
    return isinstance(value, str) and (value.startswith(("/", "\\", "~")) or bool(_WINDOWS_ABSOLUTE.match(value)))


# --- import ----------------------------------------------------------------------------------------------------


def import_bundle(source: str | os.PathLike, registry: Registry | None = None,
                  paths: Paths | None = None) -> ImportReport:
    """Validate the bundle folder `source` completely, then store it as `$SEGBOOK_HOME/results/bundles/NAME/` in
    one rename. Importing the same bundle again changes nothing; another bundle of the same name is refused."""
    paths = paths or Paths.from_env()
    registry = registry or load_registry()
    source = Path(source)
    bundle = read_bundle(source, registry)
    target = bundles_dir(paths) / bundle["name"]
    report = ImportReport(bundle["name"], target, len(bundle["runs"]),
                          other_splits=_other_splits(bundle, registry, paths))
    with claims.exclusive(paths.claims, f"bundle__{bundle['name']}", f"the import of bundle {bundle['name']}"):
        sweep_leftovers(target)  # an import killed mid-copy left a hidden, unfinished folder
        if target.exists():
            if (target / BUNDLE_FILE).is_file() and (file_sha256(target / BUNDLE_FILE)
                                                     == file_sha256(source / BUNDLE_FILE)):
                report.already_imported = True
                return report
            raise BundleError(f"another bundle named {bundle['name']!r} is imported already ({target}); remove that "
                              "folder to replace it, or export yours under another --bundle-name")
        with atomic_directory(target) as partial:
            shutil.copyfile(source / BUNDLE_FILE, partial / BUNDLE_FILE)
            for run in bundle["runs"]:
                for name, digest in run["files"].items():
                    copy = partial / BUNDLE_RUNS / run["folder"] / name
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source / BUNDLE_RUNS / run["folder"] / name, copy)
                    if file_sha256(copy) != digest:  # changed since it was validated
                        raise BundleError(f"{source / BUNDLE_RUNS / run['folder'] / name} changed while it was "
                                          "imported; nothing was imported")
    return report


def read_bundle(source: Path, registry: Registry) -> dict[str, Any]:
    """bundle.json, after every check of the bundle and its files (`BundleError` listing the problems)."""
    if not source.is_dir():
        raise BundleError(f"{source} is not a bundle folder (made by `segbook results --export DIR`)")
    bundle = _read_json(source, BUNDLE_FILE)
    problems = _bundle_problems(bundle)
    if problems:
        raise BundleError(_listing(f"{source / BUNDLE_FILE}: not a valid bundle; nothing was imported", problems))
    by_id = {entry.dataset_id: entry for entry in registry}
    problems = _dataset_problems(bundle, registry)
    if problems:
        raise BundleError(_listing(f"{source / BUNDLE_FILE}: datasets that do not match the registry; nothing was "
                                   "imported", problems))
    for run in bundle["runs"]:
        if len(problems) >= MAX_LISTED:
            break
        problems += [f"{run['folder']}: {problem}" for problem in _run_problems(source, run, by_id)]
    if problems:
        raise BundleError(_listing(f"{source}: {len(problems)} problem(s); nothing was imported", problems))
    return bundle


def _listing(headline: str, problems: list[str]) -> str:
    shown = problems[:MAX_LISTED]
    more = [f"... and {len(problems) - len(shown)} more"] if len(problems) > len(shown) else []
    return "\n  ".join([headline, *shown, *more])


def _bundle_problems(bundle: Any) -> list[str]:
    if not isinstance(bundle, dict):
        return ["not a JSON object"]
    if bundle.get("format") != FORMAT or bundle.get("format_version") != FORMAT_VERSION:
        return [f"format {bundle.get('format')!r} version {bundle.get('format_version')!r}: this segbook reads "
                f"{FORMAT} version {FORMAT_VERSION}"]
    problems = []
    if not isinstance(bundle.get("name"), str) or not BUNDLE_NAME.fullmatch(bundle["name"]):
        problems.append(f"name {bundle.get('name')!r}: letters, digits, '_', '.' and '-' only (64 at most)")
    datasets, runs = bundle.get("datasets"), bundle.get("runs")
    if not isinstance(datasets, dict) or not all(isinstance(v, dict) for v in datasets.values()):
        problems.append("datasets: an object of dataset records is required")
    if not isinstance(runs, list) or not 0 < len(runs) <= MAX_RUNS:
        return [*problems, f"runs: a list of 1 to {MAX_RUNS} runs is required"]
    problems += _backbone_problems(bundle.get(BACKBONES, {}))
    folders = set()
    for index, run in enumerate(runs):
        problems += [f"runs[{index}]: {problem}" for problem in _run_record_problems(run, folders)]
    return problems


def _backbone_problems(records: Any) -> list[str]:
    """Make the users' backbones the bundle's runs trained known from their records, as stand-ins (an import runs
    no code, and needs no file: tables only read numbers); a malformed record is a problem."""
    if not isinstance(records, dict):
        return [f"{BACKBONES}: an object of backbone records by model name is required"]
    problems = []
    for name, record in records.items():
        try:
            if not isinstance(record, dict) or record.get("name") != name:
                raise RecordError(f"the record names {record.get('name') if isinstance(record, dict) else None!r}")
            recorded.adopt(record, run_code=False)
        except RecordError as error:
            problems.append(f"{BACKBONES}.{str(name)[:40]}: malformed backbone record ({error})")
    return problems


def _run_record_problems(run: Any, folders: set[str]) -> list[str]:
    if not isinstance(run, dict):
        return ["not an object"]
    folder, files = run.get("folder"), run.get("files")
    if not isinstance(folder, str) or not RUN_FOLDER_PATTERN.fullmatch(folder) or FolderParts.parse(
            Path(folder)) is None:
        return [f"folder {folder!r} is not a run folder (DatasetNNN_Name/SegbookTrainer_...__PLANS__3d_fullres/"
                "fold_F; no other names, no '..', no absolute paths)"]
    if folder in folders:
        return [f"folder {folder} is listed twice"]
    folders.add(folder)
    if not isinstance(files, dict) or not set(RUN_FILES) <= set(files) or not all(
            isinstance(v, str) and SHA256_PATTERN.fullmatch(v) for v in files.values()):
        return [f"files: the SHA-256 of {', '.join(RUN_FILES)} is required"]
    external = [name for name in files if name not in RUN_FILES]
    unknown = [name for name in external if not EXTERNAL_FILE.fullmatch(name)]
    if unknown:
        return [f"files: {unknown[0]!r} is not a file a bundle carries"]
    halves = {name.rsplit("/", 1)[0] for name in external}
    if len(external) != 2 * len(halves):
        return ["files: each external evaluation needs both its summary.json and its metrics.csv"]
    split = run.get("split")
    if split is not None and not (isinstance(split, str) and SHA256_PATTERN.fullmatch(split)):
        return [f"split {split!r} is not a SHA-256"]
    return []


def _dataset_problems(bundle: dict[str, Any], registry: Registry) -> list[str]:
    """Every run's dataset is known here with the same labels (a label's numbers mean the same thing)."""
    by_id = {entry.dataset_id: entry for entry in registry}
    problems = []
    ids = {FolderParts.parse(Path(run["folder"])).dataset_id for run in bundle["runs"]}
    recorded = {record.get("dataset_id"): (key, record) for key, record in bundle["datasets"].items()}
    for dataset_id in sorted(ids):
        entry = by_id.get(dataset_id)
        if entry is None:
            problems.append(f"dataset {dataset_id} is not in the registry (add it with --registry FILE)")
        elif dataset_id not in recorded or recorded[dataset_id][1].get("labels") != _labels(entry):
            problems.append(f"dataset {dataset_id} ({entry.key}): its labels in the bundle differ from the "
                            f"registry's {_labels(entry)}")
    return problems


def _run_problems(source: Path, run: dict[str, Any], by_id: dict[int, DatasetEntry]) -> list[str]:
    """The run's files as a bundle carries them (plain files with their hashes, no absolute paths, a finished run,
    bundle.json's split), then every check of evaluation files that local runs get (`segbook.evaluation.files`)."""
    folder = source / BUNDLE_RUNS / run["folder"]
    problems = [problem for name in RUN_FILES for problem in _file_problems(source, folder / name,
                                                                             run["files"][name])]
    if problems:
        return problems
    parts = FolderParts.parse(Path(run["folder"]))
    entry = by_id[parts.dataset_id]
    try:
        manifest = _read_json(folder, MANIFEST)
        summary = _read_json(folder, f"{EVALUATION}/{SUMMARY}")
    except BundleError as error:
        return [str(error)]
    problems += _manifest_problems(manifest, parts, entry)
    problems += _summary_record_problems(summary, run.get("split"))
    if not problems:
        problems += [p.replace(f"{folder}/", "") for p in check_run(folder, summary, entry, parts).problems]
    return problems + _external_problems(source, folder, run, parts, entry, by_id)


def _external_problems(source: Path, folder: Path, run: dict[str, Any], parts: FolderParts, entry: DatasetEntry,
                       by_id: dict[int, DatasetEntry]) -> list[str]:
    """The run's external evaluations: plain files with their hashes, no local paths, of a dataset the registry
    knows (by its key), and every check of `check_external`."""
    problems = []
    keys = {entry.key: entry for entry in by_id.values()}
    for relative in sorted({name.rsplit("/", 1)[0] for name in run["files"] if name not in RUN_FILES}):
        names = [f"{relative}/{SUMMARY}", f"{relative}/{METRICS}"]
        found = [p for name in names for p in _file_problems(source, folder / name, run["files"][name])]
        if found:
            problems += found
            continue
        try:
            summary = _read_json(folder, names[0])
        except BundleError as error:
            problems.append(str(error))
            continue
        problems += _absolute_paths(summary, names[0])
        tested = (summary.get("external") or {}).get("tested_on") if isinstance(summary, dict) else None
        if tested not in keys or relative.rsplit("/", 1)[1] not in (tested, f"{tested}__all-cases"):
            problems.append(f"{names[0]}: tests on {tested!r}, not a registered dataset of its folder's name")
        if not problems:
            verdict, _ = check_external(folder / relative, summary, entry, parts)
            problems += [p.replace(f"{folder}/", "") for p in verdict.problems]
    return problems


def _file_problems(source: Path, path: Path, digest: str) -> list[str]:
    """A regular file inside the bundle (no link on the way), of a sane size, with the recorded SHA-256."""
    relative = path.relative_to(source)
    current = source
    for part in relative.parts:
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            return [f"{relative} is missing"]
        if stat.S_ISLNK(mode):
            return [f"{relative}: {current.relative_to(source)} is a link; bundles hold plain files only"]
    if not stat.S_ISREG(mode):
        return [f"{relative} is not a plain file"]
    limit = MAX_CSV_BYTES if path.suffix == ".csv" else MAX_JSON_BYTES
    if os.lstat(path).st_size > limit:
        return [f"{relative} is larger than {limit // 2**20} MiB"]
    if file_sha256(path) != digest:
        return [f"{relative}: its SHA-256 differs from bundle.json's (changed or damaged)"]
    return []


def _read_json(folder: Path, name: str) -> Any:
    try:
        return read_json(folder / name)
    except FileNotFoundError:
        raise BundleError(f"{folder / name} is missing") from None
    except EvaluationFileError as error:
        raise BundleError(str(error)) from None


def _absolute_paths(value: Any, where: str) -> list[str]:
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in _absolute_paths(item, f"{where}.{key}")]
    if isinstance(value, list):
        return [p for index, item in enumerate(value) for p in _absolute_paths(item, f"{where}[{index}]")]
    return [f"{where} holds an absolute path; bundles carry none"] if _is_absolute_path(value) else []


def _identity_problems(record: Any, parts: FolderParts, entry: DatasetEntry, where: str) -> list[str]:
    """A bundle's records name their run: a record without an identity, or naming another run, is refused."""
    if not isinstance(record, dict) or "model" not in record:
        return [f"{where}: the run's identity is missing"]
    other = other_run(record, parts, entry)
    return [f"{where}: names {other}, which disagrees with the run's folder"] if other else []


def _manifest_problems(manifest: Any, parts: FolderParts, entry: DatasetEntry) -> list[str]:
    if not isinstance(manifest, dict):
        return [f"{MANIFEST} is not a JSON object"]
    problems = _absolute_paths(manifest, MANIFEST) + _identity_problems(manifest.get("run"), parts, entry,
                                                                          f"{MANIFEST} run")
    if manifest.get("status") != "finished":
        problems.append(f"{MANIFEST}: status {manifest.get('status')!r}; only finished runs are shared")
    return problems


def _summary_record_problems(summary: Any, split: str | None) -> list[str]:
    """What a bundled summary must be beyond a valid evaluation: free of local paths, naming its run, scored on the
    split bundle.json records."""
    where = f"{EVALUATION}/{SUMMARY}"
    if not isinstance(summary, dict):
        return [f"{where} is not a JSON object"]
    problems = _absolute_paths(summary, where)
    if not isinstance(summary.get("run"), dict) or "model" not in summary["run"]:
        problems.append(f"{where} run: the run's identity is missing")
    recorded = summary.get("split")
    if recorded is not None and (not isinstance(recorded, dict) or recorded.get("sha256") != split):
        problems.append(f"{where}: its split differs from bundle.json's")
    return problems


def _other_splits(bundle: dict[str, Any], registry: Registry, paths: Paths) -> dict[str, tuple[str, str]]:
    """The bundle's datasets scored on a test split other than the local one: the imported dataset's split, or
    for a dataset not imported here, the split its local evaluated runs were scored on."""
    from segbook.data.folders import raw_folder
    from segbook.data.split import split_sha256

    by_id = {entry.dataset_id: entry for entry in registry}
    theirs: dict[int, set[str]] = {}
    for run in bundle["runs"]:
        if run.get("split"):
            theirs.setdefault(FolderParts.parse(Path(run["folder"])).dataset_id, set()).add(run["split"])
    local_runs = _local_run_splits(paths, set(theirs))
    others = {}
    for dataset_id, splits in theirs.items():
        entry = by_id[dataset_id]
        local = split_sha256(raw_folder(entry, paths)) or local_runs.get(dataset_id)
        differing = sorted(splits - {local})
        if local and differing:
            others[entry.key] = (differing[0], local)
    return others


def _local_run_splits(paths: Paths, dataset_ids: set[int]) -> dict[int, str]:
    """A test split recorded by the local evaluated runs of each of these datasets."""
    splits = {}
    for folder in paths.results.glob(RUN_GLOB):
        parts = FolderParts.parse(folder)
        if parts is None or parts.dataset_id not in dataset_ids or parts.dataset_id in splits:
            continue
        try:
            split = (json.loads((folder / EVALUATION / SUMMARY).read_bytes()).get("split") or {}).get("sha256")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(split, str):
            splits[parts.dataset_id] = split
    return splits
