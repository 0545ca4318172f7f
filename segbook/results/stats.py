"""Pretrained vs scratch, paired over datasets: wins/ties/losses, Wilcoxon signed-rank test, bootstrap CI.

Each STU-Net size is compared with itself trained from scratch on the datasets of a group that have both. A
difference within `TIE_TOLERANCE` is a tie; the Wilcoxon test is scipy's two-sided signed-rank test on the raw
differences (zero differences dropped, scipy's default); the confidence interval is the percentile bootstrap of
the mean difference with a fixed seed, so a report is reproducible to the digit.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from segbook.results.tables import (
    DELTA,
    METRIC_NAMES,
    MODEL_NAMES,
    ResultTable,
    configurations,
    dataset_facts,
    group_members,
    grouping,
    paired_models,
    score_lookup,
)

#: |pretrained - scratch| at or below this (a fraction: 0.1 Dice points) is a tie.
TIE_TOLERANCE = 0.001
BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
STATS_COLUMNS = ("model", "group", "n", "scratch", "pretrained", "delta", "ci_low", "ci_high", "wins", "ties",
                 "losses", "p_value")


@dataclass(frozen=True)
class PairedComparison:
    """Pretrained vs scratch over n datasets; scores and differences in points (percent)."""

    n: int
    scratch: float
    pretrained: float
    delta: float
    ci_low: float
    ci_high: float
    wins: int
    ties: int
    losses: int
    p_value: float


def wilcoxon_p(differences: np.ndarray) -> float:
    """Two-sided p-value; NaN when every difference is zero (the test has nothing to rank)."""
    from scipy.stats import wilcoxon

    if not np.any(differences != 0):
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(wilcoxon(differences).pvalue)


def bootstrap_ci(differences: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
                 confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: resample the datasets with replacement `samples` times."""
    if len(differences) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = differences[rng.integers(0, len(differences), size=(samples, len(differences)))].mean(axis=1)
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def paired_comparison(pretrained: Sequence[float], scratch: Sequence[float],
                      tie_tolerance: float = TIE_TOLERANCE, samples: int = BOOTSTRAP_SAMPLES,
                      seed: int = BOOTSTRAP_SEED) -> PairedComparison:
    """Compare paired dataset scores (fractions); the result is in points."""
    pretrained_scores, scratch_scores = np.asarray(pretrained, float), np.asarray(scratch, float)
    differences = pretrained_scores - scratch_scores
    low, high = bootstrap_ci(differences, samples, seed)
    n = len(differences)
    return PairedComparison(
        n=n, scratch=100 * scratch_scores.mean() if n else math.nan,
        pretrained=100 * pretrained_scores.mean() if n else math.nan,
        delta=100 * differences.mean() if n else math.nan, ci_low=100 * low, ci_high=100 * high,
        wins=int(np.sum(differences > tie_tolerance)), ties=int(np.sum(np.abs(differences) <= tie_tolerance)),
        losses=int(np.sum(differences < -tie_tolerance)), p_value=wilcoxon_p(differences))


def compare_pretrained(df: pd.DataFrame, metric: str = "dice", group_by: str = "scale",
                       group_datasets: bool = False, models: Sequence[str] | None = None) -> pd.DataFrame:
    """A row per (STU-Net size with both initialisations, non-empty group): see STATS_COLUMNS.

    `group_by` is a grouping of `segbook.results.tables.grouping` (`scale`, `modality-target`, `region`, `all`);
    the datasets and label parts are those of the corresponding table, so n equals its Delta(PT) row's n.
    """
    configs = configurations(df, models)
    members = group_members(dataset_facts(df, configs), grouping(group_by, group_datasets))
    lookup = score_lookup(df, metric, {part for tasks in members.values() for _, part in tasks})
    rows = []
    for model in paired_models(configs):
        for group, tasks in members.items():
            pairs = [(lookup[part].get((task, model, "pretrained")), lookup[part].get((task, model, "scratch")))
                     for task, part in tasks]
            pairs = [pair for pair in pairs if None not in pair]
            if pairs:
                rows.append({"model": model, "group": group,
                             **asdict(paired_comparison([p for p, _ in pairs], [s for _, s in pairs]))})
    return pd.DataFrame(rows, columns=list(STATS_COLUMNS))


def stats_table(comparison: pd.DataFrame, metric: str, title: str) -> ResultTable:
    """The comparison as a table for `emit` and the report; empty with a note when no size has both inits."""
    table = ResultTable("stats", f"pretrained vs scratch, {METRIC_NAMES[metric]} (%) {title}", list(STATS_COLUMNS),
                        display={"model": MODEL_NAMES})
    table.rows = [[_rounded(column, value) for column, value in zip(STATS_COLUMNS, row)]
                  for row in comparison.itertuples(index=False)]
    table.notes = [
        f"per STU-Net size and group, over the datasets with both initialisations (n): mean scores, {DELTA} "
        f"(points) with its {CONFIDENCE:.0%} bootstrap CI ({BOOTSTRAP_SAMPLES} resamples, seed {BOOTSTRAP_SEED}), "
        f"wins/ties/losses of pretrained (tie: |difference| <= {100 * TIE_TOLERANCE:g} points) and the two-sided "
        "Wilcoxon signed-rank p-value (NaN: all differences zero)"]
    if comparison.empty:
        table.notes = ["no comparison: no STU-Net size has both pretrained and scratch results on a dataset"]
    return table


def _rounded(column: str, value: object) -> object:
    """Points to two decimals, p-values to three significant digits, NaN as None (shown as '-')."""
    if not isinstance(value, float):
        return value
    if math.isnan(value):
        return None
    return float(f"{value:.3g}") if column == "p_value" else round(value, 2)
