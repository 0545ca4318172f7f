"""Evaluated run folders written without training: per-case metrics.csv consistent with its confusion counts (as
segbook's checks of evaluation files require), the summary.json segbook's evaluation derives from them (its own
`summarise_rows`, with its evaluation settings and the SHA-256 of metrics.csv), and a run.json as a finished run's
(settings, resolved recipe, plans summary, device and precision, the recorded fingerprint, a cost record and local
paths), for the results tests (cells, bundles, cost, lesions, evaluation files)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from segbook.evaluation.evaluate import CSV_COLUMNS, _json_safe, summarise_rows
from segbook.registry import Registry
from segbook.runs import RunSpec, identity_fields

COMPLETE = {"status": "finished", "epochs_completed": 1000, "epochs_planned": 1000, "complete": True}
#: Every helper case's image size in voxels (TP + FP + FN + TN of each of its rows).
VOXELS = 10**9


def label_row(case: str, label: int, name: str, dice: float | None, nsd: float, hd95: float,
              scale: int = 10**6, ratios: bool = True) -> dict[str, Any]:
    """A metrics.csv row as `segbook evaluate` writes it, consistent with its counts: TP and FP = FN over `scale`
    voxels give `dice` (to 1 / scale); identical masks (dice 1) have NSD 1 and HD95 0. `dice` None: the label is in
    neither mask (every metric NaN). `ratios`: with IoU, precision and recall (evaluations before them lack them)."""
    tp = 0 if dice is None else round(dice * scale)
    fp = fn = 0 if dice is None else scale - tp
    same = dice is not None and fp == 0
    nan = float("nan")
    row = {"case": case, "label": label, "label_name": name, "dice": nan if dice is None else dice,
           "nsd": nan if dice is None else 1.0 if same else nsd, "hd95": nan if dice is None else 0.0 if same else hd95,
           "tp": tp, "fp": fp, "fn": fn, "tn": VOXELS - tp - fp - fn, "reference_voxels": tp + fn,
           "prediction_voxels": tp + fp, "reference_volume_mm3": 1.5 * (tp + fn),
           "prediction_volume_mm3": 1.5 * (tp + fp)}
    if ratios:
        row.update(iou=nan if dice is None else tp / (tp + fp + fn), precision=nan if dice is None else tp / (tp + fp),
                   recall=nan if dice is None else tp / (tp + fn))
    return row


def case_rows(registry: Registry, task: str, mean_dice: float, cases: int, seed: int) -> list[dict[str, Any]]:
    """Per-case rows of every foreground label, Dice spread around `mean_dice`, lesion labels with lesion counts."""
    entry = registry.get(task)
    rng = np.random.default_rng(seed)
    rows = []
    for case in range(cases):
        for label in entry.foreground_labels:
            dice = float(np.clip(mean_dice + rng.uniform(-0.05, 0.05), 0.0, 1.0))
            scale = int(rng.integers(50, 500)) * 100_000
            lesion = label.kind == "lesion"
            reference = int(rng.integers(1, 4)) if lesion else None
            row = label_row(f"case_{case:03d}", label.index, label.name, dice, min(1.0, dice + 0.05),
                            float(rng.uniform(1, 9)), scale)
            rows.append({**row, "lesions_reference": reference,
                         "lesions_detected": int(rng.integers(0, reference + 1)) if lesion else None,
                         "lesions_false_positive": int(rng.integers(0, 3)) if lesion else None})
    return rows


def write_metrics(folder: Path, rows: list[dict[str, Any]], evaluation: str = "evaluation") -> None:
    """`evaluation/metrics.csv` (or `evaluation`'s, a path under the run folder) of these rows, with the columns
    they have in segbook's order."""
    columns = [column for column in CSV_COLUMNS if column in rows[0]]
    table = pd.DataFrame(rows, columns=columns)
    lesion_columns = [c for c in ("lesions_reference", "lesions_detected", "lesions_false_positive") if c in columns]
    table[lesion_columns] = table[lesion_columns].astype("Int64")
    (folder / evaluation).mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / evaluation / "metrics.csv", index=False)


#: What a finished run's `plans_summary` says (the demo's plans of a one-channel CT task).
PLANS_SUMMARY = {"patch_size": [20, 32, 32], "batch_size": 2, "spacing": [2.5, 1.5, 1.5],
                 "normalization": ["CTNormalization"], "plans_strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                 "input_channels": 1}
#: What `segbook evaluate` records of how it scored a run (its defaults, under the current conventions: metrics
#: version 2, HD95's worst case for one empty mask).
EVALUATION_SETTINGS = {"step_size": 0.5, "gaussian": True, "mirroring": True, "nsd_tolerance_mm": 2.0,
                       "empty_dice": "nan", "checkpoint": "checkpoint_final.pth", "checkpoint_mtime": 1.0,
                       "metrics_version": 2}
CHECKPOINT_SHA256 = "78812568" * 8


def run_manifest(spec: RunSpec, settings: dict[str, Any] | None = None, plans_summary: dict[str, Any] | None = None,
                 device: str = "cpu", cost: dict[str, Any] | None = None, fingerprinted: bool = True) -> dict[str, Any]:
    """A finished run's run.json as the trainer leaves it: the settings (`settings` replacing some) with the
    resolved recipe, device, effective precision, plans summary, the fingerprint recorded when training started
    (unless not `fingerprinted`: a run made before it existed), and local paths that a bundle export strips."""
    from dataclasses import asdict

    from segbook import fingerprint
    from segbook.recipes import get_recipe
    from segbook.training.settings import TrainingSettings

    given = {**({"weights": "/home/someone/weights/stunet.model", "weights_sha256": CHECKPOINT_SHA256}
                if spec.init == "pretrained" else {}), **(settings or {})}
    resolved, recipe = TrainingSettings(**given).resolve(get_recipe(spec.recipe, spec.init))
    manifest = {"schema": 2, "run": identity_fields(spec), "status": "finished",
                "settings": asdict(resolved), "recipe": recipe.model_dump(mode="json"),
                "epochs_done": resolved.epochs, "device": device,
                "precision": fingerprint.effective_precision(resolved.mixed_precision, device, True),
                "plans_summary": {**PLANS_SUMMARY, **(plans_summary or {})},
                "request": {"weights": "/home/someone/weights/stunet.model", "registry": "C:\\Users\\x\\r.yaml"},
                "events": [{"event": "pretrained_weights_loaded", "path": "~/weights/stunet.model"}],
                "error": {"type": "Oops", "traceback": "File \"/home/someone/x.py\""},
                **({"cost": cost} if cost is not None else {})}
    if fingerprinted:
        manifest[fingerprint.KEY] = fingerprint.record(manifest)
    return manifest


def write_evaluated_run(results: Path, registry: Registry, task: str, model: str, init: str, mean_dice: float,
                        split: str | None = None, cases: int = 6, cost: dict[str, Any] | None = None,
                        prediction_seconds_per_case: float | None = 2.0, seed: int = 0,
                        recipe: str | None = None, run_seed: int = 0, fold: str = "all", fraction: float = 1.0,
                        settings: dict[str, Any] | None = None, plans_summary: dict[str, Any] | None = None,
                        evaluation: dict[str, Any] | None = None, device: str = "cpu",
                        fingerprinted: bool = True, prediction: dict[str, Any] | None = None,
                        budget: int | None = None) -> Path:
    """A run folder as training and `segbook evaluate` leave it, with its per-case metrics (`seed`: of the cases'
    random spread; `run_seed`, `fold`, `fraction`: the run's). `settings` replace training settings (`{"epochs": 12}`),
    `plans_summary` what the plans made, `evaluation` the evaluation settings, `prediction` the prediction's cost
    record (default: on CUDA, `prediction_seconds_per_case`); `budget` the run's `_ep{E}` (and its epochs, unless
    `settings` say otherwise)."""
    entry = registry.get(task)
    spec = RunSpec.of(entry, model, init, fold, recipe=recipe, seed=run_seed, fraction=fraction, budget=budget)
    settings = {**({"epochs": budget} if budget else {}), **(settings or {})}
    folder = spec.folder(results)
    (folder / "evaluation").mkdir(parents=True)
    manifest = run_manifest(spec, settings, plans_summary, device, cost, fingerprinted)
    (folder / "run.json").write_text(json.dumps(manifest))
    rows = case_rows(registry, task, mean_dice, cases, seed)
    write_metrics(folder, rows)
    epochs = manifest["settings"]["epochs"]
    training = {**COMPLETE, "epochs_completed": epochs, "epochs_planned": epochs}
    summary = {"run": manifest["run"], "settings": {**EVALUATION_SETTINGS, **(evaluation or {})},
               **summarise_rows(rows, entry, cases), "training": training, "created_at": "2024-01-01T00:00:00",
               "cost": {"prediction": prediction or {"device": "cuda",
                                                     "seconds_per_case": prediction_seconds_per_case}},
               "metrics_sha256": sha256(folder / "evaluation" / "metrics.csv"),
               **({"split": {"sha256": split, "n_test": cases}} if split else {})}
    (folder / "evaluation" / "summary.json").write_text(json.dumps(_json_safe(summary)))
    return folder


def write_snapshot_evaluation(folder: Path, registry: Registry, task: str, epoch: int, mean_dice: float,
                              device_hours: float, cases: int = 6, seed: int = 0) -> Path:
    """A snapshot of the run in `folder` (made by `write_evaluated_run`) after `epoch` epochs, as training records
    it in run.json (with the compute spent by then, `device_hours`) and `segbook evaluate --snapshots` scores it
    into `snapshots/evaluation_ep{epoch}/`; its Dice spread around `mean_dice`. Returns the evaluation folder."""
    entry = registry.get(task)
    manifest = json.loads((folder / "run.json").read_text())
    budget = manifest["settings"]["epochs"]
    record = {"epoch": epoch, "percent": round(100 * epoch / budget), "budget_epochs": budget,
              "schedule_fraction": epoch / budget, "learning_rates": {"encoder": 0.01}, "learning_rate_decayed": False,
              "cost": {"device": "cuda", "devices": 1, "epochs": epoch, "device_hours": device_hours,
                       "gpu_hours": device_hours},
              "file": f"snapshots/snapshot_ep{epoch}.pth", "saved_at": "2024-01-01T00:00:00"}
    manifest["snapshots"] = sorted([*manifest.get("snapshots", []), record], key=lambda r: r["epoch"])
    (folder / "run.json").write_text(json.dumps(manifest))
    evaluation = f"snapshots/evaluation_ep{epoch}"
    rows = case_rows(registry, task, mean_dice, cases, seed)
    write_metrics(folder, rows, evaluation)
    summary = {"run": manifest["run"], "settings": {**EVALUATION_SETTINGS,
                                                    "checkpoint": f"snapshots/snapshot_ep{epoch}.pth"},
               **summarise_rows(rows, entry, cases),
               "training": {"status": "finished", "epochs_completed": epoch, "epochs_planned": budget,
                            "complete": False},
               "snapshot": {key: record[key] for key in ("epoch", "percent", "budget_epochs", "schedule_fraction",
                                                         "learning_rates", "learning_rate_decayed", "cost")},
               "created_at": "2024-01-01T00:00:00", "cost": {"prediction": {"device": "cuda", "seconds_per_case": 2}},
               "metrics_sha256": sha256(folder / evaluation / "metrics.csv")}
    (folder / evaluation / "summary.json").write_text(json.dumps(_json_safe(summary)))
    return folder / evaluation


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def gpu_cost(hours: float, peak_gib: float = 10.0) -> dict[str, Any]:
    """A run.json cost record of a run trained `hours` on one GPU."""
    return {"device": "cuda", "devices": 1, "device_hours": hours, "gpu_hours": hours,
            "peak_memory_bytes": int(peak_gib * 2**30), "samples_per_second": 20.0}


def reevaluate(folder: Path, registry: Registry, task: str, rows: list[dict[str, Any]], **changes: Any) -> None:
    """Write `rows` as the run's metrics.csv, and summary.json's means, counts and SHA-256 from them (plus `changes`),
    as `segbook evaluate` on these rows would, or a forger who knows the format."""
    entry = registry.get(task)
    write_metrics(folder, rows)
    summary_file = folder / "evaluation" / "summary.json"
    summary = json.loads(summary_file.read_text())
    summary.update(summarise_rows(rows, entry, len({row["case"] for row in rows})),
                   metrics_sha256=sha256(folder / "evaluation" / "metrics.csv"), **changes)
    summary_file.write_text(json.dumps(_json_safe(summary)))


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    """A run's metrics.csv rows as numbers (NaN where empty)."""
    table = pd.read_csv(folder / "evaluation" / "metrics.csv", dtype={"case": str})
    return [{key: (None if pd.isna(value) and key.startswith("lesions_") else value) for key, value in row.items()}
            for row in table.to_dict("records")]
