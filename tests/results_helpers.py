"""The results tests' hand-built stores with known answers, written without training: a registry of four datasets
that exercise every grouping rule (`write_registry`, datasets A, B, C, D), their runs (`build_store`, `RUNS`), runs
of other fine-tuning recipes and a training fraction (`add_recipe_runs`), one run folder at a time (`write_run`,
`write_case_metrics`), and another group's evaluated runs exported as a results bundle (`export_their_bundle`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from store_helpers import label_row, write_evaluated_run, write_metrics

from segbook.evaluation.metrics import mean_ignoring_nan
from segbook.paths import Paths
from segbook.registry import Registry, load_registry
from segbook.results.bundles import export_bundle
from segbook.runs import RunSpec


def label(index: int, name: str, kind: str, seen: bool | None = None, classes: tuple[str, ...] = ()) -> dict:
    entry = {"index": index, "name": name, "kind": kind}
    return entry if seen is None else {**entry, "seen": seen, "totalseg_classes": list(classes)}


def dataset(key: str, number: int, modality: str, target: str, cases: int, region: str, labels: list[dict],
            bone: bool = False, vessel: bool = False) -> dict:
    return {"key": key, "name": key.split("_", 1)[1], "dataset_id": number, "modality": modality,
            "channels": ["CT"] if modality == "CT" else ["T1"], "target": target, "cases": cases,
            "train_cases": cases - 10, "test_cases": 10, "region": region, "bone": bone, "vessel": vessel,
            "labels": [label(0, "background", "background"), *labels]}


#: Four datasets chosen to exercise every rule: scale small/medium/large, a Structure&Lesion dataset with seen,
#: unseen and lesion labels, the regions and the bone / vessel flags.
TEST_DATASETS = [
    dataset("Task901_SeenCT", 901, "CT", "Seen Structure", 50, "Abdominal",
            [label(1, "Liver", "structure", True, ("liver",)), label(2, "Aorta", "structure", True, ("aorta",))],
            vessel=True),
    dataset("Task902_MixedCT", 902, "CT", "Structure&Lesion", 150, "Abdominal",
            [label(1, "Spleen", "structure", True, ("spleen",)), label(2, "Tumour", "lesion"),
             label(3, "Duct", "structure", False)]),
    dataset("Task903_LesionMR", 903, "MRI", "Lesion", 500, "Head and Neck", [label(1, "Tumour", "lesion")]),
    dataset("Task904_BoneCT", 904, "CT", "Unseen Structure", 80, "Other", [label(1, "Ossicle", "structure", False)],
            bone=True),
]
A, B, C, D = (entry["key"] for entry in TEST_DATASETS)

#: (task, model, init, fold) -> per-label Dice (NSD = Dice + 0.05); None: a run without summary (status given).
RUNS: dict[tuple[str, str, str, str], tuple[float, ...] | str] = {
    (A, "nnunet", "scratch", "all"): (0.80, 0.90),
    (A, "base", "scratch", "all"): (0.70, 0.80),
    (A, "base", "pretrained", "all"): (0.85, 0.90),
    (A, "large", "pretrained", "all"): (0.95, 0.85),
    (B, "nnunet", "scratch", "all"): (0.90, 0.50, 0.70),
    (B, "base", "scratch", "all"): (0.80, 0.40, 0.60),
    (B, "base", "pretrained", "all"): (0.90, 0.60, 0.60),
    (B, "large", "pretrained", "all"): "running",
    (C, "nnunet", "scratch", "all"): (0.60,),
    (C, "base", "scratch", "all"): (0.50,),
    (C, "base", "pretrained", "all"): (0.65,),
    (C, "large", "pretrained", "all"): (0.70,),
    (D, "nnunet", "scratch", "all"): (0.80,),
    (D, "base", "scratch", "all"): (0.81,),
    (D, "base", "pretrained", "all"): (0.8105,),
}


#: What evaluation records of a run that trained its whole budget.
COMPLETE = {"status": "finished", "epochs_completed": 1000, "epochs_planned": 1000, "complete": True}


def write_run(results: Path, registry: Registry, task: str, model: str, init: str, fold: str,
              dice: tuple[float | None, ...] | str, recipe: str | None = None, seed: int = 0, fraction: float = 1.0,
              plans: str = "nnUNetPlans", split: str | None = None, hd95: float = 1.0,
              ratios: bool = False) -> Path:
    """A run folder as segbook writes it: run.json, and once evaluated evaluation/metrics.csv and the summary.json
    of its means (with the SHA-256 of the test split it was scored on when `split` is given): 10 test cases, each
    with the label's Dice of `dice` (None: a label in neither mask), NSD = Dice + 0.05 and HD95 `hd95` mm;
    `ratios`: with IoU, precision and recall (evaluations before they existed lack them)."""
    entry = registry.get(task)
    spec = RunSpec.of(entry, model, init, fold, recipe=recipe, seed=seed, fraction=fraction, plans=plans)
    folder = spec.folder(results)
    folder.mkdir(parents=True)
    status = dice if isinstance(dice, str) else "finished"
    run = {"task": spec.task, "dataset": spec.dataset, "model": model, "init": init, "recipe": spec.recipe,
           "seed": spec.seed, "fraction": spec.fraction, "fold": fold, "trainer": spec.trainer, "plans": spec.plans}
    (folder / "run.json").write_text(json.dumps({"schema": 1, "run": run, "status": status, "epochs": []}))
    if not isinstance(dice, str):
        summary = {"run": run, "settings": {"metrics_version": 2}, "created_at": "2024-01-01T00:00:00",
                   "training": COMPLETE, **({"split": {"sha256": split}} if split else {})}
        (folder / "evaluation").mkdir()
        (folder / "evaluation" / "summary.json").write_text(json.dumps(summary))
        write_case_metrics(folder, {f"case_{c}": dice for c in range(10)}, hd95, ratios)
    return folder


def write_case_metrics(folder: Path, cases: dict[str, tuple[float | None, ...]], hd95: float = 1.0,
                       ratios: bool = False) -> None:
    """Evaluate a run again with these per-case scores, as `segbook evaluate` would write them: `metrics.csv` with
    a row per case and foreground label (case -> Dice per label; NSD = Dice + 0.05, HD95 `hd95` mm) and
    `summary.json`'s counts and means of them."""
    rows = [label_row(case, i, f"label {i}", d, min(1.0, d + 0.05) if d is not None else 0.0, hd95, ratios=ratios)
            for case, dice in cases.items() for i, d in enumerate(dice, start=1)]
    write_metrics(folder, rows)
    metrics = ["dice", "nsd", "hd95", *(["iou", "precision", "recall"] if ratios else [])]
    labels = {}
    for row in rows:
        labels.setdefault(str(row["label"]), {"name": row["label_name"], **{m: [] for m in metrics}})
        for metric in metrics:
            labels[str(row["label"])][metric].append(row[metric])
    for record in labels.values():
        record["valid_cases"] = sum(not math.isnan(value) for value in record["dice"])
        record.update({m: None if math.isnan(mean_ignoring_nan(record[m])) else mean_ignoring_nan(record[m])
                       for m in metrics})
    summary_file = folder / "evaluation" / "summary.json"
    summary = json.loads(summary_file.read_text())
    means = [record["dice"] for record in labels.values() if record["dice"] is not None]
    summary.update(num_cases=len(cases), labels=labels,
                   foreground_mean={"dice": sum(means) / len(means) if means else None})
    summary_file.write_text(json.dumps(summary))


#: Pretrained runs of other recipes, (task, model, recipe) -> per-label Dice, on fold all. Dataset scores: llrd A 0.90,
#: B 0.80, C 0.70 (D missing); heads-only A 0.75, C 0.55, D 0.79 (B missing); large llrd A 0.85 (large has no
#: scratch runs). The segbook recipe's base runs score A 0.875, B 0.70, C 0.65, D 0.8105; base scratch A 0.75,
#: B 0.60, C 0.50, D 0.81.
RECIPE_RUNS: dict[tuple[str, str, str], tuple[float, ...]] = {
    (A, "base", "llrd"): (0.90, 0.90),
    (B, "base", "llrd"): (0.90, 0.60, 0.90),
    (C, "base", "llrd"): (0.70,),
    (A, "base", "heads-only"): (0.70, 0.80),
    (C, "base", "heads-only"): (0.55,),
    (D, "base", "heads-only"): (0.79,),
    (A, "large", "llrd"): (0.85, 0.85),
}
#: A run on half the train split, (task, recipe, seed, fraction) -> Dice: far off, so that averaging it into the
#: default tables (the whole train split) would show.
VARIANT_RUNS: dict[tuple[str, str, int, float], tuple[float, ...]] = {
    (C, "segbook", 0, 0.5): (0.20,),
}


def add_recipe_runs(paths: Paths, registry: Registry) -> None:
    """The runs of other recipes and a training fraction, beside the default store's (of STU-Net base and large)."""
    for (task, model, recipe), dice in RECIPE_RUNS.items():
        write_run(paths.results, registry, task, model, "pretrained", "all", dice, recipe=recipe)
    for (task, recipe, seed, fraction), dice in VARIANT_RUNS.items():
        write_run(paths.results, registry, task, "base", "pretrained", "all", dice, recipe=recipe, seed=seed,
                  fraction=fraction)


def write_registry(path: Path) -> Path:
    path.write_text(yaml.safe_dump({"datasets": TEST_DATASETS}, sort_keys=False))
    return path


def build_store(registry_file: Path) -> tuple[Paths, Registry]:
    """The hand-built store in the (isolated) nnU-Net results folder, and the registry that knows its datasets."""
    registry = load_registry([registry_file])
    paths = Paths.from_env()
    for (task, model, init, fold), dice in RUNS.items():
        write_run(paths.results, registry, task, model, init, fold, dice)
    return paths, registry


#: The test split the exporting group scored its runs on (a SHA-256).
SPLIT = "a" * 64
#: (task, model, init) -> mean Dice of the exporting group's runs.
THEIR_RUNS = {(A, "base", "scratch"): 0.70, (A, "base", "pretrained"): 0.85, (B, "base", "scratch"): 0.60,
              (B, "base", "pretrained"): 0.72, (C, "base", "scratch"): 0.50, (C, "base", "pretrained"): 0.66}


def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> Paths:
    """Switch to a fresh SEGBOOK_HOME (another group's machine, or ours)."""
    monkeypatch.setenv("SEGBOOK_HOME", str(tmp_path / name))
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(variable, raising=False)
    return Paths.from_env()


def export_their_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: Registry) -> Path:
    """Another group's evaluated runs, exported as the bundle `their-lab` (SEGBOOK_HOME stays theirs)."""
    theirs = home(tmp_path, monkeypatch, "their_home")
    for seed, ((task, model, init), dice) in enumerate(THEIR_RUNS.items()):
        write_evaluated_run(theirs.results, registry, task, model, init, dice, split=SPLIT, seed=seed)
    report = export_bundle(tmp_path / "their-lab", registry=registry, paths=theirs)
    assert (report.runs, report.left_out) == (len(THEIR_RUNS), 0)
    return report.folder
