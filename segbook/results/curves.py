"""Learning curves: score against training device-hours per configuration (`segbook results --table curves`, and
the report's curves section).

Two kinds of point, never mixed into one number: a snapshot (`segbook train --snapshots`, scored by `segbook
evaluate --snapshots` into `snapshots/evaluation_ep{E}/`) is the network part-way through a schedule whose learning
rate had not decayed yet, at the compute its run had spent by then (its run.json record's `cost`); a run is a
finished run of one budget at its whole cost. A snapshot of a long schedule is not a short run: where both exist
both are shown. Snapshot evaluations are files on disk: each passes `segbook.evaluation.files.check_run` (the checks
every evaluation passes) or is left out with a warning.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from segbook.errors import SegbookError
from segbook.evaluation.files import check_run, outdated_metrics, read_json
from segbook.results.budgets import budget_points, mean_score
from segbook.results.cells import run_folders
from segbook.results.collect import ResultsWarning, frame_registry, label_scores
from segbook.results.configs import config_label, configurations, shows_recipes
from segbook.results.scores import CONFIG_KEYS, metric_factor, metric_label, protocol_note, whole_split
from segbook.results.selection import Selection
from segbook.results.tables.table import ResultTable
from segbook.runs import MANIFEST, SUMMARY, FolderParts, snapshot_evaluation_folder

SNAPSHOT, RUN = "snapshot (lr not decayed)", "run"


def snapshot_scores(df: pd.DataFrame, metric: str = "dice") -> pd.DataFrame:
    """One row per checked snapshot evaluation of the evaluated local runs on the whole train split: its run's
    configuration, task and seed, the epoch, the budget, the device-hours spent by then and the score (stored
    units)."""
    registry = frame_registry(df)
    runs = whole_split(df)
    runs = runs[runs["evaluated"] & run_folders(runs)]
    rows = []
    for row in runs.itertuples(index=False):
        folder = Path(row.path)
        entry = registry.get(row.task)
        run_summary = read_json(folder / "evaluation" / SUMMARY)  # collected, so checked already
        for record in _snapshot_records(folder):
            score = _checked_score(folder, int(record["epoch"]), entry, metric, run_summary)
            if score is not None:
                rows.append({**{k: getattr(row, k) for k in ("task", *CONFIG_KEYS, "seed")}, "budget": row.budget,
                             "epoch": int(record["epoch"]), "hours": _hours(record), "score": score})
    return pd.DataFrame(rows, columns=["task", *CONFIG_KEYS, "seed", "budget", "epoch", "hours", "score"])


def _snapshot_records(folder: Path) -> list[dict[str, Any]]:
    """run.json's snapshot records with a whole positive epoch and an evaluation folder (run.json is untrusted)."""
    try:
        records = json.loads((folder / MANIFEST).read_bytes()).get("snapshots")
    except (OSError, ValueError, AttributeError):
        return []
    return [r for r in records if isinstance(r, dict) and isinstance(r.get("epoch"), int)
            and not isinstance(r["epoch"], bool) and r["epoch"] > 0
            and snapshot_evaluation_folder(folder, r["epoch"]).is_dir()] if isinstance(records, list) else []


def _hours(record: dict[str, Any]) -> float:
    hours = (record.get("cost") or {}).get("device_hours") if isinstance(record.get("cost"), dict) else None
    return float(hours) if isinstance(hours, (int, float)) and not isinstance(hours, bool) and hours >= 0 else math.nan


def _checked_score(folder: Path, epoch: int, entry: Any, metric: str, run_summary: dict[str, Any]) -> float | None:
    """The snapshot evaluation's score (mean over labels, as a run's), or None (warned) when its files fail the
    checks, it does not say it is that snapshot, or it was scored otherwise than its run's final network (another
    test split, other evaluation settings): a curve's points must differ only in how long the network trained."""
    evaluation = snapshot_evaluation_folder(folder, epoch)
    try:
        summary = read_json(evaluation / SUMMARY)
        verdict = check_run(folder, summary, entry, FolderParts.parse(folder), evaluation=evaluation)
        problem = verdict.problem
        if problem is None and (summary.get("snapshot") or {}).get("epoch") != epoch:
            problem = f"{evaluation / SUMMARY} does not say it scores the snapshot after epoch {epoch}"
        if problem is None:
            problem = _scored_otherwise(summary, run_summary, evaluation / SUMMARY)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SegbookError) as error:
        problem = f"unreadable {evaluation / SUMMARY}: {error}"
    if problem:
        warnings.warn(f"{problem}; this snapshot is left out of the curves (run segbook evaluate --snapshots again "
                      "with --force)", ResultsWarning, stacklevel=3)
        return None
    score = label_scores(summary["labels"], entry, outdated_metrics(summary)).get(metric)
    return None if score is None else float(score)


def _scored_otherwise(summary: dict[str, Any], run_summary: dict[str, Any], path: Path) -> str | None:
    """Why a snapshot's evaluation does not compare with its run's (None when it does): another test split, or
    evaluation settings other than the run's (the checkpoint and its time aside)."""
    def sha(of: dict[str, Any]) -> Any:
        return (of.get("split") or {}).get("sha256") if isinstance(of.get("split"), dict) else None

    def settings(of: dict[str, Any]) -> dict[str, Any]:
        given = of.get("settings") if isinstance(of.get("settings"), dict) else {}
        return {k: v for k, v in given.items() if k not in ("checkpoint", "checkpoint_mtime")}

    if sha(summary) != sha(run_summary):
        return f"{path} was scored on another test split than its run ({sha(summary)} vs {sha(run_summary)})"
    differing = sorted(k for k in settings(summary).keys() | settings(run_summary).keys()
                       if settings(summary).get(k) != settings(run_summary).get(k))
    if differing:
        return f"{path} was scored with other evaluation settings than its run ({', '.join(differing)})"
    return None


def curve_points(df: pd.DataFrame, selection: Selection) -> pd.DataFrame:
    """The curves' points: per configuration (each budget a variant of its own) its finished runs' mean score over
    datasets at their mean device-hours per run, and per snapshot epoch the mean over datasets (seeds averaged) at
    the runs' mean device-hours by then."""
    metric = selection.metric
    factor = metric_factor(metric)
    configs = configurations(whole_split(df), selection)
    rows = [{"config": p.config, "budget": p.budget, "epoch": p.budget, "kind": RUN, "hours": p.hours,
             "score": mean_score(p, factor), "datasets": len(p.scores)} for p in budget_points(df, selection)]
    snapshots = snapshot_scores(df, metric)
    for key, group in snapshots.groupby([*CONFIG_KEYS, "epoch"], sort=True):
        config = tuple(key[:4])
        if config not in configs:
            continue
        per_task = group.groupby("task")["score"].mean()
        rows.append({"config": config, "budget": int(group["budget"].iloc[0]), "epoch": int(key[4]), "kind": SNAPSHOT,
                     "hours": float(group["hours"].mean()), "score": factor * float(per_task.mean()),
                     "datasets": len(per_task)})
    frame = pd.DataFrame(rows, columns=["config", "budget", "epoch", "kind", "hours", "score", "datasets"])
    frame["family"] = [config[:3] for config in frame["config"]]
    return frame.sort_values(["family", "budget", "epoch"], kind="stable").reset_index(drop=True)


def curve_table(df: pd.DataFrame, selection: Selection | str = "dice", **choices: Any) -> ResultTable:
    """`segbook results --table curves`: a row per point (see the module's docstring)."""
    selection = Selection.of(selection, **choices)
    metric = selection.metric
    points = curve_points(df, selection)
    named = shows_recipes(list(points["config"]))
    table = ResultTable("curves", f"{metric_label(metric)} against training device-hours",
                        ["configuration", "budget (epochs)", "epochs trained", "point", "device-hours",
                         metric_label(metric), "datasets"])
    for row in points.itertuples(index=False):
        table.rows.append([config_label(row.config, named), row.budget, row.epoch, row.kind,
                           None if math.isnan(row.hours) else round(row.hours, 4),
                           None if math.isnan(row.score) else round(row.score, 2), row.datasets])
    table.notes = ([f"{RUN}: the finished runs of one budget, mean {metric_label(metric)} over their datasets (seeds "
                    "averaged) at their mean training device-hours per run; "
                    f"{SNAPSHOT}: the network after that many epochs of the budget's schedule (segbook evaluate "
                    "--snapshots), at the device-hours its run had spent by then: its learning rate had not decayed, "
                    "so it is not what a run of that many epochs would score",
                    "datasets: those the point averages (a snapshot point only those with a checked snapshot "
                    "evaluation); device-hours are GPU-hours where the runs trained on cuda"]
                   if table.rows else ["no points: no evaluated runs on the whole train split"]) + protocol_note(df)
    return table


def curve_figure(points: pd.DataFrame, metric: str = "dice"):
    """Score against device-hours, one colour per (model, init, recipe): its finished runs of each budget joined by
    a solid line, each budget's snapshots by a dashed line ending at that budget's run; None without a point with a
    cost."""
    from matplotlib.figure import Figure

    shown = points.dropna(subset=["hours", "score"])
    if shown.empty:
        return None
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axis = figure.subplots()
    named = shows_recipes(list(shown["config"]))
    for number, (family, group) in enumerate(shown.groupby("family", sort=False)):
        colour = f"C{number % 10}"
        runs = group[group["kind"] == RUN].sort_values("hours")
        axis.plot(runs["hours"], runs["score"], "-o", color=colour, label=config_label((*family, ""), named))
        for budget, of_budget in group.groupby("budget"):
            curve = of_budget.sort_values("epoch")
            if (curve["kind"] == SNAPSHOT).any():
                axis.plot(curve["hours"], curve["score"], "--", marker=".", color=colour, alpha=0.8)
    axis.set_xlabel("training device-hours per run")
    axis.set_ylabel(f"mean {metric_label(metric)}")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    return figure
