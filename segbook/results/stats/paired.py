"""Pretrained vs scratch, paired over datasets: wins/ties/losses, Wilcoxon signed-rank test, bootstrap CI, per
group of datasets (`compare_pretrained`), and each recipe against scratch and the default recipe
(`compare_recipes`); their tables.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import numpy as np
import pandas as pd

from segbook.results.configs import DEFAULT_RECIPE, DELTA, MODEL_NAMES, configurations, delta_pairs, variant_profiles
from segbook.results.scores import (METRIC_NAMES, Config, Member, ScoreLookup, delta_unit, metric_factor, metric_label,
                                    metric_sign, whole_split)
from segbook.results.selection import Selection
from segbook.results.tables.groups import grouped_lookup
from segbook.results.tables.recipes import VS_DEFAULT, VS_SCRATCH, recipe_baselines, recipe_configs, recipe_rows
from segbook.results.tables.table import ResultTable


#: |pretrained - scratch| at or below this (a fraction: 0.1 Dice points) is a tie.
TIE_TOLERANCE = 0.001
BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
STATS_COLUMNS = ("model", "recipe", "variant", "group", "n", "scratch", "pretrained", "delta", "ci_low", "ci_high",
                 "wins", "ties", "losses", "p_value")
#: Per-case test verdicts counted per group (with `case_tests`): significantly better, not different, worse.
VERDICTS = ("better", "not different", "worse")
CASE_COUNT_COLUMNS = ("better", "not_different", "worse")
#: Significance level of the per-case tests (after Holm) and of the significance maps.
ALPHA = 0.05
CASE_TEST_COLUMNS = ("task", "model", "recipe", "variant", "cases", "delta", "p_value", "p_holm", "p_bh", "verdict")
RANK_SAMPLES = 1000
#: A recipe against a baseline (`scratch` or the default recipe): `baseline` and `score` are their mean scores.
RECIPE_STATS_COLUMNS = ("model", "recipe", "variant", "versus", "group", "n", "baseline", "score", "delta", "ci_low",
                        "ci_high", "wins", "ties", "losses", "p_value")


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
                      seed: int = BOOTSTRAP_SEED, metric: str = "dice") -> PairedComparison:
    """Compare paired dataset scores (as stored: fractions, or mm for HD95); the result is in points (mm), the
    difference signed so that positive means pretraining is better. `tie_tolerance` is in stored units of a
    fraction-valued metric: 0.001 = 0.1 points, and 0.1 mm for HD95."""
    factor, sign = metric_factor(metric), metric_sign(metric)
    pretrained_scores, scratch_scores = np.asarray(pretrained, float), np.asarray(scratch, float)
    differences = sign * (pretrained_scores - scratch_scores)
    tolerance = tie_tolerance * 100.0 / factor
    low, high = bootstrap_ci(differences, samples, seed)
    n = len(differences)
    return PairedComparison(
        n=n, scratch=factor * scratch_scores.mean() if n else math.nan,
        pretrained=factor * pretrained_scores.mean() if n else math.nan,
        delta=factor * differences.mean() if n else math.nan, ci_low=factor * low, ci_high=factor * high,
        wins=int(np.sum(differences > tolerance)), ties=int(np.sum(np.abs(differences) <= tolerance)),
        losses=int(np.sum(differences < -tolerance)), p_value=wilcoxon_p(differences))


def _compared(lookup: ScoreLookup, tasks: list[Member], config: Config, baseline: Config,
              metric: str = "dice") -> PairedComparison | None:
    """`config` against `baseline` over the members that have both (with agreeing bases); None when none has."""
    pairs = [pair for task, part in tasks if (pair := lookup.pair(part, task, config, baseline)) is not None]
    return paired_comparison([s for s, _ in pairs], [b for _, b in pairs], metric=metric) if pairs else None


def compare_pretrained(df: pd.DataFrame, selection: Selection | str = "dice", group_by: str = "scale",
                       cases: pd.DataFrame | None = None, **choices: Any) -> pd.DataFrame:
    """A row per (STU-Net size with both initialisations, recipe, variant, non-empty group): see STATS_COLUMNS.

    `group_by` is a grouping of `segbook.results.tables.groups.grouping` (`scale`, `modality-target`, `region`,
    `all`); the datasets and label parts are those of the corresponding table, so n equals its Delta(PT) row's n.
    The selection's `recipes` are the pretrained recipes to compare (default: those in `df`); its `inits` do not
    apply. With `cases` (`case_tests`), the counts of the group's datasets whose per-case test says pretraining is
    better / not different / worse (CASE_COUNT_COLUMNS; a dataset split by label into several groups counts in each,
    with its whole-dataset test).
    """
    selection = replace(Selection.of(selection, **choices), inits=None)
    metric, df = selection.metric, whole_split(df)
    configs = configurations(df, selection)
    members, lookup = grouped_lookup(df, configs, selection, group_by)
    verdicts = {} if cases is None else dict(zip(zip(cases["task"], cases["model"], cases["recipe"], cases["variant"]),
                                                 cases["verdict"]))
    rows = []
    for config, scratch in delta_pairs(configs, variant_profiles(df)):
        for group, tasks in members.items():
            if (result := _compared(lookup, tasks, config, scratch, metric)) is not None:
                counts = {} if cases is None else _verdict_counts(verdicts, config, tasks)
                rows.append({"model": config[0], "recipe": config[2], "variant": config[3], "group": group,
                             **asdict(result), **counts})
    columns = [*STATS_COLUMNS, *(CASE_COUNT_COLUMNS if cases is not None else ())]
    return pd.DataFrame(rows, columns=columns)


def _verdict_counts(verdicts: dict[tuple[str, str, str, str], str], config: Config,
                    tasks: list[Member]) -> dict[str, int]:
    """(task, model, recipe, variant) -> verdict, counted over the group's datasets."""
    mine = [verdicts.get((task, config[0], config[2], config[3])) for task in dict.fromkeys(task for task, _ in tasks)]
    return {column: mine.count(verdict) for column, verdict in zip(CASE_COUNT_COLUMNS, VERDICTS)}


def compare_recipes(df: pd.DataFrame, selection: Selection | str = "dice", group_by: str = "scale",
                    **choices: Any) -> pd.DataFrame:
    """A row per (STU-Net size, recipe, baseline, non-empty group) of the recipes table: each recipe against
    scratch and against the default recipe, over the datasets with both (see RECIPE_STATS_COLUMNS)."""
    selection = Selection.of(selection, **choices)
    metric, df = selection.metric, whole_split(df)
    pretrained = recipe_configs(df, selection)
    shown = recipe_rows(df, pretrained)
    members, lookup = grouped_lookup(df, shown, selection, group_by)
    profiles = variant_profiles(df)
    rows = []
    for config in pretrained:
        for _, baseline in recipe_baselines(config, shown, profiles):
            for group, tasks in members.items():
                if (result := _compared(lookup, tasks, config, baseline, metric)) is not None:
                    versus = baseline[2] + (f" [{baseline[3]}]" if baseline[3] else "")
                    rows.append({"model": config[0], "recipe": config[2], "variant": config[3], "versus": versus,
                                 "group": group, **_versus(result)})
    return pd.DataFrame(rows, columns=list(RECIPE_STATS_COLUMNS))


def _versus(result: PairedComparison) -> dict[str, object]:
    """A comparison whose means are the baseline's and the recipe's (not always scratch's and the paper's)."""
    row = asdict(result)
    baseline, score = row.pop("scratch"), row.pop("pretrained")
    return {**row, "baseline": baseline, "score": score}


def frame_table(name: str, title: str, frame: pd.DataFrame, columns: Sequence[str]) -> ResultTable:
    """A frame's rows as a table of `columns`, numbers rounded as the statistics tables show them."""
    table = ResultTable(name, title, list(columns), display={"model": MODEL_NAMES})
    table.rows = [[rounded(column, getattr(row, column)) for column in columns]
                  for row in frame.itertuples(index=False)]
    return table


def stats_table(comparison: pd.DataFrame, metric: str, title: str) -> ResultTable:
    """The comparison as a table for `emit` and the report; empty with a note when no size has both inits. The
    recipe is named only when one other than the default is compared, and the variant only when one is, as in the
    other tables."""
    columns = named_columns(comparison)
    table = frame_table("stats", f"pretrained vs scratch, {metric_label(metric)} {title}", comparison, columns)
    table.notes = [
        f"per STU-Net size and group, over the datasets with both initialisations (n): mean scores, {DELTA} "
        f"({delta_unit(metric)}) with its {CONFIDENCE:.0%} bootstrap CI ({BOOTSTRAP_SAMPLES} resamples, seed "
        f"{BOOTSTRAP_SEED}), wins/ties/losses of pretrained (tie: |difference| <= {100 * TIE_TOLERANCE:g} "
        f"{delta_unit(metric)}) and the two-sided Wilcoxon signed-rank p-value over datasets (NaN: all differences "
        "zero)", *sign_note(metric)]
    if "better" in comparison.columns:
        table.notes.append(_counts_note())
    if comparison.empty:
        table.notes = ["no comparison: no STU-Net size has both pretrained and scratch results on a dataset"]
    return table


def recipe_stats_table(comparison: pd.DataFrame, metric: str, title: str = "by dataset scale") -> ResultTable:
    """`compare_recipes` as a table: the statistics of the recipes table's delta rows."""
    columns = [c for c in RECIPE_STATS_COLUMNS if c != "variant" or comparison["variant"].ne("").any()]
    table = frame_table("recipe-stats", f"recipes vs scratch and vs {DEFAULT_RECIPE}, {metric_label(metric)} "
                         f"{title}", comparison, columns)
    table.notes = [
        f"per STU-Net size, recipe and group, over the datasets with both the recipe and the baseline it is compared "
        f"with (versus: scratch, as the {VS_SCRATCH} rows, or the {DEFAULT_RECIPE} recipe, as the {VS_DEFAULT} "
        f"rows): mean scores of baseline and recipe, their mean difference (points) with its {CONFIDENCE:.0%} "
        f"bootstrap CI ({BOOTSTRAP_SAMPLES} resamples, seed {BOOTSTRAP_SEED}), wins/ties/losses of the recipe (tie: "
        f"|difference| <= {100 * TIE_TOLERANCE:g} {delta_unit(metric)}) and the two-sided Wilcoxon signed-rank "
        "p-value", *sign_note(metric)]
    if comparison.empty:
        table.notes = ["no comparison: no recipe has results on a dataset that also has its baseline's"]
    return table


def named_columns(frame: pd.DataFrame) -> list[str]:
    """The frame's columns without `recipe` where every row has the default recipe, and without `variant` where
    none has one: the tables of the default configurations look as they always did."""
    return [c for c in frame.columns if not (c == "recipe" and frame["recipe"].eq(DEFAULT_RECIPE).all()
                                             or c == "variant" and frame["variant"].eq("").all())]


def rounded(column: str, value: object) -> object:
    """Points to two decimals, p-values to three significant digits, NaN as None (shown as '-')."""
    if not isinstance(value, float):
        return value
    if math.isnan(value):
        return None
    return float(f"{value:.3g}") if column.startswith("p_") else round(value, 2) + 0.0  # no -0.0


def sign_note(metric: str) -> list[str]:
    if metric_sign(metric) > 0:
        return []
    return [f"{METRIC_NAMES[metric]}: lower is better; every difference is baseline minus the compared "
            "configuration, so positive means the compared one (pretrained) is better"]


def _counts_note() -> str:
    return (f"better / not_different / worse: datasets of the group whose per-case test (Wilcoxon signed-rank over "
            f"the test cases, Holm-corrected across datasets) is significant at {ALPHA:g} with pretraining better, "
            "not significant, or significant with pretraining worse (table case-tests)")
