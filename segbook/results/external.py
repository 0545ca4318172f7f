"""The external table: does a run hold up on a dataset it never saw, and does pretraining narrow the gap?

Per (trained on A, tested on B, which of B's cases) pair and configuration, from the runs the other tables count
(evaluated, on the whole train split) and their external evaluations (`segbook evaluate --on`, checked by
`segbook.evaluation.files.check_external`; one that fails is left out with a warning):
- internal: the mean over A's test cases, external: over B's cases, of each case's mean over the shared structures
  of the metric (seeds and folds averaged per case); internal and external use the same structures: those scored
  under one of A's labels (a structure merging several of A's labels has no internal score and is left out);
- gap: internal - external (points; HD95 reversed, so positive is always "worse on B");
- for each pretrained configuration with a scratch baseline: Delta(PT) internally and externally, the mean per-case
  difference over the cases both scored, each with the two-sided Wilcoxon signed-rank test over those cases (as
  `--table case-tests`); `narrows`: Delta(PT) external - internal, which is the scratch gap minus the pretrained gap
  (positive: pretraining narrows it), with a two-sided Mann-Whitney U test of the per-case differences on B
  against those on A (different cases: not paired).
Rows are grouped like the other tables: by modality shift (same modality, CT -> MRI, ...), then by the trained-on
dataset's target and scale (the registry's, in its order). External scores are read only here: they never
enter the internal tables.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from segbook.errors import SegbookError
from segbook.evaluation.files import check_external, read_json
from segbook.registry import SCALES, TARGETS, Registry
from segbook.results.cells import run_folders
from segbook.results.collect import ResultsWarning, frame_registry
from segbook.results.configs import config_label, configurations, delta_pairs, variant_profiles
from segbook.results.scores import (CONFIG_KEYS, delta_unit, metric_factor, metric_label, metric_sign,
                                    whole_split)
from segbook.results.selection import Selection
from segbook.results.stats.paired import wilcoxon_p
from segbook.results.tables.table import ResultTable
from segbook.runs import METRICS, SUMMARY, FolderParts, evaluation_folder, external_root
from segbook.structures import modality_shift

PAIR_KEYS = ["shift", "task", "tested", "cases"]
COLUMNS = ["shift", "target", "scale", "trained_on", "tested_on", "cases", "configuration", "n_internal", "internal",
           "n_external", "external", "gap", "delta_internal", "p_internal", "delta_external", "p_external",
           "narrows_by", "p_narrows", "narrows"]


def external_case_scores(df: pd.DataFrame, metric: str = "dice", registry: Registry | None = None) -> pd.DataFrame:
    """Per (pair, configuration, side, case): the case's score, averaged over the runs (seeds, folds) that scored
    it; `side` internal (A's test cases) or external (B's). Only runs with an external evaluation count."""
    registry = registry or frame_registry(df)
    runs = whole_split(df)
    runs = runs[runs["evaluated"] & run_folders(runs)]
    frames = []
    for row in runs.itertuples(index=False):
        for folder in _external_folders(Path(row.path)):
            scored = _checked(folder, Path(row.path), registry.get(row.task))
            if scored is None:
                continue
            summary, labels = scored
            if not labels:
                continue
            keys = {"shift": modality_shift(*(summary["external"]["modality"][k] for k in ("trained", "tested"))),
                    "task": row.task, "tested": summary["external"]["tested_on"],
                    "cases": summary["external"]["cases"], **{k: getattr(row, k) for k in CONFIG_KEYS}}
            internal = evaluation_folder(Path(row.path)) / METRICS
            for side, file in (("internal", internal), ("external", folder / METRICS)):
                frames.append(_per_case(file, labels, metric).assign(side=side, **keys))
    if not frames:
        return pd.DataFrame(columns=[*PAIR_KEYS, *CONFIG_KEYS, "side", "case", "score"])
    frame = pd.concat(frames, ignore_index=True)
    return frame.groupby([*PAIR_KEYS, *CONFIG_KEYS, "side", "case"], sort=False)["score"].mean().reset_index()


def _external_folders(run: Path) -> list[Path]:
    root = external_root(run)
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


def _checked(folder: Path, run: Path, entry) -> tuple[dict[str, Any], list[int]] | None:
    """The external summary and the labels the table compares (one of A's labels each), or None (warned) when the
    folder fails the checks."""
    try:
        summary = read_json(folder / SUMMARY)
        verdict, _ = check_external(folder, summary, entry, FolderParts.parse(run))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SegbookError) as error:  # left out, named
        verdict, summary = None, None
        problem = f"unreadable {folder / SUMMARY}: {error}"
    else:
        problem = verdict.problem
    if problem:
        warnings.warn(f"{problem}; this external evaluation is left out of the external table (run segbook evaluate "
                      "--on again with --force)", ResultsWarning, stacklevel=4)
        return None
    labels = [int(s["label"]) for s in summary["external"]["structures"] if len(s["trained_labels"]) == 1]
    return summary, labels


def _per_case(file: Path, labels: list[int], metric: str) -> pd.DataFrame:
    """Each case's mean over `labels` of the metric (NaN-ignoring), from a checked metrics.csv."""
    rows = pd.read_csv(file, usecols=["case", "label", metric], dtype={"case": str})
    rows = rows[rows["label"].isin(labels)]
    return rows.groupby("case", sort=True)[metric].mean().rename("score").reset_index()


def external_comparison(df: pd.DataFrame, selection: Selection | str = "dice",
                        registry: Registry | None = None) -> pd.DataFrame:
    """The external table's numbers: one row per pair and configuration shown (see the module's docstring)."""
    selection = Selection.of(selection)
    metric = selection.metric
    registry = registry or frame_registry(df)
    scores = external_case_scores(df, metric, registry)
    configs = configurations(whole_split(df), selection)
    baselines = dict(delta_pairs(configs, variant_profiles(whole_split(df))))
    factor, sign = metric_factor(metric), metric_sign(metric)
    by_key = {key: frame.set_index("case")["score"] for key, frame in
              scores.groupby([*PAIR_KEYS, *CONFIG_KEYS, "side"], sort=False)}
    rows = []
    for pair_key in scores[PAIR_KEYS].drop_duplicates().itertuples(index=False):
        for config in configs:
            internal, external = (by_key.get((*pair_key, *config, side)) for side in ("internal", "external"))
            if internal is None or external is None:
                continue
            trained = registry.get(pair_key.task)
            row = {"shift": pair_key.shift, "target": trained.target, "scale": trained.scale,
                   "trained_on": pair_key.task, "tested_on": pair_key.tested,
                   "cases": pair_key.cases, "configuration": config_label(config),
                   "n_internal": int(internal.notna().sum()), "internal": factor * internal.mean(),
                   "n_external": int(external.notna().sum()), "external": factor * external.mean()}
            row["gap"] = sign * (row["internal"] - row["external"])
            baseline = baselines.get(config)
            if baseline is not None:
                row.update(_versus_scratch(by_key, tuple(pair_key), config, baseline, factor, sign))
            rows.append(row)
    return grouped(pd.DataFrame(rows, columns=COLUMNS))


def grouped(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows by modality shift (same modality first, then each shift by name), then the trained-on dataset's
    target and scale in the registry's order, then the pair; configurations keep their order within a pair."""
    order = {"_shift": frame["shift"].ne("same modality"), "_target": frame["target"].map(TARGETS.index),
             "_scale": frame["scale"].map(SCALES.index)}
    return frame.assign(**order).sort_values(["_shift", "shift", "_target", "_scale", "trained_on", "tested_on",
                                              "cases"], kind="stable").drop(columns=list(order)).reset_index(drop=True)


def _versus_scratch(by_key: dict, pair_key: tuple, config: tuple, baseline: tuple, factor: float,
                    sign: float) -> dict[str, Any]:
    differences = {}
    for side in ("internal", "external"):
        mine, base = by_key.get((*pair_key, *config, side)), by_key.get((*pair_key, *baseline, side))
        if mine is None or base is None:
            return {}
        both = pd.concat([mine, base], axis=1, keys=["mine", "base"], join="inner").dropna()
        differences[side] = sign * (both["mine"].to_numpy() - both["base"].to_numpy())
    internal, external = differences["internal"], differences["external"]
    if not len(internal) or not len(external):
        return {}
    narrows = factor * (external.mean() - internal.mean())
    return {"delta_internal": factor * internal.mean(), "p_internal": wilcoxon_p(internal),
            "delta_external": factor * external.mean(), "p_external": wilcoxon_p(external),
            "narrows_by": narrows, "p_narrows": _mann_whitney_p(external, internal),
            "narrows": "yes" if narrows > 0 else "no"}


def _mann_whitney_p(first: np.ndarray, second: np.ndarray) -> float:
    """Two-sided Mann-Whitney U p-value of two samples of per-case differences; NaN when both are constant and
    equal (nothing to rank)."""
    from scipy.stats import mannwhitneyu

    if np.unique(np.concatenate([first, second])).size < 2:
        return math.nan
    return float(mannwhitneyu(first, second, alternative="two-sided").pvalue)


def external_table(df: pd.DataFrame, selection: Selection, registry: Registry | None = None,
                   frame: pd.DataFrame | None = None) -> ResultTable:
    """`segbook results --table external` (of `frame`, the `external_comparison` when already computed)."""
    from segbook.results.stats.paired import rounded

    metric = selection.metric
    frame = external_comparison(df, selection, registry) if frame is None else frame
    table = ResultTable("external", f"internal vs external validation, {metric_label(metric)}", list(COLUMNS))
    table.rows = [[rounded(column, value) for column, value in zip(COLUMNS, values)]
                  for values in frame.itertuples(index=False, name=None)]
    table.notes = [
        f"per pair (trained on A, tested on B; cases: B's test split, or all its labelled cases) and configuration: "
        f"internal: mean over A's test cases, external: over B's cases, of each case's mean {metric_label(metric)} "
        "over the structures both datasets label (scored under one of A's labels; seeds and folds averaged per "
        f"case); gap: internal - external ({delta_unit(metric)}; positive: worse on B)",
        "delta_internal / delta_external: Delta(PT), the mean per-case pretrained - scratch over the cases both "
        "scored, with the two-sided Wilcoxon signed-rank p over those cases; narrows_by: delta_external - "
        "delta_internal (= scratch's gap - pretrained's gap; positive: pretraining narrows the gap), p_narrows: "
        "two-sided Mann-Whitney U of the per-case differences on B against those on A",
        "external scores (segbook evaluate --on) are read by this table only; every other table is internal"]
    if frame.empty:
        table.notes = ["no external evaluation yet: `segbook tasks pairs` lists which datasets can validate which, "
                       "`segbook evaluate ... --on TASK` scores a run on one"]
    return table


def external_figure(frame: pd.DataFrame, metric: str = "dice"):
    """Internal against external score, one point per pair and configuration of an `external_comparison`, with
    the diagonal (no gap): points below it are worse on the data the run never saw. None when there is none."""
    from matplotlib.figure import Figure

    if frame.empty:
        return None
    figure = Figure(figsize=(5.5, 4.5), layout="constrained")
    axis = figure.subplots()
    for row in frame.itertuples(index=False):
        pretrained = " pretrained" in row.configuration
        axis.scatter(row.internal, row.external, marker="o" if pretrained else "s", s=40)
        axis.annotate(f"{row.configuration}: {row.tested_on} ({row.shift})", (row.internal, row.external),
                      fontsize=6, xytext=(3, 3), textcoords="offset points")
    low = float(np.nanmin(frame[["internal", "external"]].to_numpy()))
    high = float(np.nanmax(frame[["internal", "external"]].to_numpy()))
    axis.plot([low, high], [low, high], color="grey", linewidth=0.8, linestyle="--")
    axis.set_xlabel(f"internal mean {metric_label(metric)} (trained-on dataset's test split)")
    axis.set_ylabel(f"external mean {metric_label(metric)}")
    axis.grid(alpha=0.3)
    return figure
