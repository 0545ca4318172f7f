"""Evaluate a trained run on its dataset's held-out test split: nnU-Net's sliding-window prediction, then metrics.

Writes `evaluation/metrics.csv` (one row per case and label) and `evaluation/summary.json` (per-label means, the
run's score and the test split it was scored on, with its SHA-256) into the run folder, atomically; `summary.json`
is written last, so its presence means "evaluated". A run is never scored on a test split other than the one it was
trained beside: its cases may have been in the run's training data.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from segbook import claims
from segbook.errors import SegbookError
from segbook.evaluation.files import (CSV_COLUMNS, LESION_COLUMNS, METRIC_COLUMNS, METRICS_VERSION,
                                     EvaluationFileError, file_sha256, read_json)
from segbook.evaluation.lesions import lesion_summary
from segbook.evaluation.metrics import case_metrics, mean_ignoring_nan
from segbook.evaluation.settings import EvaluationSettings
from segbook.training.cost import measured_prediction
from segbook.io import atomic_directory, atomic_path, atomic_write_json, now
from segbook.options import Bound
from segbook.paths import Paths
from segbook.processes import bind_to_parent
from segbook.training.manifest import RunManifest
from segbook.runs import (CONFIGURATION, METRICS, SUMMARY, RunSpec, evaluation_folder, identity_fields,
                          require_recorded_backbone, summary_path)

if TYPE_CHECKING:
    import numpy as np

    from segbook.registry import DatasetEntry

PROCESSES = Bound("--num-processes", int, low=1)
#: (scored label, the reference labels that are it, the predicted labels that are it), per scored label; None: the
#: label files' own ids are scored.
Remap = tuple[tuple[int, tuple[int, ...], tuple[int, ...]], ...] | None


class EvaluationError(SegbookError):
    """A run that cannot be evaluated: not trained, or test data missing."""


@dataclass(frozen=True)
class TestCase:
    case: str
    images: list[Path]
    label: Path


@dataclass
class EvaluationResult:
    folder: Path
    summary: dict[str, Any]
    skipped: bool = False

    @property
    def score(self) -> float:
        return self.summary["foreground_mean"]["dice"]


def test_cases(entry: "DatasetEntry", paths: Paths) -> list[TestCase]:
    """The held-out cases of the imported dataset: `labelsTs` with their `imagesTs` channels."""
    from segbook.data.folders import raw_folder

    raw = raw_folder(entry, paths)
    labels = sorted((raw / "labelsTs").glob(f"*{entry.file_ending}"))
    if not labels:
        raise EvaluationError(f"no test cases in {raw / 'labelsTs'}: import the dataset with "
                              f"`segbook data import --task {entry.key} --from PATH` first")
    cases = []
    for label in labels:
        case = label.name[: -len(entry.file_ending)]
        images = [raw / "imagesTs" / f"{case}_{c:04d}{entry.file_ending}" for c in range(len(entry.channels))]
        missing = [str(p) for p in images if not p.is_file()]
        if missing:
            raise EvaluationError(f"test case {case}: image file(s) missing: {', '.join(missing)}")
        cases.append(TestCase(case, images, label))
    return cases


def evaluate_run(entry: "DatasetEntry", spec: RunSpec, paths: Paths | None = None,
                 settings: EvaluationSettings = EvaluationSettings(), *, device: str | None = None,
                 num_processes: int = 1, keep_predictions: bool = False, force: bool = False,
                 run_folder: Path | None = None, threads: int | None = None,
                 snapshot: int | None = None) -> EvaluationResult:
    """Predict the test split with the run's final checkpoint and score every case and label.

    The run is `spec`'s folder under the results folder, or `run_folder` when given (a run copied elsewhere).
    `device` None picks cuda, else mps, else cpu. `threads`: torch's intra-op threads while predicting (None: as
    they are); the summary's cost records the threads the prediction used (`prediction_threads`). `snapshot`: score
    instead the run's snapshot after that many epochs (`run_snapshots` lists them) into its own folder
    (`segbook.runs.snapshot_evaluation_folder`), its summary saying which point of the budget it is (`snapshot`)
    and that its rate had not decayed.
    """
    from segbook.devices import resolve_device

    PROCESSES.check(num_processes)
    if threads is not None and not (isinstance(threads, int) and threads >= 1):
        raise EvaluationError(f"threads must be a positive integer, not {threads!r}")
    paths = paths or Paths.from_env()
    paths.export()
    run_folder = Path(run_folder) if run_folder is not None else spec.folder(paths.results)
    if snapshot is not None:  # a snapshot of a run still training, or stopped, is scored as well
        require_recorded_backbone(run_folder)
        with torch_threads(threads):
            return _evaluate_snapshot(entry, spec, paths, settings, device, num_processes, keep_predictions, force,
                                      run_folder, RunManifest.load(run_folder), snapshot)
    manifest, checkpoint = trained_run(run_folder, settings)
    split = _test_split(entry, paths, manifest, run_folder)
    device = resolve_device(device)
    tolerance = settings.nsd_tolerance_mm or entry.nsd_tolerance_mm
    # the conventions' version is a setting: `segbook evaluate` redoes a summary written under older ones
    resolved = asdict(settings) | {"nsd_tolerance_mm": tolerance, "metrics_version": METRICS_VERSION}
    out = evaluation_folder(run_folder)
    # Two evaluations of one run would write into each other's predictions: hold the run's claim.
    with claims.exclusive(paths.claims, spec.job_id, f"run {run_folder}"):
        if not force and _up_to_date(out, resolved, checkpoint, split):
            return EvaluationResult(out, json.loads(summary_path(run_folder).read_text()), skipped=True)
        with torch_threads(threads):
            return _evaluate(entry, spec, paths, settings, device, num_processes, keep_predictions, run_folder,
                             manifest, resolved, split)


def run_snapshots(run_folder: Path) -> list[dict[str, Any]]:
    """The snapshots a run's run.json records whose files are there, by epoch (none for a run without)."""
    from segbook.training.trainer_parts.snapshots import recorded

    manifest = RunManifest.load(run_folder)
    return recorded(manifest.data, run_folder) if manifest is not None else []


def _evaluate_snapshot(entry: "DatasetEntry", spec: RunSpec, paths: Paths, settings: EvaluationSettings,
                       device: str | None, num_processes: int, keep_predictions: bool, force: bool,
                       run_folder: Path, manifest: RunManifest | None, epoch: int) -> EvaluationResult:
    """`evaluate_run` of the snapshot after `epoch` epochs: its file as the checkpoint (a setting, so an evaluation
    of another file is redone), its own output folder, and what it is in the summary."""
    from dataclasses import replace

    from segbook.devices import resolve_device
    from segbook.runs import snapshot_evaluation_folder, snapshot_path

    record = next((r for r in run_snapshots(run_folder) if r["epoch"] == epoch), None)
    if record is None:
        raise EvaluationError(f"cannot evaluate the snapshot after epoch {epoch} of {run_folder}: its run.json "
                              f"records none there with its file in {snapshot_path(run_folder, epoch).parent}")
    settings = replace(settings, checkpoint=str(snapshot_path(Path(), epoch)))
    split = _test_split(entry, paths, manifest, run_folder)
    device = resolve_device(device)
    resolved = asdict(settings) | {"nsd_tolerance_mm": settings.nsd_tolerance_mm or entry.nsd_tolerance_mm,
                                   "metrics_version": METRICS_VERSION}
    out = snapshot_evaluation_folder(run_folder, epoch)
    with claims.exclusive(paths.claims, spec.job_id, f"run {run_folder}"):
        if not force and _up_to_date(out, resolved, run_folder / settings.checkpoint, split):
            return EvaluationResult(out, json.loads((out / SUMMARY).read_text()), skipped=True)
        return _evaluate(entry, spec, paths, settings, device, num_processes, keep_predictions, run_folder,
                         manifest, resolved, split, snapshot=record)


def trained_run(run_folder: Path, settings: EvaluationSettings) -> tuple[RunManifest | None, Path]:
    """The run's manifest and final checkpoint, refused unless it finished training."""
    require_recorded_backbone(run_folder)
    manifest = RunManifest.load(run_folder)
    checkpoint = run_folder / settings.checkpoint
    if not checkpoint.is_file() or (manifest is not None and manifest.status != "finished"):
        state = f"its status is {manifest.status}" if manifest else "it has not been trained"
        raise EvaluationError(f"cannot evaluate {run_folder}: it has not finished training ({state}"
                              f"{'' if checkpoint.is_file() else f', no {settings.checkpoint}'}); train it with "
                              "`segbook finetune` first")
    return manifest, checkpoint


def _test_split(entry: "DatasetEntry", paths: Paths, manifest: RunManifest | None,
                run_folder: Path) -> dict[str, Any] | None:
    """The dataset's test split (its record), refused when the run was trained beside another one."""
    from segbook.data.folders import raw_folder
    from segbook.data.split import read_split

    split = read_split(raw_folder(entry, paths))
    trained = ((manifest.data.get("split") if manifest else None) or {}).get("sha256")
    if split is not None and trained not in (None, split.sha256):
        raise EvaluationError(f"cannot evaluate {run_folder}: it was trained beside the test split {trained}, but "
                              f"{entry.key}'s test split is now {split.sha256} (imported again with another split?); "
                              "its new test cases may be among those it trained on. Train it again with --overwrite")
    return None if split is None else split.record()


def _evaluate(entry: "DatasetEntry", spec: RunSpec, paths: Paths, settings: EvaluationSettings, device: str,
              num_processes: int, keep_predictions: bool, run_folder: Path, manifest: RunManifest | None,
              resolved: dict[str, Any], split: dict[str, Any] | None,
              snapshot: dict[str, Any] | None = None) -> EvaluationResult:
    """Predict, score and write (a `snapshot` record: that snapshot, into its own folder); the caller holds the
    run's claim."""
    from segbook.runs import snapshot_evaluation_folder

    out = evaluation_folder(run_folder) if snapshot is None else snapshot_evaluation_folder(run_folder,
                                                                                            snapshot["epoch"])
    cases = test_cases(entry, paths)
    with measured_prediction(device, len(cases), prediction_threads()) as cost:
        predictions = _predict(spec, cases, settings, device, num_processes, run_folder,
                               out / ".predictions.partial", snapshot is not None)
    try:
        rows = _score(cases, predictions, entry, resolved["nsd_tolerance_mm"], settings.empty_dice, num_processes)
        summary = _summarise(rows, entry, spec, resolved, run_folder / settings.checkpoint, len(cases))
        summary["cost"] = {"prediction": cost}
        summary["training"] = training_record(manifest) if snapshot is None else snapshot_training(manifest, snapshot)
        if snapshot is not None:
            summary["snapshot"] = snapshot_summary(snapshot)
        summary["split"] = split
        _write(out, rows, summary)
        if keep_predictions:
            with atomic_directory(out / "predictions", replace=True) as kept:
                for case in cases:
                    shutil.copy2(predictions / f"{case.case}{entry.file_ending}", kept)
    finally:
        shutil.rmtree(predictions, ignore_errors=True)
    return EvaluationResult(out, summary)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch computes with `threads` intra-op threads inside the block (None: as it does), as before after it."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def prediction_threads() -> int:
    """The intra-op threads nnU-Net's predictor computes the network with: torch's, which it caps at its
    `default_num_processes` (nnUNet_def_n_proc, 8 unless set) while predicting."""
    import torch
    from nnunetv2.configuration import default_num_processes

    return min(torch.get_num_threads(), default_num_processes)


def spec_from_folder(run_folder: Path) -> RunSpec:
    """The run a folder holds, from its `run.json` (so `segbook evaluate --run DIR` needs nothing else, the
    user's backbone it recorded included)."""
    require_recorded_backbone(run_folder)
    try:
        manifest = RunManifest.load(run_folder)
        return RunSpec.from_record(manifest.data["run"] if manifest is not None else {})
    except (KeyError, TypeError, ValueError, AttributeError, SegbookError):
        raise EvaluationError(f"{run_folder} is not a segbook run folder (no run.json naming its task, dataset, "
                              "model, initialisation and fold)") from None


def training_record(manifest: RunManifest | None) -> dict[str, Any]:
    """How much of its budget the evaluated run trained: the results tables leave out runs that stopped short."""
    if manifest is None:
        return {"status": "unknown", "epochs_completed": None, "epochs_planned": None, "complete": False}
    completed, planned = len(manifest.data.get("epochs", [])), manifest.settings.epochs
    return {"status": manifest.status, "epochs_completed": completed, "epochs_planned": planned,
            "complete": manifest.status == "finished" and completed >= planned}


def snapshot_training(manifest: RunManifest | None, snapshot: dict[str, Any]) -> dict[str, Any]:
    """A snapshot's `training` record: the epochs its network had trained of the budget (never complete)."""
    return {"status": manifest.status if manifest is not None else "unknown", "epochs_completed": snapshot["epoch"],
            "epochs_planned": snapshot.get("budget_epochs"), "complete": False}


def snapshot_summary(snapshot: dict[str, Any]) -> dict[str, Any]:
    """What a snapshot's summary says it is: its epoch, percent and fraction of the budget's schedule, its rates,
    and that they had not decayed (a point of a longer schedule, not a run of that many epochs)."""
    keys = ("epoch", "percent", "budget_epochs", "schedule_fraction", "learning_rates", "cost", "file")
    return {**{key: snapshot.get(key) for key in keys}, "learning_rate_decayed": False}


def _up_to_date(out: Path, settings: dict[str, Any], checkpoint: Path, split: dict[str, Any] | None) -> bool:
    """Evaluated, both files there, with these settings (the metrics' conventions among them), this checkpoint and
    this test split (summaries written before the split was recorded are not redone for it)."""
    try:
        summary = read_json(out / SUMMARY)
        recorded = summary.get("settings") or {}
        return ((out / METRICS).is_file() and {k: recorded.get(k) for k in settings} == settings
                and recorded.get("checkpoint_mtime") == checkpoint.stat().st_mtime
                and (summary.get("split") or {}).get("sha256") in (None, (split or {}).get("sha256")))
    except (OSError, EvaluationFileError, AttributeError):  # none, or damaged: evaluate (again)
        return False


def _predict(spec: RunSpec, cases: list[TestCase], settings: EvaluationSettings, device: str, num_processes: int,
             run_folder: Path, folder: Path, snapshot: bool = False) -> Path:
    """Predict `cases` with the run's checkpoint (its snapshot's: `snapshot`) into `folder`; nnU-Net's predictor
    preprocesses each raw image with the run's own plans, whichever dataset it comes from."""
    import torch

    predictor = _predictor(spec, settings, torch.device(device), run_folder, snapshot)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    inputs = [[str(p) for p in case.images] for case in cases]
    outputs = [str(folder / case.case) for case in cases]
    with _fp16_prediction():
        if num_processes > 1:
            predictor.predict_from_files(inputs, outputs, num_processes_preprocessing=num_processes,
                                         num_processes_segmentation_export=num_processes)
        else:
            predictor.predict_from_files_sequential(inputs, outputs)
    return folder


@contextlib.contextmanager
def _fp16_prediction() -> Iterator[None]:
    """nnU-Net's predictor autocasts on CUDA in the process's autocast dtype, which a bf16 training run in the same
    process (a batch worker trains, then evaluates) leaves at bf16: pin nnU-Net's fp16 for the prediction, so that
    a run's scores do not depend on which process evaluated it."""
    import torch

    before = torch.get_autocast_dtype("cuda")
    torch.set_autocast_dtype("cuda", torch.float16)
    try:
        yield
    finally:
        torch.set_autocast_dtype("cuda", before)


def _predictor(spec: RunSpec, settings: EvaluationSettings, device, run_folder: Path, snapshot: bool = False):
    """nnU-Net's predictor for the run's checkpoint, set up from safely read weights.

    nnU-Net's own `initialize_from_trained_model_folder` unpickles the checkpoint and builds whichever trainer
    class the file names; here the file is read safely, the network comes from the run's own trainer (its
    identity, not the file, says which) and its plans, and the weights must fit it exactly.
    """
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from segbook.runs import snapshot_epoch
    from segbook.training.checkpoints import read_run_checkpoint, read_snapshot
    from segbook.training.trainers import trainer_class, unwrap

    checkpoint = (read_snapshot if snapshot else read_run_checkpoint)(run_folder / settings.checkpoint)
    if snapshot and checkpoint["segbook_snapshot"]["epoch"] != snapshot_epoch(run_folder / settings.checkpoint):
        raise EvaluationError(f"{run_folder / settings.checkpoint} holds the snapshot of epoch "
                              f"{checkpoint['segbook_snapshot']['epoch']}, not the one its name says")
    if checkpoint["trainer_name"] != spec.trainer:
        raise EvaluationError(f"{run_folder / settings.checkpoint} was written by {checkpoint['trainer_name']!r}, "
                              f"not by this run's trainer {spec.trainer}")
    trainer_folder = run_folder.parent
    plans = PlansManager(json.loads((trainer_folder / "plans.json").read_text()))
    dataset_json = json.loads((trainer_folder / "dataset.json").read_text())
    configuration = plans.get_configuration(CONFIGURATION)
    network = trainer_class(spec.trainer).build_network_architecture(
        plans, configuration, determine_num_input_channels(plans, configuration, dataset_json),
        plans.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
    try:
        network.load_state_dict(checkpoint["network_weights"])
    except RuntimeError as error:
        raise EvaluationError(f"{run_folder / settings.checkpoint} does not fit the run's network: "
                              f"{str(error).splitlines()[0]}") from None
    predictor = nnUNetPredictor(tile_step_size=settings.step_size, use_gaussian=settings.gaussian,
                                use_mirroring=settings.mirroring, device=device,
                                perform_everything_on_device=device.type == "cuda", allow_tqdm=True)
    predictor.manual_initialization(network, plans, configuration, [checkpoint["network_weights"]], dataset_json,
                                    spec.trainer, checkpoint.get("inference_allowed_mirroring_axes"))
    if device.type != "cuda":  # nnU-Net's trainer compiles on CUDA only, its predictor wherever nnUNet_compile says
        predictor.network = unwrap(predictor.network)
    return predictor


def _score(cases: list[TestCase], predictions: Path, entry: "DatasetEntry", tolerance: float, empty_dice: str,
           num_processes: int, remap: Remap = None, prediction_ending: str | None = None) -> list[dict[str, Any]]:
    """Every case's metrics for `entry`'s foreground labels; with `remap` (external evaluation), each of those
    labels is the union of some reference labels and of some predicted labels (`Remap`). Predictions are named
    `{case}{prediction_ending}` (default: the label file's name)."""
    from tqdm import tqdm

    labels = [label.index for label in entry.foreground_labels]
    lesions = [label.index for label in entry.foreground_labels if label.kind == "lesion"]
    jobs = [(case.case, str(case.label),
             str(predictions / (case.case + prediction_ending if prediction_ending else case.label.name)),
             labels, tolerance, empty_dice, lesions, remap) for case in cases]
    names = {label.index: label.name for label in entry.labels}
    if num_processes > 1:
        with ProcessPoolExecutor(num_processes, mp_context=get_context("spawn"), initializer=bind_to_parent,
                                 initargs=(os.getpid(),)) as pool:  # they end with this process, even killed
            results = list(tqdm(pool.map(_score_case, jobs), total=len(jobs), desc="metrics", unit="case"))
    else:
        results = [_score_case(job) for job in tqdm(jobs, desc="metrics", unit="case")]
    return [{"case": case, **row, "label_name": names[row["label"]]} for case, rows in results for row in rows]


def _score_case(job: tuple) -> tuple[str, list[dict[str, Any]]]:
    import SimpleITK as sitk

    case, label_file, prediction_file, labels, tolerance, empty_dice, lesions, remap = job
    reference = sitk.ReadImage(label_file)
    prediction = sitk.ReadImage(prediction_file)
    spacing = reference.GetSpacing()[::-1]  # SimpleITK is (x, y, z); arrays are (z, y, x)
    reference_array, prediction_array = sitk.GetArrayFromImage(reference), sitk.GetArrayFromImage(prediction)
    if remap is not None:
        reference_array, prediction_array = remapped(reference_array, prediction_array, remap)
    rows = case_metrics(reference_array, prediction_array, labels, spacing, tolerance, empty_dice, lesions)
    return case, rows


def remapped(reference: np.ndarray, prediction: np.ndarray, remap: Remap) -> tuple[np.ndarray, np.ndarray]:
    """Reference and prediction in the scored labels' ids; every label `remap` does not name is background."""
    import numpy as np

    reference_out = np.zeros(reference.shape, dtype=np.int16)
    prediction_out = np.zeros(prediction.shape, dtype=np.int16)
    for scored, reference_labels, predicted_labels in remap:
        reference_out[np.isin(reference, reference_labels)] = scored
        prediction_out[np.isin(prediction, predicted_labels)] = scored
    return reference_out, prediction_out


def summarise_rows(rows: list[dict[str, Any]], entry: "DatasetEntry", num_cases: int) -> dict[str, Any]:
    """Per-label means over the cases (NaN-ignoring), their mean over labels (the run's score) and, for datasets
    with lesion labels, lesion detection pooled over cases: per lesion label in `labels`, over all of them in
    `lesions` (None without lesion labels). Each label says over how many cases each mean is (`scored_cases`; the
    others are undefined there: reference and prediction both empty), so that tables can say what they leave out.
    """
    per_label = {}
    for label in entry.foreground_labels:
        mine = [r for r in rows if r["label"] == label.index]
        scored = {m: sum(1 for r in mine if not math.isnan(r[m])) for m in METRIC_COLUMNS}
        per_label[str(label.index)] = {"name": label.name,
                                       **{m: mean_ignoring_nan(r[m] for r in mine) for m in METRIC_COLUMNS},
                                       "valid_cases": scored["dice"], "scored_cases": scored}
        if label.kind == "lesion":
            per_label[str(label.index)].update(lesion_summary(mine, num_cases))
    foreground = {m: mean_ignoring_nan(v[m] for v in per_label.values()) for m in METRIC_COLUMNS}
    lesion_indices = {label.index for label in entry.foreground_labels if label.kind == "lesion"}
    lesion_rows = [r for r in rows if r["label"] in lesion_indices]
    return {"num_cases": num_cases, "labels": per_label, "foreground_mean": foreground,
            "lesions": lesion_summary(lesion_rows, num_cases) if lesion_indices else None}


def _summarise(rows: list[dict[str, Any]], entry: "DatasetEntry", spec: RunSpec, settings: dict[str, Any],
               checkpoint: Path, num_cases: int) -> dict[str, Any]:
    return {"run": identity_fields(spec), "settings": {**settings, "checkpoint_mtime": checkpoint.stat().st_mtime},
            **summarise_rows(rows, entry, num_cases), "created_at": now()}


def _write(out: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    import pandas as pd

    table = pd.DataFrame(rows, columns=list(CSV_COLUMNS))
    table[list(LESION_COLUMNS)] = table[list(LESION_COLUMNS)].astype("Int64")  # counts, empty where not a lesion
    with atomic_path(out / METRICS) as tmp:
        table.to_csv(tmp, index=False)
    summary["metrics_sha256"] = file_sha256(out / METRICS)  # ties the summary to these very rows
    atomic_write_json(out / SUMMARY, _json_safe(summary))


def _json_safe(value: Any) -> Any:
    """NaN is not JSON: write null, which readers turn back into NaN."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and value != value:
        return None
    return value
