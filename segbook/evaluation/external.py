"""External validation: a run trained on dataset A scored on dataset B, which it never saw.

The run's checkpoint predicts B's raw images (its test split, or every labelled case with `all_cases`) through
nnU-Net's predictor, which preprocesses them with A's plans (A's normalisation and spacing: what a deployed model
would do with another hospital's scans); B's labels and the prediction are then both mapped onto the structures the
two datasets share (`segbook.structures`: registry names, or a user's label map, both recorded) and scored with the
metrics and summaries of internal evaluation, under A's label id per structure. Everything that refuses (no shared
structure, different channels without a channel map, a bad label map or channel map, an untrained run, missing data)
refuses before anything is predicted. A channel map (`channels`) feeds the run the tested dataset's image files of
the named channels, in the trained dataset's channel order. The scores go to their own folder
(`segbook.runs.external_folder`), written as one directory rename: a killed evaluation leaves nothing a table reads,
and nothing that reads a run's own scores ever looks there.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from segbook import claims
from segbook.evaluation.evaluate import (EvaluationError, EvaluationResult, TestCase, _predict, _score, _write,
                                         prediction_threads, summarise_rows, test_cases, torch_threads, trained_run,
                                         training_record)
from segbook.evaluation.files import METRICS_VERSION, EvaluationFileError, read_json
from segbook.evaluation.settings import EvaluationSettings
from segbook.io import atomic_directory, now, sweep_leftovers
from segbook.paths import Paths
from segbook.runs import METRICS, SUMMARY, RunSpec, external_folder, external_root, identity_fields
from segbook.structures import LabelMap, Pairing, pair
from segbook.training.cost import measured_prediction

if TYPE_CHECKING:
    from segbook.registry import DatasetEntry

#: The hidden folder predictions are made in, beside the external evaluations (never read by a table).
PREDICTING = ".predicting-"


def labelled_cases(entry: "DatasetEntry", paths: Paths, all_cases: bool) -> list[TestCase]:
    """The tested dataset's cases: its test split, and with `all_cases` its training cases too (a run trained on
    another dataset saw none of them)."""
    from segbook.data.folders import raw_folder

    cases = test_cases(entry, paths)
    if not all_cases:
        return cases
    raw = raw_folder(entry, paths)
    for label in sorted((raw / "labelsTr").glob(f"*{entry.file_ending}")):
        case = label.name[: -len(entry.file_ending)]
        images = [raw / "imagesTr" / f"{case}_{c:04d}{entry.file_ending}" for c in range(len(entry.channels))]
        missing = [str(p) for p in images if not p.is_file()]
        if missing:
            raise EvaluationError(f"case {case} of {entry.key}: image file(s) missing: {', '.join(missing)}")
        cases.append(TestCase(case, images, label))
    return sorted(cases, key=lambda c: c.case)


def mapped_channels(cases: list[TestCase], channel_map: Sequence[int] | None) -> list[TestCase]:
    """Each case with the image files (CASE_0000, CASE_0001, ...) of the mapped channels, in the run's order."""
    if channel_map is None:
        return cases
    return [replace(case, images=[case.images[index] for index in channel_map]) for case in cases]


def evaluate_external(trained: "DatasetEntry", spec: RunSpec, tested: "DatasetEntry", paths: Paths | None = None,
                      settings: EvaluationSettings = EvaluationSettings(), *, label_map: LabelMap | None = None,
                      all_cases: bool = False, device: str | None = None, num_processes: int = 1,
                      keep_predictions: bool = False, force: bool = False, run_folder: Path | None = None,
                      threads: int | None = None, channels: Sequence[str] | None = None) -> EvaluationResult:
    """Score the run `spec` (trained on `trained`) on `tested`; skipped when scored so already. Predictions, kept,
    are in A's label ids (all of A's labels, the unshared ones too). `threads` as for `evaluate_run`; `channels`:
    which of B's channels the run reads as A's (`segbook.structures.channel_map`), recorded with the pairing, so
    that scores under another map (or none) are not up to date."""
    from segbook.devices import resolve_device

    pairing = pair(trained, tested, label_map, channels)
    pairing.require_usable()
    paths = paths or Paths.from_env()
    paths.export()
    run_folder = Path(run_folder) if run_folder is not None else spec.folder(paths.results)
    manifest, checkpoint = trained_run(run_folder, settings)
    cases = mapped_channels(labelled_cases(tested, paths, all_cases), pairing.channel_map)
    device = resolve_device(device)
    tolerance = settings.nsd_tolerance_mm or tested.nsd_tolerance_mm
    resolved = asdict(settings) | {"nsd_tolerance_mm": tolerance, "metrics_version": METRICS_VERSION}
    record = {**pairing.record(), "cases": "all" if all_cases else "test",
              "case_ids": [case.case for case in cases]}
    out = external_folder(run_folder, tested.key, all_cases)
    with claims.exclusive(paths.claims, spec.job_id, f"run {run_folder}"):
        sweep_leftovers(out)  # what a killed evaluation of this folder left beside it
        for stale in external_root(run_folder).glob(f"{PREDICTING}*"):  # predictions of a killed one (the claim
            shutil.rmtree(stale, ignore_errors=True)                  # is held: no live writer)
        if not force and _up_to_date(out, resolved, checkpoint, record):
            return EvaluationResult(out, read_json(out / SUMMARY), skipped=True)
        predictions = external_root(run_folder) / f"{PREDICTING}{out.name}"
        try:
            with torch_threads(threads), measured_prediction(device, len(cases), prediction_threads()) as cost:
                _predict(spec, cases, settings, device, num_processes, run_folder, predictions)
            rows = _score(cases, predictions, pairing.scoring_entry(), tolerance, settings.empty_dice,
                          num_processes, remap=pairing.remap, prediction_ending=trained.file_ending)
            summary = _summary(rows, pairing, spec, resolved, checkpoint, record, len(cases))
            summary |= {"cost": {"prediction": cost}, "training": training_record(manifest)}
            with atomic_directory(out, replace=True) as partial:
                _write(partial, rows, summary)
                if keep_predictions:
                    shutil.copytree(predictions, partial / "predictions",
                                    ignore=shutil.ignore_patterns("*.json"))
        finally:
            shutil.rmtree(predictions, ignore_errors=True)
    return EvaluationResult(out, summary)


def _summary(rows: list[dict[str, Any]], pairing: Pairing, spec: RunSpec, settings: dict[str, Any],
             checkpoint: Path, record: dict[str, Any], num_cases: int) -> dict[str, Any]:
    return {"run": identity_fields(spec), "settings": {**settings, "checkpoint_mtime": checkpoint.stat().st_mtime},
            **summarise_rows(rows, pairing.scoring_entry(), num_cases), "external": record, "created_at": now()}


def _up_to_date(out: Path, settings: dict[str, Any], checkpoint: Path, record: dict[str, Any]) -> bool:
    """Scored with these settings, this checkpoint, these structures (label map included) and these cases."""
    try:
        summary = read_json(out / SUMMARY)
        recorded = summary.get("settings") or {}
        return ((out / METRICS).is_file() and {k: recorded.get(k) for k in settings} == settings
                and recorded.get("checkpoint_mtime") == checkpoint.stat().st_mtime
                and json.dumps(summary.get("external"), sort_keys=True) == json.dumps(record, sort_keys=True))
    except (OSError, EvaluationFileError, AttributeError):
        return False
