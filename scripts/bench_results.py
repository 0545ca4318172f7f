"""Time `segbook results` and `segbook report` on a synthetic store of the full benchmark's size, and at 1/4 and 1/2.

The store has the 87 registry tasks x 7 configurations (nnU-Net; STU-Net base, large, huge, each scratch and
pretrained) x 3 seeds x 4 training fractions (10%, 25%, 50%, 100%) on fold all, SegBook's protocol: 7,308 runs, each
with a finished `run.json` as training writes it (settings, resolved recipe, plans summary, precision and the
recorded fingerprint, which collection recomputes for every run), an `evaluation/summary.json` (Dice, NSD, IoU,
precision, recall, HD95; the evaluation settings) and an `evaluation/metrics.csv` of 200 test cases x the
dataset's foreground labels, which the per-case statistics read; the files agree with one another as `segbook
evaluate` writes them (collection checks them).
The full store is written once; the smaller ones are folders of symbolic links to the first quarter and half of its
datasets. Each size is timed in one process:
- collection cold: without remembered verdicts, so every run's metrics.csv is checked (what the first collection
  of a store costs);
- tables and statistics: collection (warm: the verdicts remembered), every table (scale, modality-target, region,
  datasets, recipes, fractions), the per-case tests (reading metrics.csv), pretrained vs scratch with their counts
  for the three groupings, the significance maps and rank stability by dataset scale;
- the report: `write_report` on the collected runs (every section, figures embedded).

    python scripts/bench_results.py                 # 1/4, 1/2 and full size side by side (a few minutes)
    python scripts/bench_results.py --keep DIR      # also leave the full store in DIR/nnUNet_results
                                                    # (then: SEGBOOK_HOME=DIR segbook report --out r.html)

(from the repository root, with segbook installed or PYTHONPATH=.)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from segbook import fingerprint
from segbook.evaluation.files import CSV_COLUMNS, METRICS_VERSION, file_sha256
from segbook.paths import Paths
from segbook.registry import DatasetEntry, load_registry
from segbook.results import (case_tests, collect_results, compare_pretrained, rank_stability, significance_map,
                             write_report)
from segbook.results.tables import build_table
from segbook.runs import RunSpec, identity_fields

CONFIGS = [("nnunet", "scratch"), *((m, i) for m in ("base", "large", "huge") for i in ("scratch", "pretrained"))]
#: Mean effect of each configuration on a dataset's Dice, relative to nnU-Net (a plausible shape, not data).
EFFECT = {("nnunet", "scratch"): 0.0, ("base", "scratch"): -0.01, ("base", "pretrained"): 0.004,
          ("large", "scratch"): 0.0, ("large", "pretrained"): 0.012, ("huge", "scratch"): 0.004,
          ("huge", "pretrained"): 0.018}
SEEDS = (0, 1, 2)
FRACTIONS = (0.1, 0.25, 0.5, 1.0)
#: What training on less of the train split costs in Dice (pretrained loses half as much).
FRACTION_LOSS = {0.1: 0.12, 0.25: 0.06, 0.5: 0.025, 1.0: 0.0}
CASES = 200
#: The tables timed as "tables" (the statistics are timed on their own, the cost and lesion tables not at all).
TIMED_TABLES = ("scale", "modality-target", "region", "datasets", "recipes", "fractions")
COMPLETE = {"status": "finished", "epochs_completed": 1000, "epochs_planned": 1000, "complete": True}
#: Confusion counts per row: TP and FP = FN over SCALE voxels give the row's Dice; every image has VOXELS voxels.
SCALE, VOXELS = 10**6, 10**8


def write_store(results: Path, entries: list[DatasetEntry], seed: int = 0) -> int:
    """Every run of every entry (see the module's docstring); returns the number of runs."""
    rng = np.random.default_rng(seed)
    runs = 0
    for entry in tqdm(entries, desc="writing the store", unit="dataset"):
        labels = entry.foreground_labels
        fixed = pd.DataFrame({"case": np.repeat([f"case_{i:03d}" for i in range(CASES)], len(labels)),
                              "label": np.tile([label.index for label in labels], CASES),
                              "label_name": np.tile([label.name for label in labels], CASES)})
        case_effect = rng.normal(0, 0.05, size=(CASES, 1))  # hard and easy cases, shared by every run
        base = rng.uniform(0.55, 0.9, size=(1, len(labels)))
        for model, init in CONFIGS:
            for fraction in FRACTIONS:
                loss = FRACTION_LOSS[fraction] / (2 if init == "pretrained" else 1)
                for run_seed in SEEDS:
                    spec = RunSpec.of(entry, model, init, "all", seed=run_seed, fraction=fraction)
                    dice = np.clip(base + case_effect + EFFECT[(model, init)] - loss
                                   + rng.normal(0, 0.03, size=(CASES, len(labels))), 0, 1)
                    _write_run(spec.folder(results), spec, fixed, dice)
                    runs += 1
    return runs


def _write_run(folder: Path, spec: RunSpec, fixed: pd.DataFrame, dice: np.ndarray) -> None:
    """run.json, summary.json and metrics.csv as `segbook evaluate` writes them, consistent with one another (as
    collection checks): the counts give Dice, IoU, precision and recall; NSD and HD95 follow from Dice."""
    tp = np.round(dice.reshape(-1) * SCALE)
    fp = fn = SCALE - tp
    flat = tp / SCALE  # 2TP / (2TP + FP + FN)
    same = fp == 0  # identical masks: NSD 1, HD95 0
    metrics = {"dice": flat, "iou": tp / (tp + fp + fn), "precision": tp / (tp + fp), "recall": tp / (tp + fn),
               "nsd": np.where(same, 1.0, np.clip(flat + 0.03, 0, 1)),
               "hd95": np.where(same, 0.0, 2.0 + 20.0 * (1 - flat))}
    counts = {"tp": tp, "fp": fp, "fn": fn, "tn": VOXELS - tp - fp - fn, "reference_voxels": tp + fn,
              "prediction_voxels": tp + fp, "reference_volume_mm3": 1.5 * (tp + fn),
              "prediction_volume_mm3": 1.5 * (tp + fp)}
    per_label = {name: values.reshape(dice.shape).mean(axis=0) for name, values in metrics.items()}
    scored = {name: CASES for name in metrics}
    labels = {str(index): {"name": name, **{m: float(v[i]) for m, v in per_label.items()}, "valid_cases": CASES,
                           "scored_cases": scored}
              for i, (index, name) in enumerate(zip(fixed["label"][:dice.shape[1]], fixed["label_name"]))}
    run = identity_fields(spec)
    evaluation = folder / "evaluation"
    evaluation.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps({**_manifest(spec.model, spec.init), "run": run}))
    table = fixed.assign(**metrics, **{name: values.astype(np.int64) for name, values in counts.items()
                                       if not name.endswith("mm3")},
                         reference_volume_mm3=counts["reference_volume_mm3"],
                         prediction_volume_mm3=counts["prediction_volume_mm3"])
    table[[c for c in CSV_COLUMNS if c in table.columns]].to_csv(evaluation / "metrics.csv", index=False,
                                                                  float_format="%.10g")
    summary = {"run": run, "settings": {**EVALUATION_SETTINGS, "metrics_version": METRICS_VERSION},
               "num_cases": CASES, "labels": labels,
               "foreground_mean": {m: float(v.mean()) for m, v in per_label.items()},
               "created_at": "2024-01-01T00:00:00+0000", "training": COMPLETE,
               "metrics_sha256": file_sha256(evaluation / "metrics.csv")}
    (evaluation / "summary.json").write_text(json.dumps(summary))


#: What `segbook evaluate` records of how it scored a run (its defaults).
EVALUATION_SETTINGS = {"step_size": 0.5, "gaussian": True, "mirroring": True, "nsd_tolerance_mm": 2.0,
                       "empty_dice": "nan", "checkpoint": "checkpoint_final.pth", "checkpoint_mtime": 1.0}


@functools.cache
def _manifest(model: str, init: str) -> dict:
    """A finished run.json of a (model, init) but its `run` record: settings and the resolved recipe (the default
    budget), device and precision, plans summary and the fingerprint the trainer records (which depends on the
    run's initialisation and plans alone, so it holds for every task)."""
    from dataclasses import asdict

    from segbook.recipes import get_recipe
    from segbook.runs import default_recipe
    from segbook.training.settings import TrainingSettings

    weights = {"weights_sha256": "0" * 64} if init == "pretrained" else {}
    settings, recipe = TrainingSettings(**weights).resolve(get_recipe(default_recipe(model, init), init))
    manifest = {"schema": 2, "run": {"init": init, "plans": "nnUNetPlans"}, "status": "finished",
                "settings": asdict(settings), "recipe": recipe.model_dump(mode="json"), "epochs_done": settings.epochs,
                "device": "cuda", "precision": "bf16",
                "plans_summary": {"patch_size": [128, 128, 128], "batch_size": 2, "spacing": [1.5, 1.5, 1.5],
                                  "normalization": ["CTNormalization"], "plans_strides": [[1, 1, 1], [2, 2, 2]],
                                  "input_channels": 1}}
    return {**manifest, fingerprint.KEY: fingerprint.record(manifest)}


def linked_store(full: Path, home: Path, entries: list[DatasetEntry]) -> None:
    """A results folder holding the datasets of `entries` as links into the full store's."""
    results = home / "nnUNet_results"
    results.mkdir(parents=True)
    for entry in entries:
        (results / entry.nnunet_name).symlink_to(full / entry.nnunet_name, target_is_directory=True)


def time_once(home: Path, report: Path) -> dict[str, float]:
    """Seconds for collection, the tables, the statistics and the report, on the store under `home`."""
    paths = Paths(home=home, raw=home / "raw", preprocessed=home / "pre", results=home / "nnUNet_results")
    registry = load_registry()
    (home / "cache" / "evaluation_verdicts.json").unlink(missing_ok=True)
    start = time.perf_counter()
    collect_results(paths, registry)  # every run's files checked, the verdicts remembered
    cold = time.perf_counter() - start
    start = time.perf_counter()
    df = collect_results(paths, registry)
    collected = time.perf_counter()
    for name in TIMED_TABLES:
        build_table(df, name, "dice")
    tabulated = time.perf_counter()
    cases = case_tests(df, "dice")
    for group_by in ("scale", "modality-target", "region"):
        compare_pretrained(df, "dice", group_by, cases=cases)
    significance_map(df, "dice", "scale")
    rank_stability(df, "dice", "scale")
    analysed = time.perf_counter()
    write_report(df, report)
    done = time.perf_counter()
    return {"runs": len(df), "cold collect": cold, "collect": collected - start, "tables": tabulated - collected,
            "stats": analysed - tabulated, "tables+stats": analysed - start, "report": done - analysed}


def median_of(home: Path, report: Path, repeats: int) -> dict[str, float]:
    timings = [time_once(home, report) for _ in range(repeats)]
    return {key: statistics.median(t[key] for t in timings) for key in timings[0]}


def cli_seconds(home: Path, table: str) -> float:
    """Wall time of `segbook results --table TABLE` in a fresh process: start-up and imports included."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "segbook.cli.main", "results", "--table", table],
                   check=True, stdout=subprocess.DEVNULL, env={**os.environ, "SEGBOOK_HOME": str(home)})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="timings per size; the median is shown (default 1)")
    parser.add_argument("--keep", type=Path, help="write the full-size store here and keep it")
    args = parser.parse_args()
    entries = list(load_registry())
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        full_home = args.keep or Path(scratch) / "full"
        start = time.perf_counter()
        runs = write_store(full_home / "nnUNet_results", entries)
        print(f"wrote {len(entries)} tasks x {len(CONFIGS)} configurations x {len(SEEDS)} seeds x {len(FRACTIONS)} "
              f"fractions = {runs} runs ({CASES} test cases each) in {time.perf_counter() - start:.1f} s")
        warm = Path(scratch) / "warm-up"
        linked_store(full_home / "nnUNet_results", warm, entries[:2])
        time_once(warm, Path(scratch) / "warm.html")  # imports (pandas, scipy, matplotlib) before any clock
        for fraction in (0.25, 0.5, 1.0):
            count = round(len(entries) * fraction)
            home = full_home
            if fraction < 1.0:
                home = Path(scratch) / f"store_{fraction}"
                linked_store(full_home / "nnUNet_results", home, entries[:count])
            timing = median_of(home, Path(scratch) / f"report_{fraction}.html", args.repeats)
            rows.append({"size": f"{fraction:g}", "tasks": count, **timing})
        print(f"\nin-process, median of {args.repeats} (files in the page cache):")
        print(f"{'size':>5} {'tasks':>5} {'runs':>5} {'cold collect s':>14} {'collect s':>9} {'tables s':>8} "
              f"{'stats s':>7} {'tables+stats s':>14} {'report s':>8} {'ms/run':>6}")
        for row in rows:
            total = row["tables+stats"] + row["report"]
            print(f"{row['size']:>5} {row['tasks']:>5} {row['runs']:>5.0f} {row['cold collect']:>14.2f} "
                  f"{row['collect']:>9.2f} "
                  f"{row['tables']:>8.2f} {row['stats']:>7.2f} {row['tables+stats']:>14.2f} {row['report']:>8.2f} "
                  f"{1000 * total / row['runs']:>6.2f}")
        print("\n`segbook results --table T` on the full store, fresh process (start-up and imports included):")
        print("  " + ", ".join(f"{table}: {cli_seconds(full_home, table):.2f} s" for table in TIMED_TABLES))


if __name__ == "__main__":
    main()
