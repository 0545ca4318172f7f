"""Collecting results: every run under nnU-Net's results folder, plus dataset-level numbers imported from CSV.

Each run's scores are its `evaluation/summary.json`'s per-label means, taken only once its evaluation files pass
`segbook.evaluation.files`' checks (a run that fails is left out with a warning naming the file); those verdicts
are remembered per file, so thousands of runs collect in about a second once checked. `run.json` says why a run
without a summary is missing. The result is one flat DataFrame, a row per run (each seed and training fraction its
own row), joined with the registry facts every table groups by. The per-case rows of `metrics.csv` are read only
by `case_scores`, which the per-case statistics call when asked.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd
from tqdm import tqdm

from segbook import fingerprint
from segbook.errors import SegbookError
from segbook.evaluation.files import Checker, other_run, outdated_metrics
from segbook.io import atomic_write_text
from segbook.paths import Paths
from segbook.registry import DatasetEntry, Registry, TaskLookupError, load_registry
from segbook import backbones
from segbook.results import cells
from segbook.results.cells import BUNDLE_PREFIX, EVALUATED, IMPORTED_PREFIX, LOCAL, run_folders
from segbook.backbones.recorded import RecordError
from segbook.runs import (DEFAULT_FRACTION, DEFAULT_PLANS, DEFAULT_SEED, INITS, Identity, MANIFEST, MODELS, RUN_GLOB,
                          FolderParts, default_recipe, evaluation_folder, recorded_backbone, summary_path)
from segbook.runs import METRICS as CASE_METRICS
METRICS = ("dice", "nsd", "iou", "precision", "recall", "hd95")
#: Metrics where a lower value is better (distances, in mm); every Delta of them is reversed so + means better.
LOWER_IS_BETTER = frozenset({"hd95"})
#: What an imported CSV may give: fractions in [0, 1].
IMPORT_METRICS = ("dice", "nsd")
#: How labels split for the modality x target table: seen structures, unseen structures, lesions.
PARTS = ("seen", "unseen", "lesion")
#: Runs imported at case level (`segbook results --import DIR`): source `bundle:NAME`, folders under
#: `$SEGBOOK_HOME/results/bundles/NAME/runs/` laid out as local runs are (segbook.results.bundles).
BUNDLE_RUNS = "runs"
BUNDLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: Statuses of runs whose evaluation files were refused (`segbook.evaluation.files`): left out of every table
#: (`left_out` "invalid"), each named in a warning and in the tables' notes (`segbook.results.cells`).
INVALID = "invalid evaluation files"
OTHER_RUN = "summary.json of another run"
UNREADABLE = "unreadable summary.json"
NOT_EVALUATED = "not evaluated for {metric} (run segbook evaluate again)"
OUTDATED = "not evaluated for {metric} under the current convention (run segbook evaluate again)"
REGISTRY_COLUMNS = ("dataset_id", "name", "modality", "target", "scale", "region", "bone", "vessel", "parts",
                    "train_cases")
RUN_COLUMNS = ("task", "model", "init", "recipe", "variant", "seed", "fraction", "budget", "fold", "plans", "split",
               "source",
               "status", "evaluated", *METRICS,
               *(f"{m}_{p}" for m in METRICS for p in PARTS), "unevaluated", "exclusions", "path",
               *cells.FINGERPRINT_COLUMNS)
IMPORT_REQUIRED = ("task", "model", "init", "dice")
IMPORT_COLUMNS = (*IMPORT_REQUIRED, "nsd")
MAX_LISTED_ERRORS = 30
#: Among `collect_results`' recipes, keeps every recipe (what `segbook results --table recipes` collects).
ALL_RECIPES = "*"
#: Which runs a dataset's score averages: fold `all` alone (SegBook's protocol), or the five cross-validation folds.
FOLD_CHOICES = {"all": ("all",), "0-4": ("0", "1", "2", "3", "4")}


class ResultsError(SegbookError):
    """A results store or imported file that cannot be used as it is."""


class ResultsWarning(UserWarning):
    """Something in the results folder was skipped; the tables are still right for everything else."""


def label_part(entry: DatasetEntry, index: int) -> str | None:
    """`seen`, `unseen` or `lesion` for a foreground label; None for an index the registry does not know."""
    if not 0 < index < len(entry.labels):
        return None
    label = entry.labels[index]
    if label.kind == "lesion":
        return "lesion"
    return "seen" if label.seen else "unseen"


def dataset_parts(entry: DatasetEntry) -> str:
    """The parts a dataset's labels fall into, in PARTS order, joined by `+` (e.g. `seen+lesion`)."""
    present = {label_part(entry, label.index) for label in entry.foreground_labels}
    return "+".join(part for part in PARTS if part in present)


def imported_dir(paths: Paths | None = None) -> Path:
    return (paths or Paths.from_env()).home / "results" / "imported"


def bundles_dir(paths: Paths | None = None) -> Path:
    return (paths or Paths.from_env()).home / "results" / "bundles"


def collect_results(paths: Paths | None = None, registry: Registry | None = None,
                    results_dir: str | os.PathLike | None = None, plans: str = "default",
                    imported: bool = True, include_incomplete: bool = False,
                    recipes: Sequence[str] | None = None, folds: str = "all") -> pd.DataFrame:
    """One row per run found (evaluated or not) and per imported result, with the registry facts joined.

    Runs come from `results_dir` (default: nnU-Net's results folder); imported results from
    `$SEGBOOK_HOME/results/imported/`. Scores are fractions in [0, 1]. Folders of datasets the registry does not know,
    runs of other plans (`plans`: `default`, each backbone's own plans (nnUNetPlans, nnUNetResEncUNet{M,L}Plans for
    ResEnc); an identifier, or a planner name such as `paper`: one that no run, planner or backbone has is a
    `ResultsError`) and runs of other folds (`folds`: `all`, SegBook's protocol, or `0-4`, the five cross-validation
    folds) are skipped with a `ResultsWarning`, and runs whose evaluation files fail the checks
    (`segbook.evaluation.files`) are left out, named. A run evaluated before it trained its whole budget counts as not
    evaluated (with a warning) unless `include_incomplete`, which counts it as a variant of its own. Each run's row
    names the test split it was scored on (`split`, its SHA-256) and its fingerprint (`segbook.fingerprint`).

    `recipes` None keeps the default recipes (segbook, scratch); given, the runs of those recipes and of scratch,
    the baseline of every Delta (`ALL_RECIPES` among them: every recipe). Runs of other recipes are left out with
    a warning. Every seed and training fraction is kept, a row each: the tables average seeds and keep fractions
    apart (`segbook.results.tables`).

    With `imported`, the runs of imported bundles (`$SEGBOOK_HOME/results/bundles/NAME/runs/`) are collected as
    local runs are, their rows naming `source` `bundle:NAME`. Which runs may share a cell is then settled
    (`segbook.results.cells.settle`: variants, test splits, folds); the runs it leaves out stay as rows, not
    evaluated, named in a warning.
    """
    paths = paths or Paths.from_env()
    registry = registry or load_registry()
    root = Path(results_dir) if results_dir is not None else paths.results
    if folds not in FOLD_CHOICES:
        raise ResultsError(f"unknown folds {folds!r}; choose {' or '.join(FOLD_CHOICES)}")
    plans = plans if plans == "default" else plans_identifier(plans)
    found: Counter = Counter()
    checker = evaluation_checker(paths)
    rows = _local_rows(root, registry, plans, include_incomplete, folds, found, checker)
    if imported:
        rows += _bundle_rows(paths, registry, plans, include_incomplete, folds, found, checker)
    checker.save()
    _check_plans(plans, found)
    if imported:
        rows += [row for file in stored_imports(paths) for row in _imported_rows(file, registry)]
    frame = cells.settle(_frame(_chosen(rows, recipes), registry), FOLD_CHOICES[folds], _current_splits(rows, registry,
                                                                                                       paths))
    for note in cells.left_out_notes(frame):
        warnings.warn(note, ResultsWarning, stacklevel=2)
    frame.attrs[REGISTRY_FILES] = sorted({str(path) for path in registry.sources.values()})
    return frame


#: `collect_results`' frame names the registry files it was joined with here (`frame.attrs`), so that a table that
#: needs the datasets' labels (the external table) asks the same registry.
REGISTRY_FILES = "registry_files"


def frame_registry(df: pd.DataFrame) -> Registry:
    """The registry `collect_results` joined `df` with (the built-in one and SEGBOOK_REGISTRY's where unknown)."""
    return load_registry(df.attrs.get(REGISTRY_FILES) or None)


def evaluation_checker(paths: Paths) -> Checker:
    """The checks of run folders' evaluation files, with their verdicts remembered in `$SEGBOOK_HOME/cache/`, each
    run's cases checked against its dataset's current test split where the dataset is imported here."""
    from segbook.data.folders import raw_folder
    from segbook.data.split import read_split

    splits: dict[str, Any] = {}

    def split_of(entry: DatasetEntry) -> Any:
        if entry.key not in splits:
            try:
                splits[entry.key] = read_split(raw_folder(entry, paths))
            except (OSError, SegbookError):
                splits[entry.key] = None  # damaged: `segbook evaluate` and `segbook data` say so
        return splits[entry.key]

    return Checker(paths.home / "cache" / "evaluation_verdicts.json", split_of)


def default_plans(model: str) -> str:
    """A model's own plans; nnU-Net's default ones for a model no longer registered (what runs were made with
    before backbones had plans of their own)."""
    return backbones.default_plans(model) if backbones.is_known(model) else DEFAULT_PLANS


def plans_identifier(plans: str) -> str:
    """A planner name (`default`, `paper`, ...) as its plans identifier; anything else is an identifier already."""
    planner = backbones.PLANNERS.get(plans)
    return planner.plans if planner is not None else plans


def _check_plans(plans: str, found: Counter) -> None:
    """`ResultsError` for plans that no collected run was trained with and no planner or backbone makes: a misspelt
    `--plans` would otherwise print an empty table."""
    known = {*found, *(planner.plans for planner in backbones.PLANNERS.values()),
             *(backbones.default_plans(name) for name in backbones.model_names())}
    if plans != "default" and plans not in known:
        present = ", ".join(f"{name} ({count} run(s))" for name, count in sorted(found.items())) or "none"
        raise ResultsError(f"unknown plans {plans!r}: no run was trained with it and no planner or backbone makes it; "
                           f"plans of the runs found: {present}; planners: {', '.join(backbones.PLANNERS)}")


def _current_splits(rows: list[dict[str, Any]], registry: Registry, paths: Paths) -> dict[str, str]:
    """Each collected dataset's current test split (the SHA-256 of the split its imported data has now), for the
    datasets imported here; a damaged split file counts as none (`segbook data` says what is wrong with it)."""
    from segbook.data.folders import raw_folder
    from segbook.data.split import split_sha256

    current = {}
    for task in {row["task"] for row in rows if not row["source"].startswith(IMPORTED_PREFIX)}:
        try:
            sha = split_sha256(raw_folder(registry.get(task), paths))
        except SegbookError:
            sha = None
        if sha:
            current[task] = sha
    return current


def resolve_recipes(names: Sequence[str], files: Iterable[str | os.PathLike] | None = None) -> dict[str, str]:
    """Each recipe's initialisation by name. The names are checked against the built-in recipes and the user's
    (`files`, `SEGBOOK_RECIPES`), so that a misspelt name is an error instead of an empty row."""
    from segbook.recipes import RECIPES_ENV, RecipeError, load_recipes

    known = load_recipes(files)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise RecipeError(f"unknown recipe(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)} (add yours "
                          f"with --recipe-file FILE or {RECIPES_ENV})")
    return {name: known[name].init for name in names}


def _chosen(rows: list[dict[str, Any]], recipes: Sequence[str] | None) -> list[dict[str, Any]]:
    """The rows of the recipes asked for; the others counted in a warning."""
    others = Counter(row["recipe"] for row in rows if not _recipe_kept(row, recipes))
    if others:
        warnings.warn(_other_recipes(others, recipes), ResultsWarning, stacklevel=3)
    return [row for row in rows if _recipe_kept(row, recipes)]


def _recipe_kept(row: dict[str, Any], recipes: Sequence[str] | None) -> bool:
    """Whether a run is of the recipes asked for: its model's default one when none are (the scratch one always)."""
    if recipes is None:
        return row["recipe"] == default_recipe(row["model"], row["init"])
    return row["recipe"] == default_recipe(row["model"], "scratch") or row["recipe"] in recipes or \
        ALL_RECIPES in recipes


def _other_recipes(counts: Counter, recipes: Sequence[str] | None) -> str:
    """How many results of which recipes were left out, and the option that shows them."""
    listed = ", ".join(f"{name} ({count})" for name, count in sorted(counts.items()))
    wanted = ",".join(dict.fromkeys([*(recipes or [backbones.STUDY_RECIPES["pretrained"]]), *sorted(counts)]))
    return (f"ignored {sum(counts.values())} result(s) of other recipes: {listed}; show them with --recipes "
            f"{wanted}, or compare recipes with `segbook results --table recipes`")


def _local_rows(root: Path, registry: Registry, plans: str, include_incomplete: bool,
                folds: str, found: Counter, checker: Checker, run_code: bool = True) -> list[dict[str, Any]]:
    """The runs under `root` of the chosen plans and folds; `found` counts the runs of every plans identifier.
    `run_code`: whether the backbone files runs recorded may be loaded (local runs; never an imported bundle's)."""
    by_id = {entry.dataset_id: entry for entry in registry}
    skipped: dict[str, str] = {}
    other_plans: Counter = Counter()
    other_folds: Counter = Counter()
    incomplete: list[str] = []
    rows = []
    for folder in sorted(root.glob(RUN_GLOB)):
        parts = _parts(folder, run_code, skipped)
        entry = by_id.get(parts.dataset_id) if parts else None
        if parts is not None:
            found[parts.plans] += 1
        if parts is None:
            skipped.setdefault(str(folder.parent),
                               "its name is not a segbook trainer's (SegbookTrainer_{model}_{init}...)")
        elif entry is None:
            skipped[str(folder.parent.parent)] = ("its dataset id is not in the registry (add the dataset with "
                                                  "--registry FILE)")
        elif parts.plans != (default_plans(parts.identity.model) if plans == "default" else plans):
            other_plans[parts.plans] += 1
        elif parts.fold not in FOLD_CHOICES[folds]:
            other_folds[parts.fold] += 1
        else:
            row = _run_row(folder, entry, parts, checker)
            trained = row.pop("incomplete", None)
            if trained:
                incomplete.append(f"{folder} ({row['status']})")
                if include_incomplete:
                    row.update(evaluated=True, status=EVALUATED, **cells.trained_only(row["settings"], trained))
            rows.append(row)
    if incomplete:
        verb = ("counted, each as a variant of its own" if include_incomplete
                else "left out (pass --include-incomplete to count them)")
        warnings.warn(f"{len(incomplete)} evaluated run(s) did not train their whole budget, {verb}: "
                      + "; ".join(incomplete[:MAX_LISTED_ERRORS]), ResultsWarning, stacklevel=3)
    for name, why in sorted(skipped.items()):
        warnings.warn(f"skipped {name}: {why}", ResultsWarning, stacklevel=3)
    for name, count in sorted(other_plans.items()):
        warnings.warn(f"ignored {count} run(s) trained with plans {name!r}: runs of other plans are never averaged "
                      f"in (pass --plans {name} to tabulate them instead)", ResultsWarning, stacklevel=3)
    if other_folds:
        other = next(name for name in FOLD_CHOICES if name != folds)
        listed = ", ".join(f"{fold} ({count})" for fold, count in sorted(other_folds.items()))
        warnings.warn(f"ignored {sum(other_folds.values())} run(s) of fold(s) {listed}: the tables average "
                      f"{_folds_text(folds)} (pass --folds {other} for {_folds_text(other)})", ResultsWarning,
                      stacklevel=3)
    return rows


def _parts(folder: Path, run_code: bool, skipped: dict[str, str]) -> FolderParts | None:
    """The run's parts, its user's backbone found again from its run.json (no --backbone-file needed). A backbone
    file gone or changed is a warning naming the run and the file, and its numbers still count (tables only read
    them); a malformed record leaves the run skipped, saying so."""
    try:
        problem = recorded_backbone(folder, run_code)
    except RecordError as error:
        skipped[str(folder.parent)] = f"its run.json's backbone record is malformed ({error})"
        return None
    if problem:
        warnings.warn(f"{folder}: {problem}; its numbers are shown from its files", ResultsWarning, stacklevel=4)
    return FolderParts.parse(folder)


def _bundle_rows(paths: Paths, registry: Registry, plans: str, include_incomplete: bool,
                 folds: str, found: Counter, checker: Checker) -> list[dict[str, Any]]:
    """The runs of every imported bundle, collected as local runs are, each row naming its bundle."""
    folder = bundles_dir(paths)
    names = sorted(p.name for p in folder.iterdir() if BUNDLE_NAME.fullmatch(p.name)) if folder.is_dir() else []
    return [{**row, "source": f"{BUNDLE_PREFIX}{name}"} for name in names
            for row in _local_rows(folder / name / BUNDLE_RUNS, registry, plans, include_incomplete, folds, found,
                                   checker, run_code=False)]


def _folds_text(folds: str) -> str:
    return "fold all, SegBook's protocol" if folds == "all" else "the five cross-validation folds 0-4"


def _run_row(folder: Path, entry: DatasetEntry, parts: FolderParts, checker: Checker) -> dict[str, Any]:
    """A run's row: its identity, fingerprint, scores and status. A run whose evaluation files fail the checks, whose
    files are another run's, or whose run.json no longer gives the fingerprint it recorded, is not evaluated
    (`left_out` says why)."""
    identity = parts.identity
    manifest, manifest_problem = _manifest(folder)
    reading = fingerprint.read(manifest, len(entry.channels))
    row = {"task": entry.key, "model": identity.model, "init": identity.init, "recipe": identity.recipe,
           "variant": "", "seed": identity.seed, "fraction": identity.fraction,
           "budget": trained_budget(identity, manifest), "fold": parts.fold,
           "plans": parts.plans, "split": None, "source": LOCAL, "path": str(folder),
           **cells.training_columns(reading)}
    summary_file = summary_path(folder)
    try:
        summary, verdict = checker.check(folder, entry, parts)
    except FileNotFoundError:
        return {**row, "status": manifest_problem or _run_status(manifest), "evaluated": False}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SegbookError) as error:
        warnings.warn(f"unreadable {summary_file}: {error}; the run counts as missing", ResultsWarning, stacklevel=4)
        return {**row, "status": UNREADABLE, "evaluated": False, "left_out": "invalid"}
    if verdict.other_run:
        warnings.warn(f"{summary_file} scores {verdict.other_run}, not the run of its folder ({identity.describe()}); "
                      "the run counts as not evaluated (evaluate it again)", ResultsWarning, stacklevel=4)
        return {**row, "status": OTHER_RUN, "evaluated": False, "left_out": "identity"}
    if verdict.problem:
        warnings.warn(f"{verdict.problem}; the run is left out of the tables (evaluate it again: segbook evaluate "
                      "--force)", ResultsWarning, stacklevel=4)
        return {**row, "status": INVALID, "evaluated": False, "left_out": "invalid"}
    scores = label_scores(summary["labels"], entry, outdated_metrics(summary))
    row.update(split=_split_of(summary), exclusions=verdict.exclusions)
    row.update(cells.evaluation_columns(reading, summary, row["split"]))
    short = _budget_shortfall(summary, folder)
    if short:
        return {**row, **scores, "status": short[0], "evaluated": False, "incomplete": short[1]}
    problem = _record_problem(manifest, manifest_problem, reading, parts, entry, row)
    if problem:
        return {**row, **scores, **problem, "evaluated": False}
    return {**row, **scores, "status": EVALUATED, "evaluated": True}


#: The `budget` of a row whose budget no record says (numbers imported from CSV, a run without run.json).
UNKNOWN_BUDGET = 0


def trained_budget(identity: Identity, manifest: dict[str, Any]) -> int:
    """The epochs a run trains: its name's (`_ep{E}`), else its run.json's settings (the recipe's budget, or
    `--epochs`); `UNKNOWN_BUDGET` where neither says (or run.json's value is not a positive integer)."""
    if identity.budget is not None:
        return identity.budget
    settings = manifest.get("settings")
    epochs = settings.get("epochs") if isinstance(settings, dict) else None
    return epochs if isinstance(epochs, int) and not isinstance(epochs, bool) and epochs > 0 else UNKNOWN_BUDGET


def _manifest(folder: Path) -> tuple[dict[str, Any], str | None]:
    """A run's `run.json` as a dict ({} when there is none or it is unreadable, with the status that says so)."""
    try:
        data = json.loads((folder / MANIFEST).read_bytes())
    except FileNotFoundError:
        return {}, "no run.json"
    except (OSError, ValueError):
        return {}, "unreadable run.json"
    return (data, None) if isinstance(data, dict) else ({}, "unreadable run.json")


def _split_of(summary: dict[str, Any]) -> str | None:
    split = (summary.get("split") or {}).get("sha256")
    return split if isinstance(split, str) else None


def _record_problem(manifest: dict[str, Any], missing: str | None, reading: fingerprint.Reading, parts: FolderParts,
                    entry: DatasetEntry, row: dict[str, Any]) -> dict[str, Any] | None:
    """Why an evaluated run's `run.json` says its score is not this run's: it names another run, its training
    cases are not its fraction's, its epochs are not the budget its name says, it trained beside another test split
    than it was scored on, or its settings no longer give the fingerprint recorded when it trained. None when nothing
    is wrong (or it has no run.json)."""
    if missing:
        return None
    other = other_run(manifest.get("run"), parts, entry)
    if other:
        return {"status": "run.json of another run", "left_out": "identity"}
    cases = _training_cases_problem(manifest.get("training_cases"), parts.identity.fraction)
    if cases:
        return {"status": cases, "left_out": "identity"}
    budget = parts.identity.budget
    settings = manifest.get("settings") if isinstance(manifest.get("settings"), dict) else {}
    if budget is not None and settings.get("epochs") != budget:
        return {"status": f"run.json trains {settings.get('epochs')} epochs, not the {budget} its name says",
                "left_out": "identity"}
    trained = ((manifest.get("split") or {}) if isinstance(manifest.get("split"), dict) else {}).get("sha256")
    if isinstance(trained, str) and row["split"] not in (None, trained):
        return {"status": f"trained beside test split {trained[:12]}, scored on {row['split'][:12]}",
                "left_out": "split"}
    edited = fingerprint.recorded_mismatch(manifest, reading)
    if edited:
        return {"status": f"run.json's {edited} edited since training started", "left_out": "tampered"}
    return None


def _training_cases_problem(record: Any, fraction: float) -> str | None:
    """How a run's recorded training cases contradict its training fraction (None: they agree, or none recorded)."""
    from segbook.data.subsets import subset_size

    if not isinstance(record, dict):
        return None
    recorded, count, available = record.get("fraction"), record.get("count"), record.get("available")
    if isinstance(recorded, (int, float)) and abs(recorded - fraction) > 1e-9:
        return f"trained on fraction {recorded:g} of its train split, not {fraction:g}"
    if isinstance(count, int) and isinstance(available, int) and 0 < available:
        if count != (available if fraction == DEFAULT_FRACTION else subset_size(fraction, available)):
            return f"trained on {count} of {available} cases, not the {100 * fraction:g}% its name says"
    return None


def label_scores(labels: dict[str, dict[str, Any]], entry: DatasetEntry, outdated: set[str]) -> dict[str, Any]:
    """A run's score per metric: the mean over labels of the per-label means, overall and per part.
    `unevaluated` maps the metrics the run has no score for to why: no label has them (a summary written before
    segbook computed them) or they were computed under an older convention (`outdated`): never averaged with the
    others."""
    given = set().union(*labels.values())
    unevaluated = {m: (OUTDATED if m in given else NOT_EVALUATED).format(metric=m) for m in METRICS
                   if m not in given or m in outdated}
    values: dict[str, Any] = {}
    for index, metrics in labels.items():
        part = label_part(entry, int(index))
        for metric in METRICS:
            value = metrics.get(metric)
            if metric not in unevaluated and value is not None and not math.isnan(value):
                values.setdefault(metric, []).append(value)
                if part is not None:
                    values.setdefault(f"{metric}_{part}", []).append(value)
    return {"unevaluated": unevaluated, **{column: sum(v) / len(v) for column, v in values.items()}}


def _budget_shortfall(summary: dict[str, Any], folder: Path) -> tuple[str, str] | None:
    """How a run fell short of its training budget, as a status ("trained 3/1000 epochs (finished)") and as what
    it trained ("3/1000 epochs"); None when it trained it all.

    Evaluation records it in `summary.json`; for summaries written before it did, `run.json` tells."""
    from segbook.evaluation.evaluate import training_record
    from segbook.training.manifest import RunManifest

    training = summary.get("training")
    if not isinstance(training, dict):
        try:
            training = training_record(RunManifest.load(folder))
        except (OSError, ValueError, TypeError, AttributeError, SegbookError):
            training = training_record(None)
    if training.get("complete"):
        return None
    done, planned = training.get("epochs_completed"), training.get("epochs_planned")
    if planned is None:
        return "training budget unknown (no run.json)", "epochs trained unknown"
    return f"trained {done}/{planned} epochs ({training.get('status')})", f"{done}/{planned} epochs"


def _run_status(manifest: dict[str, Any]) -> str:
    """Why a run has no scores yet, from its manifest."""
    status = manifest.get("status", "unknown")
    return "not evaluated" if status == "finished" else str(status)


def _frame(rows: list[dict[str, Any]], registry: Registry) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(RUN_COLUMNS))
    frame["evaluated"] = frame["evaluated"].astype(bool)
    facts = pd.DataFrame([_facts(registry.get(key)) for key in frame["task"].unique()],
                         columns=["task", *REGISTRY_COLUMNS])
    return frame.merge(facts, on="task", how="left")


def _facts(entry: DatasetEntry) -> tuple:
    return (entry.key, entry.dataset_id, entry.name, entry.modality, entry.target, entry.scale, entry.region,
            entry.bone, entry.vessel, dataset_parts(entry), entry.train_cases)


# --- per-case scores ---------------------------------------------------------------------------------------------


#: Reading this many runs' metrics.csv or more shows a progress bar.
PROGRESS_FROM = 200
#: What identifies a per-case score: the dataset, the configuration, the training fraction and the test case.
CASE_KEYS = ["task", "model", "init", "recipe", "variant", "fraction", "case"]


def case_scores(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per (task, model, init, recipe, variant, fraction, case): the case's score, the mean over the runs (seeds,
    folds) that scored it, each run's case score being the mean over its foreground labels of `metric` (NaN-ignoring).

    Reads each evaluated run's `metrics.csv` (local runs and those of imported bundles; numbers imported from CSV
    have no cases), so only the per-case statistics call it, on the runs they test.
    A run whose `metrics.csv` lacks the metric (evaluated before segbook computed it) or is unreadable is an error
    naming it: leaving it out would quietly test fewer seeds than the tables average."""
    import numpy as np

    local = runs[run_folders(runs) & runs["evaluated"]]
    per_run: list[pd.Series] = []
    for row in tqdm(local.itertuples(index=False), total=len(local), desc="reading per-case metrics", unit="run",
                    disable=len(local) < PROGRESS_FROM, leave=False):
        file = evaluation_folder(Path(row.path)) / CASE_METRICS
        if isinstance(row.unevaluated, dict) and metric in row.unevaluated:
            raise ResultsError(f"{file}: {row.unevaluated[metric]}")
        try:
            cases = pd.read_csv(file, usecols=["case", metric], dtype={"case": str, metric: float})
        except FileNotFoundError:
            raise ResultsError(f"{file}: missing; the per-case statistics need it (run segbook evaluate again)") \
                from None
        except ValueError as error:
            if metric in str(error):
                raise ResultsError(f"{file}: not evaluated for {metric} (run segbook evaluate again)") from None
            raise ResultsError(f"unreadable {file}: {error}") from None
        per_run.append(cases.groupby("case", sort=False)[metric].mean())
    if not per_run:
        return pd.DataFrame(columns=[*CASE_KEYS, "score"])
    keys = local[CASE_KEYS[:-1]].reset_index(drop=True)
    which = np.repeat(np.arange(len(per_run)), [len(cases) for cases in per_run])
    frame = keys.iloc[which].reset_index(drop=True).assign(
        case=np.concatenate([cases.index.to_numpy() for cases in per_run]),
        score=np.concatenate([cases.to_numpy() for cases in per_run]))
    return frame.groupby(CASE_KEYS, sort=False)["score"].mean().reset_index()


# --- imported results ------------------------------------------------------------------------------------------


def stored_imports(paths: Paths | None = None) -> list[Path]:
    folder = imported_dir(paths)
    return sorted(folder.glob("*.csv")) if folder.is_dir() else []


def read_import_csv(file: str | os.PathLike, registry: Registry) -> list[dict[str, Any]]:
    """Validate every row of an external results CSV; raise one error listing every bad row.

    Columns: task, model, init, dice and optionally nsd (case-insensitive). Scores are fractions in [0, 1], like
    `summary.json`; percentages are refused. Row numbers are spreadsheet rows: the header is row 1.
    """
    file = Path(file)
    try:
        with file.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = _check_header(file, reader.fieldnames)
            records = [(reader.line_num, {c.strip().lower(): (v or "").strip() for c, v in raw.items() if c})
                       for raw in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ResultsError(f"cannot read {file}: {error}") from None
    if not records:
        raise ResultsError(f"{file}: no rows after the header")
    rows, problems = [], []
    for line, record in records:
        row, errors = _import_row(record, registry, columns)
        rows.append({**row, "_line": line})
        problems += [f"{file}, row {line}: {error}" for error in errors]
    problems += _duplicates(file, rows)
    if problems:
        raise ResultsError(_listing(f"{file}: {len(problems)} problem(s); nothing was imported", problems))
    return [{key: value for key, value in row.items() if key != "_line"} for row in rows]


def _check_header(file: Path, fieldnames: Iterable[str] | None) -> list[str]:
    columns = [name.strip().lower() for name in fieldnames or [] if name is not None]
    missing = [name for name in IMPORT_REQUIRED if name not in columns]
    unknown = [name for name in columns if name not in IMPORT_COLUMNS]
    if missing or unknown or len(set(columns)) != len(columns):
        raise ResultsError(f"{file}: the header must name the columns {', '.join(IMPORT_REQUIRED)} and optionally "
                           f"nsd, each once (got: {', '.join(columns) or 'nothing'})")
    return columns


def _import_row(record: dict[str, str], registry: Registry, columns: list[str]) -> tuple[dict[str, Any], list[str]]:
    errors, row = [], {}
    try:
        row["task"] = registry.get(record["task"]).key
    except TaskLookupError as error:
        errors.append(f"field 'task': {error}")
    model, init = record["model"].lower(), record["init"].lower()
    if model not in MODELS:
        errors.append(f"field 'model': {record['model']!r} is not one of {', '.join(MODELS)}")
    if init not in INITS:
        errors.append(f"field 'init': {record['init']!r} is not one of {', '.join(INITS)}")
    elif model in MODELS and init != "scratch" and not backbones.get(model).pretrainable:
        errors.append(f"field 'init': {backbones.get(model).label} has no pretrained weights; its init is scratch")
    row.update(model=model, init=init)
    for metric in IMPORT_METRICS:
        value, error = _score(record.get(metric, ""), metric, required=metric == "dice")
        row[metric] = value
        if error:
            errors.append(error)
    return row, errors


def _score(text: str, metric: str, required: bool) -> tuple[float, str | None]:
    if not text:
        return math.nan, f"field '{metric}': empty (a number in [0, 1] is required)" if required else None
    try:
        value = float(text)
    except ValueError:
        return math.nan, f"field '{metric}': {text!r} is not a number"
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        hint = " (scores are fractions: write 0.8312, not 83.12)" if 1.0 < value <= 100.0 else ""
        return math.nan, f"field '{metric}': {text} is outside [0, 1]{hint}"
    return value, None


def _duplicates(file: Path, rows: list[dict[str, Any]]) -> list[str]:
    first: dict[tuple, int] = {}
    problems = []
    for row in rows:
        key = (row.get("task"), row["model"], row["init"])
        if key[0] is None:
            continue
        if key in first:
            problems.append(f"{file}, row {row['_line']}: {key[0]} {key[1]} {key[2]} is already given in row "
                            f"{first[key]}")
        else:
            first[key] = row["_line"]
    return problems


def _listing(headline: str, problems: list[str]) -> str:
    shown = problems[:MAX_LISTED_ERRORS]
    more = [f"... and {len(problems) - len(shown)} more"] if len(problems) > len(shown) else []
    return "\n  ".join([headline, *shown, *more])


def import_results(file: str | os.PathLike, registry: Registry | None = None,
                   paths: Paths | None = None) -> Path:
    """Validate an external CSV and store it (atomically, normalised) under `$SEGBOOK_HOME/results/imported/`.

    The stored file is named after the source file, so importing a corrected file again replaces it. A result that
    another stored import already gives is an error: one number per (task, model, init) and source.
    """
    registry = registry or load_registry()
    file = Path(file)
    rows = read_import_csv(file, registry)
    target = imported_dir(paths) / f"{_safe_stem(file)}.csv"
    clashes = _clashes(rows, target, registry, paths)
    if clashes:
        raise ResultsError(_listing(f"{file}: results already imported from another file; nothing was imported",
                                    clashes))
    lines = [",".join(IMPORT_COLUMNS)]
    lines += [",".join([row["task"], row["model"], row["init"], repr(row["dice"]),
                        "" if math.isnan(row["nsd"]) else repr(row["nsd"])]) for row in rows]
    atomic_write_text(target, "\n".join(lines) + "\n")
    return target


def _safe_stem(file: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", file.stem).strip("._") or "imported"


def _clashes(rows: list[dict[str, Any]], target: Path, registry: Registry, paths: Paths | None) -> list[str]:
    mine = {(row["task"], row["model"], row["init"]) for row in rows}
    clashes = []
    for other in stored_imports(paths):
        if other.name == target.name:
            continue
        for row in read_import_csv(other, registry):
            if (row["task"], row["model"], row["init"]) in mine:
                clashes.append(f"{row['task']} {row['model']} {row['init']} is in {other}")
    return clashes


def _imported_rows(file: Path, registry: Registry) -> list[dict[str, Any]]:
    source = f"{IMPORTED_PREFIX}{file.stem}"
    return [{**row, "recipe": default_recipe(row["model"], row["init"]), "variant": "", "seed": DEFAULT_SEED,
             "fraction": DEFAULT_FRACTION, "budget": UNKNOWN_BUDGET, "fold": "", "plans": "", "split": None,
             "source": source,
             "status": EVALUATED, "evaluated": True, "path": str(file), **cells.imported_columns(source)}
            for row in read_import_csv(file, registry)]
