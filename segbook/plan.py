"""nnU-Net v2 fingerprint, planning and preprocessing of an imported task, redone only when its raw data changed.

`plan_task` runs nnU-Net's own classes (DatasetFingerprintExtractor, an ExperimentPlanner, the configuration's
preprocessor) for the 3d_fullres configuration. STU-Net trains on the same plans as nnU-Net's network (patch size,
spacing, batch size, normalisation), as SegBook did; only its five strides are derived from the plan's
(`stunet.strides_from_plans`).

Re-running is cheap: `segbook_plan.json` in the preprocessed folder records the *raw stamp* (a digest of the raw
dataset's dataset.json, split, import record and file listing) that each plans file was made from. When the stamp
still matches, nothing runs; when the raw data changed, the whole preprocessed folder is stale (fingerprint, plans,
preprocessed cases, cross-validation splits) and is rebuilt from scratch.

Planning never touches the folder training reads until it is done: nnU-Net (which empties its output folder before
refilling it) works in a hidden sibling, `.Dataset{id}_{Name}.{token}.partial/`, and the finished folder, its cases
checked against the train split, replaces the old one by two renames under the dataset's claim, unless a run of
the dataset is live (`segbook.data.folders.check_not_in_use`, asked before and again just before the swap): the
data a running job trains on is never replaced or deleted. A kill at any point
leaves the previous version in place (or, between the renames, restores it on the next run). Training checks that
the preprocessed cases are exactly the train split's (`verify_preprocessed`) and records their count and a hash of
their ids.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from segbook.backbones import PLANNERS, Planner
from segbook.data.folders import (check_not_in_use, dataset_claim, is_imported, preprocessed_folder, raw_folder,
                                  repair_if_free)
from segbook.data.split import train_case_ids
from segbook.errors import SegbookError
from segbook.io import atomic_write_json, now
from segbook.paths import Paths
from segbook.reference_plans import compare_plans, describe_comparison, has_reference, reference_planner

if TYPE_CHECKING:
    from segbook.registry import DatasetEntry

CONFIGURATION = "3d_fullres"
PLAN_RECORD = "segbook_plan.json"
PLAN_LOG = "segbook_plan.log"
#: How the log names the SegBook authors' variants of nnU-Net's planner (`Planner.nnunet_class` None).
REFERENCE_PLANNER = "ExperimentPlanner at the authors' patch size and spacing"
#: How the log names the planner of `--plans checkpoint` (`segbook.checkpoint_plans`).
CHECKPOINT_PLANNER = "nnUNetPlannerResEncL around the checkpoint's network"


@dataclass(frozen=True)
class PlanResult:
    """The 3d_fullres plan of a task, where its preprocessed data is, and STU-Net's strides for it."""

    task: str
    dataset: str
    planner: str
    plans_identifier: str
    plans_file: Path
    data_folder: Path
    patch_size: list[int]
    spacing: list[float]
    batch_size: int
    normalization: list[str]
    nnunet_strides: list[list[int]]
    stunet_strides: list[list[int]]
    training_cases: int
    raw_stamp: str
    comparison: dict[str, Any]
    skipped: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    def summary(self) -> str:
        state = "up to date, nothing to do" if self.skipped else f"planned and preprocessed in {self.seconds:.1f} s"
        return "\n".join([
            f"{self.dataset} ({self.planner} planner, {CONFIGURATION}): {state}",
            f"  plans          {self.plans_file}",
            f"  data           {self.data_folder} ({self.training_cases} training cases)",
            f"  patch size     {self.patch_size}   spacing {[round(s, 4) for s in self.spacing]}   "
            f"batch size {self.batch_size}",
            f"  normalisation  {', '.join(self.normalization)}",
            f"  STU-Net strides {self.stunet_strides}",
            *describe_comparison(self.comparison),
        ])


def _planner(name: str) -> Planner:
    """The planner of a name (`segbook.backbones.PLANNERS`, which say the plans each writes)."""
    try:
        return PLANNERS[name]
    except KeyError:
        raise SegbookError(f"unknown planner {name!r}; choose one of {', '.join(PLANNERS)}") from None


def plans_identifier(planner: str = "default") -> str:
    return _planner(planner).plans


def check_planner(entry: DatasetEntry, planner: str) -> str:
    """The plans identifier of `planner` for this task; SegbookError (before anything is planned or written) for
    an unknown planner, or for `paper` plans of a dataset whose registry entry lacks the authors' plans."""
    chosen = _planner(planner)
    if chosen.is_reference and not has_reference(entry):
        raise SegbookError(f"{entry.key}: the registry holds no reference_patch_size and reference_spacing (the "
                           f"SegBook authors' plans), so there are no --plans {planner} to make; add them to the "
                           "dataset's registry entry (docs/registry.md)")
    return chosen.plans


def recorded_comparisons(entry: DatasetEntry, paths: Paths | None = None) -> dict[str, dict[str, Any]]:
    """For each planner with current plans: its plan beside the authors', as `segbook plan` recorded it (no
    nnU-Net needed)."""
    paths = paths or Paths.from_env()
    record = _read_record(preprocessed_folder(entry, paths))
    states = plan_states(entry, paths)
    return {name: record["plans"][planner.plans]["comparison"] for name, planner in PLANNERS.items()
            if states.get(name) == "preprocessed" and "comparison" in record["plans"][planner.plans]}


def raw_stamp(entry: DatasetEntry, paths: Paths) -> str:
    """A digest of what planning reads from the raw dataset (metadata and file listing; no image is opened)."""
    folder = raw_folder(entry, paths)
    digest = hashlib.sha256()
    for name in ("dataset.json", "segbook_split.json", "segbook_import.json"):
        path = folder / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"-") + b"\n")
    for sub in ("imagesTr", "labelsTr"):
        entries = sorted(os.scandir(folder / sub), key=lambda e: e.name) if (folder / sub).is_dir() else []
        for item in entries:
            digest.update(f"{sub}/{item.name}\0{item.stat().st_size}\n".encode())
    return digest.hexdigest()


def _read_record(folder: Path) -> dict[str, Any]:
    try:
        record = json.loads((folder / PLAN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _plans_path(folder: Path, identifier: str) -> Path:
    return folder / f"{identifier}.json"


def _is_complete(folder: Path, record: dict[str, Any], identifier: str) -> bool:
    done = record.get("plans", {}).get(identifier, {})
    return bool(done.get("complete")) and _plans_path(folder, identifier).is_file() and \
        (folder / done.get("data_identifier", "")).is_dir()


def plan_states(entry: DatasetEntry, paths: Paths | None = None) -> dict[str, str]:
    """For each planner that has run on this task: "preprocessed", or "stale" when the raw data changed since."""
    paths = paths or Paths.from_env()
    folder = preprocessed_folder(entry, paths)
    record = _read_record(folder)
    if not record:
        return {}
    current = record.get("raw_stamp") == raw_stamp(entry, paths)
    states = {}
    for name, planner in PLANNERS.items():
        if planner.plans in record.get("plans", {}):
            states[name] = "preprocessed" if current and _is_complete(folder, record, planner.plans) else "stale"
    return states


def _default_processes() -> int:
    return max(1, int(os.environ.get("nnUNet_def_n_proc") or min(8, os.cpu_count() or 1)))


@contextlib.contextmanager
def _nnunet_output(log_file: Path) -> Iterator[None]:
    """nnU-Net prints its plans and notes to stdout; keep them in a log next to the plans, progress bars on stderr."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("a", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        yield


def _load_result(entry: DatasetEntry, paths: Paths, planner: str, stamp: str, skipped: bool,
                 seconds: float) -> PlanResult:
    from stunet.presets import strides_from_plans

    identifier = plans_identifier(planner)
    folder = preprocessed_folder(entry, paths)
    plans_file = _plans_path(folder, identifier)
    plans = json.loads(plans_file.read_text(encoding="utf-8"))
    if CONFIGURATION not in plans.get("configurations", {}):
        raise SegbookError(f"{plans_file} has no {CONFIGURATION} configuration (nnU-Net plans 3-D configurations "
                           "only for 3-D data); SegBook trains 3d_fullres")
    config = plans["configurations"][CONFIGURATION]
    strides = config["architecture"]["arch_kwargs"]["strides"]
    dataset = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    return PlanResult(
        task=entry.key, dataset=entry.nnunet_name, planner=planner, plans_identifier=identifier,
        plans_file=plans_file, data_folder=folder / config["data_identifier"],
        patch_size=[int(v) for v in config["patch_size"]], spacing=[float(v) for v in config["spacing"]],
        batch_size=int(config["batch_size"]), normalization=list(config["normalization_schemes"]),
        nnunet_strides=[[int(v) for v in s] for s in strides], stunet_strides=strides_from_plans(strides),
        training_cases=int(dataset["numTraining"]), raw_stamp=stamp,
        comparison=compare_plans(entry, identifier, config), skipped=skipped, seconds=seconds)


def load_plan(entry: DatasetEntry, paths: Paths | None = None, planner: str = "default") -> PlanResult:
    """The existing plan of a task, without running anything; SegbookError when it is missing or stale."""
    paths = paths or Paths.from_env()
    state = plan_states(entry, paths).get(planner)
    if state != "preprocessed":
        why = "its raw data changed since" if state == "stale" else "it has not been planned"
        raise SegbookError(f"{entry.key}: {why}; run `segbook plan --task {entry.key}`"
                           + (f" --planner {planner}" if planner != "default" else ""))
    return _load_result(entry, paths, planner, raw_stamp(entry, paths), skipped=True, seconds=0.0)


def plan_task(entry: DatasetEntry, paths: Paths | None = None, num_processes: int | None = None,
              planner: str = "default", force: bool = False, progress: bool = True,
              log: Callable[[str], None] | None = None, fingerprint_samples: int | None = None,
              wait: bool = True) -> PlanResult:
    """Fingerprint, plan and preprocess an imported task (3d_fullres); a no-op when it is up to date.

    `num_processes` defaults to nnUNet_def_n_proc (else the cores, at most 8). `force` redoes everything for this
    planner. `log` receives one line per stage (default: stderr when `progress`). `fingerprint_samples` overrides
    how many foreground intensities nnU-Net samples for the fingerprint (1e8 over the dataset, which dominates the
    time on tiny datasets); it applies only to a fingerprint computed by this call. While another process imports
    or plans the task, `wait` waits for it (else `ClaimBusy` names it).
    """
    started = time.perf_counter()
    say = log or ((lambda line: print(line, file=sys.stderr, flush=True)) if progress else (lambda line: None))
    paths = paths or Paths.from_env()
    paths.export()
    identifier = check_planner(entry, planner)
    if not is_imported(entry, paths):
        raise SegbookError(f"{entry.key} is not imported ({raw_folder(entry, paths)} has no dataset.json); run "
                           f"`segbook data import --task {entry.key} --from PATH` first")
    from segbook.data.importer import check_dataset_id

    check_dataset_id(entry, paths)
    if not force and plan_states(entry, paths).get(planner) == "preprocessed":
        for line in repair_if_free(entry, paths):  # a killed planning's hidden copy can be gigabytes
            say(f"{entry.nnunet_name}: {line}")
        return _load_result(entry, paths, planner, raw_stamp(entry, paths), True, time.perf_counter() - started)
    from segbook.primus_plans import check_task_fits

    check_task_fits(entry, paths, planner)
    with dataset_claim(entry, paths, wait=wait, say=say) as repaired:
        for line in repaired:
            say(f"{entry.nnunet_name}: {line}")
        stamp = raw_stamp(entry, paths)
        record = _read_record(preprocessed_folder(entry, paths))
        if not force and record.get("raw_stamp") == stamp and \
                _is_complete(preprocessed_folder(entry, paths), record, identifier):
            return _load_result(entry, paths, planner, stamp, True, time.perf_counter() - started)
        check_not_in_use(entry, paths, f"Planning {entry.key} again")
        _build(entry, paths, planner, stamp, record, num_processes or _default_processes(), force, progress, say,
               fingerprint_samples)
    return _load_result(entry, paths, planner, stamp, skipped=False, seconds=time.perf_counter() - started)


def _build(entry: DatasetEntry, paths: Paths, planner: str, stamp: str, record: dict[str, Any], processes: int,
           force: bool, progress: bool, say: Callable[[str], None], fingerprint_samples: int | None) -> None:
    """Preprocess into a hidden sibling folder, check it, then swap it in for the current one."""
    identifier = plans_identifier(planner)
    folder = preprocessed_folder(entry, paths)
    token = uuid.uuid4().hex[:12]
    staging = folder.with_name(f".{folder.name}.{token}.partial")
    staged = staging / folder.name
    same_raw = record.get("raw_stamp") == stamp and folder.is_dir()
    if same_raw:  # other planners' data and the fingerprint stay valid: carry them over
        record = {**record, "plans": {k: v for k, v in record.get("plans", {}).items() if k != identifier}}
        _carry_over(folder, staged, record.get("plans", {}))
    else:
        if folder.exists():
            say(f"{entry.nnunet_name}: raw data changed (or no segbook record); rebuilding {folder}")
        staged.mkdir(parents=True)
        record = {"raw_stamp": stamp, "plans": {}}
    try:
        with _nnunet_preprocessed_at(staging):
            data_identifier = _run_nnunet(entry, planner, staged, processes, force, progress, say,
                                          fingerprint_samples)
        _copy_ground_truth(entry, raw_folder(entry, paths), staged)
        cases = _check_cases(entry.key, raw_folder(entry, paths), staged / data_identifier, "nnU-Net preprocessed")
        plans = json.loads(_plans_path(staged, identifier).read_text(encoding="utf-8"))
        record["plans"][identifier] = {"planner": planner, "configuration": CONFIGURATION,
                                       "data_identifier": data_identifier, "complete": True, "version": token,
                                       "cases": cases.count, "case_ids_sha256": cases.ids_sha256,
                                       "comparison": compare_plans(entry, identifier,
                                                                   plans["configurations"][CONFIGURATION]),
                                       "finished_at": now()}
        record["nnunet_version"] = _nnunet_version()
        atomic_write_json(staged / PLAN_RECORD, record)
        check_not_in_use(entry, paths, f"Planning {entry.key} again")  # a run may have started meanwhile
        _swap(staged, folder, token)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _carry_over(folder: Path, staged: Path, kept_plans: dict[str, Any]) -> None:
    """Copy the current folder into the staging one: small files copied, other planners' case folders hard-linked
    (nnU-Net never writes into those, and a link costs nothing); the rebuilt planner's own data is left out."""
    kept_data = {plan.get("data_identifier") for plan in kept_plans.values()}
    staged.mkdir(parents=True)
    for item in folder.iterdir():
        if item.is_file():
            shutil.copy2(item, staged / item.name)
        elif item.is_dir() and item.name in kept_data:
            shutil.copytree(item, staged / item.name, copy_function=_link_or_copy)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copy2(source, target)


def _swap(staged: Path, folder: Path, token: str) -> None:
    """Put the finished folder in place of the current one. Between the two renames the folder is missing; a kill
    there is repaired by `segbook.io.sweep_leftovers` (the `.old` copy is put back)."""
    old = folder.with_name(f".{folder.name}.{token}.old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(staged, folder)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _nnunet_preprocessed_at(root: Path) -> Iterator[None]:
    """Point nnU-Net's preprocessed folder (read from the environment at each use) at the staging root."""
    saved = os.environ.get("nnUNet_preprocessed")
    os.environ["nnUNet_preprocessed"] = str(root)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("nnUNet_preprocessed", None)
        else:
            os.environ["nnUNet_preprocessed"] = saved


@dataclass(frozen=True)
class PreprocessedCases:
    """What a run trains on: the preprocessed cases (count, hash of the sorted ids) and the version of the folder."""

    count: int
    ids_sha256: str
    version: str | None = None
    data_folder: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_cases(task: str, raw: Path, data_folder: Path, what: str) -> PreprocessedCases:
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    expected = train_case_ids(raw)
    found = sorted(infer_dataset_class(str(data_folder)).get_identifiers(str(data_folder))) \
        if data_folder.is_dir() else []
    if found != expected:
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        detail = "; ".join(part for part in (
            f"missing {len(missing)}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}" if missing else "",
            f"not in the split {len(extra)}: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}" if extra
            else "") if part)
        raise SegbookError(f"{what} {len(found)} case(s) in {data_folder}, but the train split has {len(expected)} "
                           f"({detail}); run `segbook plan --task {task} --force` to preprocess it again")
    digest = hashlib.sha256("\n".join(found).encode()).hexdigest()
    return PreprocessedCases(len(found), digest, data_folder=str(data_folder))


def verify_preprocessed(dataset: str, paths: Paths, identifier: str = "nnUNetPlans",
                        task: str | None = None) -> PreprocessedCases:
    """Check, before training, that the preprocessed cases are exactly the train split's; SegbookError naming the
    command that repairs it otherwise. `dataset` is the nnU-Net folder name, `identifier` the plans' (`task`
    names the dataset in the advice)."""
    folder = paths.preprocessed / dataset
    plan = _read_record(folder).get("plans", {}).get(identifier, {})
    task = task or dataset
    if not plan.get("complete"):
        raise SegbookError(f"{dataset} is not preprocessed for {identifier} (no complete segbook plan record in "
                           f"{folder}); run `segbook plan --task {task}`")
    cases = _check_cases(task, paths.raw / dataset, folder / plan["data_identifier"],
                         f"{dataset}: the preprocessed data holds")
    if plan.get("cases") not in (None, cases.count) or plan.get("case_ids_sha256") not in (None, cases.ids_sha256):
        raise SegbookError(f"{dataset}: the preprocessed cases differ from those its plan record lists; run "
                           f"`segbook plan --task {task} --force`")
    return PreprocessedCases(cases.count, cases.ids_sha256, plan.get("version"), cases.data_folder)


def preprocessed_version(dataset: str, paths: Paths, identifier: str = "nnUNetPlans") -> str | None:
    """The version token of the current preprocessed folder: it changes when planning replaces the folder."""
    return _read_record(paths.preprocessed / dataset).get("plans", {}).get(identifier, {}).get("version")


def _run_nnunet(entry: DatasetEntry, planner: str, folder: Path, processes: int, force: bool, progress: bool,
                say: Callable[[str], None], fingerprint_samples: int | None) -> str:
    """nnU-Net's three stages through its Python classes; returns the preprocessed data folder's name."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    chosen = _planner(planner)
    class_name = chosen.nnunet_class.rpartition(":")[2] if chosen.nnunet_class else \
        CHECKPOINT_PLANNER if chosen.architecture is not None else REFERENCE_PLANNER
    if chosen.normalization is not None:
        class_name += f", normalising as the checkpoint did ({', '.join(dict.fromkeys(chosen.normalization[0]))})"
    identifier = chosen.plans
    name = entry.nnunet_name
    with _nnunet_output(folder / PLAN_LOG):
        if force or not (folder / "dataset_fingerprint.json").is_file():
            say(f"{name} [1/3] extracting the dataset fingerprint ({processes} process(es))")
            extractor = DatasetFingerprintExtractor(name, processes, verbose=False)
            extractor.show_progress_bar = progress
            if fingerprint_samples:
                extractor.num_foreground_voxels_for_intensitystats = fingerprint_samples
            extractor.run(overwrite_existing=True)
        say(f"{name} [2/3] planning with {class_name} ({identifier})")
        with _augmentation_workers_at_least_one():
            _make_planner(entry, planner).plan_experiment()
        manager = PlansManager(str(_plans_path(folder, identifier)))
        if CONFIGURATION not in manager.available_configurations:
            raise SegbookError(f"nnU-Net made no {CONFIGURATION} configuration for {name} (is the data 2-D?)")
        configuration = manager.get_configuration(CONFIGURATION)
        say(f"{name} [3/3] preprocessing {CONFIGURATION} ({processes} process(es))")
        preprocessor = configuration.preprocessor_class(verbose=False)
        preprocessor.show_progress_bar = progress
        preprocessor.run(name, CONFIGURATION, identifier, num_processes=processes)
    return configuration.data_identifier


def _make_planner(entry: DatasetEntry, planner: str):
    """The nnU-Net planner object of `planner`, for the task's dataset; normalising as a checkpoint did where the
    planner says so (`segbook.checkpoint_normalization`)."""
    chosen = _planner(planner)
    made = _make_base_planner(entry, chosen)
    if chosen.normalization is None:
        return made
    from segbook.checkpoint_normalization import normalised_like_checkpoint

    return normalised_like_checkpoint(made, chosen.plans, *chosen.normalization)


def _make_base_planner(entry: DatasetEntry, chosen: Planner):
    """The planner object of the class `chosen` names (at its own normalisation)."""
    if chosen.architecture is not None:
        from segbook.checkpoint_plans import checkpoint_planner

        return checkpoint_planner(entry.nnunet_name, chosen.plans, chosen.architecture)
    if chosen.nnunet_class is None:
        return reference_planner(entry, entry.nnunet_name, chosen.plans, zscore=chosen.zscore)
    module, _, class_name = chosen.nnunet_class.partition(":")
    return getattr(importlib.import_module(module), class_name)(entry.nnunet_name)


@contextlib.contextmanager
def _augmentation_workers_at_least_one():
    """nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for 0 (single-threaded
    augmentation, a valid training setting): plan with 1 and restore the user's value afterwards."""
    value = os.environ.get("nnUNet_n_proc_DA")
    if value != "0":
        yield
        return
    os.environ["nnUNet_n_proc_DA"] = "1"
    try:
        yield
    finally:
        os.environ["nnUNet_n_proc_DA"] = value


def _copy_ground_truth(entry: DatasetEntry, raw: Path, folder: Path) -> None:
    """nnU-Net validates against `gt_segmentations`; copy the training labels as its `preprocess` command does."""
    target = folder / "gt_segmentations"
    target.mkdir(parents=True, exist_ok=True)
    for label in sorted((raw / "labelsTr").glob(f"*{entry.file_ending}")):
        shutil.copyfile(label, target / label.name)


def _nnunet_version() -> str:
    from importlib.metadata import version

    return version("nnunetv2")
