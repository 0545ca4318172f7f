"""Time `segbook results` on a synthetic store of the full benchmark's size, and at 1/4 and 1/2 of it.

The store has the 87 registry tasks x 7 configurations (nnU-Net; STU-Net base, large, huge, each scratch and
pretrained) x 5 folds (tabulated with `--folds 0-4`), each run's `evaluation/summary.json` scoring 200 test cases,
plus a finished `run.json`.
Collection reads only the summaries (never `metrics.csv`, so none is written). Each size is timed in one process:
collection, then all four tables, then the pretrained-vs-scratch statistics for the three groupings.

    python scripts/bench_results.py                 # 1/4, 1/2 and full size side by side (about a minute)
    python scripts/bench_results.py --keep DIR      # also leave the full store in DIR/nnUNet_results
                                                    # (then: SEGBOOK_HOME=DIR segbook report --folds 0-4 --out r.html)

(from the repository root, with segbook installed or PYTHONPATH=.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from segbook.io import atomic_write_json
from segbook.paths import Paths
from segbook.registry import DatasetEntry, load_registry
from segbook.results import collect_results, compare_pretrained
from segbook.results.tables import TABLES, build_table
from segbook.runs import RunSpec

CONFIGS = [("nnunet", "scratch"), *((m, i) for m in ("base", "large", "huge") for i in ("scratch", "pretrained"))]
#: Mean effect of each configuration on a dataset's Dice, relative to nnU-Net (a plausible shape, not data).
EFFECT = {("nnunet", "scratch"): 0.0, ("base", "scratch"): -0.01, ("base", "pretrained"): 0.004,
          ("large", "scratch"): 0.0, ("large", "pretrained"): 0.012, ("huge", "scratch"): 0.004,
          ("huge", "pretrained"): 0.018}
FOLDS = ("0", "1", "2", "3", "4")
CASES = 200


def write_store(results: Path, entries: list[DatasetEntry], seed: int = 0) -> int:
    """One summary.json and run.json per (task, configuration, fold); returns the number of runs."""
    rng = np.random.default_rng(seed)
    runs = 0
    for entry in entries:
        base = rng.uniform(0.55, 0.9, size=len(entry.foreground_labels))
        for model, init in CONFIGS:
            for fold in FOLDS:
                spec = RunSpec.of(entry, model, init, fold)
                dice = np.clip(base + EFFECT[(model, init)] + rng.normal(0, 0.01, base.shape), 0, 1)
                _write_run(spec.folder(results), spec, entry, dice, np.clip(dice + 0.03, 0, 1))
                runs += 1
    return runs


def _write_run(folder: Path, spec: RunSpec, entry: DatasetEntry, dice: np.ndarray, nsd: np.ndarray) -> None:
    run = {"task": spec.task, "dataset": spec.dataset, "model": spec.model, "init": spec.init, "fold": spec.fold,
           "trainer": spec.trainer, "plans": spec.plans, "configuration": "3d_fullres"}
    labels = {str(label.index): {"name": label.name, "dice": float(d), "nsd": float(n), "hd95": 3.0,
                                 "valid_cases": CASES}
              for label, d, n in zip(entry.foreground_labels, dice, nsd)}
    summary = {"run": run, "settings": {"step_size": 0.5, "gaussian": True, "mirroring": True,
                                        "nsd_tolerance_mm": entry.nsd_tolerance_mm, "empty_dice": "nan",
                                        "checkpoint": "checkpoint_final.pth"},
               "num_cases": CASES, "labels": labels,
               "foreground_mean": {"dice": float(dice.mean()), "nsd": float(nsd.mean()), "hd95": 3.0},
               "created_at": "2024-01-01T00:00:00+0000",
               "training": {"status": "finished", "epochs_completed": 1000, "epochs_planned": 1000, "complete": True}}
    (folder / "evaluation").mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps({"schema": 1, "run": run, "status": "finished"}))
    atomic_write_json(folder / "evaluation" / "summary.json", summary)


def time_once(home: Path) -> dict[str, float]:
    """Seconds for collection, the four tables and the statistics, on the store under `home`."""
    paths = Paths(home=home, raw=home / "raw", preprocessed=home / "pre", results=home / "nnUNet_results")
    registry = load_registry()
    start = time.perf_counter()
    df = collect_results(paths, registry, folds="0-4")
    collected = time.perf_counter()
    for name in TABLES:
        build_table(df, name, "dice")
    tabulated = time.perf_counter()
    for group_by in ("scale", "modality-target", "region"):
        compare_pretrained(df, "dice", group_by)
    done = time.perf_counter()
    return {"runs": len(df), "collect": collected - start, "tables": tabulated - collected,
            "stats": done - tabulated, "total": done - start}


def median_of(home: Path, repeats: int) -> dict[str, float]:
    timings = [time_once(home) for _ in range(repeats)]
    return {key: statistics.median(t[key] for t in timings) for key in timings[0]}


def cli_seconds(home: Path, table: str) -> float:
    """Wall time of `segbook results --table TABLE` in a fresh process: start-up and imports included."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "segbook.cli.main", "results", "--table", table, "--folds", "0-4"],
                   check=True, stdout=subprocess.DEVNULL, env={**os.environ, "SEGBOOK_HOME": str(home)})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timings per size; the median is shown (default 3)")
    parser.add_argument("--keep", type=Path, help="write the full-size store here and keep it")
    args = parser.parse_args()
    entries = list(load_registry())
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        warm = Path(scratch) / "warm-up"
        write_store(warm / "nnUNet_results", entries[:2])
        time_once(warm)  # imports (pandas, scipy) and caches before any clock
        for fraction in (0.25, 0.5, 1.0):
            home = args.keep if args.keep and fraction == 1.0 else Path(scratch) / f"store_{fraction}"
            count = round(len(entries) * fraction)
            start = time.perf_counter()
            write_store(home / "nnUNet_results", entries[:count])
            print(f"wrote {count} tasks x {len(CONFIGS)} configurations x {len(FOLDS)} folds "
                  f"({CASES} test cases each) in {time.perf_counter() - start:.1f} s")
            rows.append({"size": f"{fraction:g}", "tasks": count, **median_of(home, args.repeats)})
        print(f"\nin-process, median of {args.repeats} (files in the page cache):")
        print(f"{'size':>5} {'tasks':>5} {'runs':>5} {'collect s':>9} {'4 tables s':>10} {'stats s':>7} "
              f"{'total s':>7} {'ms/run':>6}")
        for row in rows:
            print(f"{row['size']:>5} {row['tasks']:>5} {row['runs']:>5.0f} {row['collect']:>9.2f} "
                  f"{row['tables']:>10.2f} {row['stats']:>7.2f} {row['total']:>7.2f} "
                  f"{1000 * row['total'] / row['runs']:>6.2f}")
        print("\n`segbook results --table T` on the full store, fresh process (start-up and imports included):")
        print("  " + ", ".join(f"{table}: {cli_seconds(home, table):.2f} s" for table in TABLES))


if __name__ == "__main__":
    main()
