"""Evaluated run folders written without training: per-case metrics.csv, the summary.json segbook's evaluation
derives from them (its own `summarise_rows`), a run.json with a cost record and local paths, for the results
tests (bundles, cost, lesions)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from segbook.evaluation.evaluate import CSV_COLUMNS, _json_safe, summarise_rows
from segbook.registry import Registry
from segbook.runs import RunSpec

COMPLETE = {"status": "finished", "epochs_completed": 1000, "epochs_planned": 1000, "complete": True}


def case_rows(registry: Registry, task: str, mean_dice: float, cases: int, seed: int) -> list[dict[str, Any]]:
    """Per-case rows of every foreground label, Dice spread around `mean_dice`, lesion labels with lesion counts."""
    entry = registry.get(task)
    rng = np.random.default_rng(seed)
    rows = []
    for case in range(cases):
        for label in entry.foreground_labels:
            dice = float(np.clip(mean_dice + rng.uniform(-0.05, 0.05), 0.0, 1.0))
            tp = int(rng.integers(50, 500))
            fp = fn = int(round(tp * (1 - dice) / dice)) if dice else 10
            lesion = label.kind == "lesion"
            reference = int(rng.integers(1, 4)) if lesion else None
            rows.append({"case": f"case_{case:03d}", "label": label.index, "label_name": label.name,
                         "dice": dice, "iou": tp / (tp + fp + fn), "precision": tp / (tp + fp),
                         "recall": tp / (tp + fn), "nsd": min(1.0, dice + 0.05), "hd95": float(rng.uniform(1, 9)),
                         "tp": tp, "fp": fp, "fn": fn, "tn": 10_000, "reference_voxels": tp + fn,
                         "prediction_voxels": tp + fp, "reference_volume_mm3": 1.5 * (tp + fn),
                         "prediction_volume_mm3": 1.5 * (tp + fp),
                         "lesions_reference": reference,
                         "lesions_detected": int(rng.integers(0, reference + 1)) if lesion else None,
                         "lesions_false_positive": int(rng.integers(0, 3)) if lesion else None})
    return rows


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
    table = pd.DataFrame(rows, columns=list(CSV_COLUMNS))
    lesion_columns = ["lesions_reference", "lesions_detected", "lesions_false_positive"]
    table[lesion_columns] = table[lesion_columns].astype("Int64")
    table.to_csv(folder / "evaluation" / "metrics.csv", index=False)
    summary = {"run": run, "settings": {"checkpoint": "checkpoint_final.pth"}, **summarise_rows(rows, entry, cases),
               "training": COMPLETE, "created_at": "2024-01-01T00:00:00",
               "cost": {"prediction": {"device": "cuda", "seconds_per_case": prediction_seconds_per_case}},
               **({"split": {"sha256": split}} if split else {})}
    (folder / "evaluation" / "summary.json").write_text(json.dumps(_json_safe(summary)))
    return folder


def gpu_cost(hours: float, peak_gib: float = 10.0) -> dict[str, Any]:
    """A run.json cost record of a run trained `hours` on one GPU."""
    return {"device": "cuda", "devices": 1, "device_hours": hours, "gpu_hours": hours,
            "peak_memory_bytes": int(peak_gib * 2**30), "samples_per_second": 20.0}
