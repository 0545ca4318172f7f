"""Evaluated run folders written without training: per-case metrics.csv consistent with its confusion counts (as
segbook's checks of evaluation files require), the summary.json segbook's evaluation derives from them (its own
`summarise_rows`, with the SHA-256 of metrics.csv), a run.json with a cost record and local paths, for the results
tests (bundles, cost, lesions)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from segbook.evaluation.evaluate import CSV_COLUMNS, _json_safe, summarise_rows
from segbook.registry import Registry
from segbook.runs import RunSpec

COMPLETE = {"status": "finished", "epochs_completed": 1000, "epochs_planned": 1000, "complete": True}
#: Settings of an evaluation under the current conventions (metrics version 2: HD95's worst case for one empty mask).
SETTINGS = {"checkpoint": "checkpoint_final.pth", "empty_dice": "nan", "metrics_version": 2}
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


def write_metrics(folder: Path, rows: list[dict[str, Any]]) -> None:
    """`evaluation/metrics.csv` of these rows, with the columns they have in segbook's order."""
    columns = [column for column in CSV_COLUMNS if column in rows[0]]
    table = pd.DataFrame(rows, columns=columns)
    lesion_columns = [c for c in ("lesions_reference", "lesions_detected", "lesions_false_positive") if c in columns]
    table[lesion_columns] = table[lesion_columns].astype("Int64")
    (folder / "evaluation").mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / "evaluation" / "metrics.csv", index=False)


def write_evaluated_run(results: Path, registry: Registry, task: str, model: str, init: str, mean_dice: float,
                        split: str | None = None, cases: int = 6, cost: dict[str, Any] | None = None,
                        prediction_seconds_per_case: float | None = 2.0, seed: int = 0,
                        recipe: str | None = None) -> Path:
    """A run folder as training and `segbook evaluate` leave it (fold all), with its per-case metrics."""
    entry = registry.get(task)
    spec = RunSpec.of(entry, model, init, "all", recipe=recipe)
    folder = spec.folder(results)
    (folder / "evaluation").mkdir(parents=True)
    run = {"task": spec.task, "dataset": spec.dataset, "model": model, "init": init, "recipe": spec.recipe,
           "seed": spec.seed, "fraction": spec.fraction, "fold": "all", "trainer": spec.trainer, "plans": spec.plans}
    manifest = {"schema": 2, "run": run, "status": "finished", "epochs_done": 1000,
                "request": {"weights": "/home/someone/weights/stunet.model", "registry": "C:\\Users\\x\\r.yaml"},
                "events": [{"event": "pretrained_weights_loaded", "path": "~/weights/stunet.model"}],
                "error": {"type": "Oops", "traceback": "File \"/home/someone/x.py\""},
                **({"cost": cost} if cost is not None else {})}
    (folder / "run.json").write_text(json.dumps(manifest))
    rows = case_rows(registry, task, mean_dice, cases, seed)
    write_metrics(folder, rows)
    summary = {"run": run, "settings": SETTINGS, **summarise_rows(rows, entry, cases),
               "training": COMPLETE, "created_at": "2024-01-01T00:00:00",
               "cost": {"prediction": {"device": "cuda", "seconds_per_case": prediction_seconds_per_case}},
               "metrics_sha256": sha256(folder / "evaluation" / "metrics.csv"),
               **({"split": {"sha256": split, "n_test": cases}} if split else {})}
    (folder / "evaluation" / "summary.json").write_text(json.dumps(_json_safe(summary)))
    return folder


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
