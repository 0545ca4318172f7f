"""Pretrained vs scratch, paired over datasets: wins/ties/losses, Wilcoxon signed-rank test, bootstrap CI.

Each STU-Net size (per recipe) is compared with itself trained from scratch on the datasets of a group that have
both; each recipe also with the default recipe of the same size (`compare_recipes`). A
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
    DEFAULT_RECIPE,
    DELTA,
    METRIC_NAMES,
    MODEL_NAMES,
    VS_DEFAULT,
    VS_SCRATCH,
    Config,
    Member,
    ResultTable,
    ScoreLookup,
    configurations,
    dataset_facts,
    delta_pairs,
    group_members,
    grouping,
    recipe_baselines,
    recipe_configs,
    score_lookup,
)

#: |pretrained - scratch| at or below this (a fraction: 0.1 Dice points) is a tie.
TIE_TOLERANCE = 0.001
BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
STATS_COLUMNS = ("model", "recipe", "group", "n", "scratch", "pretrained", "delta", "ci_low", "ci_high", "wins",
                 "ties", "losses", "p_value")
#: A recipe against a baseline (`scratch` or the default recipe): `baseline` and `score` are their mean scores.
RECIPE_STATS_COLUMNS = ("model", "recipe", "versus", "group", "n", "baseline", "score", "delta", "ci_low", "ci_high",
                        "wins", "ties", "losses", "p_value")


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


def _compared(lookup: ScoreLookup, tasks: list[Member], config: Config, baseline: Config) -> PairedComparison | None:
    """`config` against `baseline` over the members that have both; None when none has."""
    pairs = [(lookup[part].get((task, *config)), lookup[part].get((task, *baseline))) for task, part in tasks]
    pairs = [pair for pair in pairs if None not in pair]
    return paired_comparison([s for s, _ in pairs], [b for _, b in pairs]) if pairs else None


def compare_pretrained(df: pd.DataFrame, metric: str = "dice", group_by: str = "scale",
                       group_datasets: bool = False, models: Sequence[str] | None = None,
                       recipes: Sequence[str] | None = None) -> pd.DataFrame:
    """A row per (STU-Net size with both initialisations, recipe, non-empty group): see STATS_COLUMNS.

    `group_by` is a grouping of `segbook.results.tables.grouping` (`scale`, `modality-target`, `region`, `all`);
    the datasets and label parts are those of the corresponding table, so n equals its Delta(PT) row's n.
    `recipes` are the pretrained recipes to compare (default: those in `df`).
    """
    configs = configurations(df, models, None, recipes)
    members = group_members(dataset_facts(df, configs), grouping(group_by, group_datasets))
    lookup = score_lookup(df, metric, {part for tasks in members.values() for _, part in tasks})
    rows = []
    for config, scratch in delta_pairs(configs):
        for group, tasks in members.items():
            if (result := _compared(lookup, tasks, config, scratch)) is not None:
                rows.append({"model": config[0], "recipe": config[2], "group": group, **asdict(result)})
    return pd.DataFrame(rows, columns=list(STATS_COLUMNS))


def compare_recipes(df: pd.DataFrame, metric: str = "dice", group_by: str = "scale", group_datasets: bool = False,
                    models: Sequence[str] | None = None, recipes: Sequence[str] | None = None) -> pd.DataFrame:
    """A row per (STU-Net size, recipe, baseline, non-empty group) of the recipes table: each recipe against
    scratch and against the default recipe, over the datasets with both (see RECIPE_STATS_COLUMNS)."""
    pretrained = recipe_configs(df, models, recipes)
    shown = [*pretrained, *(baseline for config in pretrained for _, baseline in recipe_baselines(config, pretrained))]
    members = group_members(dataset_facts(df, shown), grouping(group_by, group_datasets))
    lookup = score_lookup(df, metric, {part for tasks in members.values() for _, part in tasks})
    rows = []
    for config in pretrained:
        for _, baseline in recipe_baselines(config, pretrained):
            for group, tasks in members.items():
                if (result := _compared(lookup, tasks, config, baseline)) is not None:
                    rows.append({"model": config[0], "recipe": config[2], "versus": baseline[2], "group": group,
                                 **_versus(result)})
    return pd.DataFrame(rows, columns=list(RECIPE_STATS_COLUMNS))


def _versus(result: PairedComparison) -> dict[str, object]:
    """A comparison whose means are the baseline's and the recipe's (not always scratch's and the paper's)."""
    row = asdict(result)
    baseline, score = row.pop("scratch"), row.pop("pretrained")
    return {**row, "baseline": baseline, "score": score}


def stats_table(comparison: pd.DataFrame, metric: str, title: str) -> ResultTable:
    """The comparison as a table for `emit` and the report; empty with a note when no size has both inits. The
    recipe is named only when one other than the default is compared, as in the other tables."""
    columns = [c for c in STATS_COLUMNS if c != "recipe" or comparison["recipe"].ne(DEFAULT_RECIPE).any()]
    table = ResultTable("stats", f"pretrained vs scratch, {METRIC_NAMES[metric]} (%) {title}", columns,
                        display={"model": MODEL_NAMES})
    table.rows = [[_rounded(column, getattr(row, column)) for column in columns]
                  for row in comparison.itertuples(index=False)]
    table.notes = [
        f"per STU-Net size and group, over the datasets with both initialisations (n): mean scores, {DELTA} "
        f"(points) with its {CONFIDENCE:.0%} bootstrap CI ({BOOTSTRAP_SAMPLES} resamples, seed {BOOTSTRAP_SEED}), "
        f"wins/ties/losses of pretrained (tie: |difference| <= {100 * TIE_TOLERANCE:g} points) and the two-sided "
        "Wilcoxon signed-rank p-value (NaN: all differences zero)"]
    if comparison.empty:
        table.notes = ["no comparison: no STU-Net size has both pretrained and scratch results on a dataset"]
    return table


def recipe_stats_table(comparison: pd.DataFrame, metric: str, title: str = "by dataset scale") -> ResultTable:
    """`compare_recipes` as a table: the statistics of the recipes table's delta rows."""
    table = ResultTable("recipe-stats", f"recipes vs scratch and vs {DEFAULT_RECIPE}, {METRIC_NAMES[metric]} (%) "
                        f"{title}", list(RECIPE_STATS_COLUMNS), display={"model": MODEL_NAMES})
    table.rows = [[_rounded(column, value) for column, value in zip(RECIPE_STATS_COLUMNS, row)]
                  for row in comparison.itertuples(index=False)]
    table.notes = [
        f"per STU-Net size, recipe and group, over the datasets with both the recipe and the baseline it is compared "
        f"with (versus: scratch, as the {VS_SCRATCH} rows, or the {DEFAULT_RECIPE} recipe, as the {VS_DEFAULT} "
        f"rows): mean scores of baseline and recipe, their mean difference (points) with its {CONFIDENCE:.0%} "
        f"bootstrap CI ({BOOTSTRAP_SAMPLES} resamples, seed {BOOTSTRAP_SEED}), wins/ties/losses of the recipe (tie: "
        f"|difference| <= {100 * TIE_TOLERANCE:g} points) and the two-sided Wilcoxon signed-rank p-value"]
    if comparison.empty:
        table.notes = ["no comparison: no recipe has results on a dataset that also has its baseline's"]
    return table


def _rounded(column: str, value: object) -> object:
    """Points to two decimals, p-values to three significant digits, NaN as None (shown as '-')."""
    if not isinstance(value, float):
        return value
    if math.isnan(value):
        return None
    return float(f"{value:.3g}") if column == "p_value" else round(value, 2)
