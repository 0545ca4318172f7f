"""Pretrained vs scratch, paired over datasets: wins/ties/losses, Wilcoxon signed-rank test, bootstrap CI; per
dataset over its test cases; configurations against each other (significance maps) and rank stability.

Each STU-Net size (per recipe and variant) is compared with itself trained from scratch on the datasets of a group
that have both, the scratch variant whose shared training settings match (`segbook.results.configs.delta_pairs`), on
the datasets where the two agree in data and evaluation settings and test split; each recipe also with the default
recipe of the same size (`compare_recipes`). A
difference within `TIE_TOLERANCE` is a tie; the Wilcoxon test is scipy's two-sided signed-rank test on the raw
differences (zero differences dropped, scipy's default); the confidence interval is the percentile bootstrap of
the mean difference with a fixed seed, so a report is reproducible to the digit. Dataset scores are means over
seeds, of the runs on the whole train split; differences are signed so that positive means better (HD95 reversed).

Per dataset (`case_tests`), pretrained and scratch are compared over the test cases with the same Wilcoxon test on
the per-case foreground-mean score (seeds averaged per case), corrected across datasets with Holm and
Benjamini-Hochberg (statsmodels' `multipletests`). Corrections and one-sided tests come from the libraries.

By kind: `paired` (pretrained vs scratch and recipes over the datasets of a group, with the shared constants),
`cases` (per dataset over test cases), `ranking` (significance maps, rank stability); here, each statistic as a
table by name for the table registry (`segbook.results.tables`). Every name is importable from this package.
"""

from __future__ import annotations

import pandas as pd

from segbook.results.selection import Selection
from segbook.results.stats.cases import case_tests, case_tests_table, corrected_p
from segbook.results.stats.paired import (ALPHA, BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED, CASE_COUNT_COLUMNS,
                                          CASE_TEST_COLUMNS, CONFIDENCE, RANK_SAMPLES, RECIPE_STATS_COLUMNS,
                                          STATS_COLUMNS, TIE_TOLERANCE, VERDICTS, PairedComparison, bootstrap_ci,
                                          compare_pretrained, compare_recipes, paired_comparison, recipe_stats_table,
                                          stats_table, wilcoxon_p)
from segbook.results.stats.ranking import (NEVER_COMPARED, RANK_COLUMNS, SIGNIFICANCE_COLUMNS, rank_stability,
                                           rank_table, significance_map, significance_table)
from segbook.results.tables.table import ResultTable

__all__ = [
    "ALPHA", "BOOTSTRAP_SAMPLES", "BOOTSTRAP_SEED", "CASE_COUNT_COLUMNS", "CASE_TEST_COLUMNS", "CONFIDENCE",
    "NEVER_COMPARED", "RANK_COLUMNS", "RANK_SAMPLES", "RECIPE_STATS_COLUMNS", "SIGNIFICANCE_COLUMNS", "STATS_COLUMNS",
    "TIE_TOLERANCE", "VERDICTS", "PairedComparison", "bootstrap_ci", "case_test_stats", "case_tests",
    "case_tests_table", "compare_pretrained", "compare_recipes", "corrected_p", "paired_comparison", "pretrained_stats",
    "rank_stability", "rank_stats", "rank_table", "recipe_stats", "recipe_stats_table", "significance_map",
    "significance_stats", "significance_table", "stats_table", "wilcoxon_p",
]


def pretrained_stats(df: pd.DataFrame, selection: Selection, group_by: str) -> ResultTable:
    """The `--stats` form of a table over `group_by` (`all` for the per-dataset and fractions tables): pretrained
    vs scratch per group, with the per-case verdicts (`case_tests`, which reads each run's metrics.csv)."""
    comparison = compare_pretrained(df, selection, group_by, case_tests(df, selection))
    return stats_table(comparison, selection.metric, "over all datasets" if group_by == "all" else f"by {group_by}")


def recipe_stats(df: pd.DataFrame, selection: Selection) -> ResultTable:
    """The `--stats` form of the recipes table: each recipe against scratch and against the default recipe."""
    return recipe_stats_table(compare_recipes(df, selection), selection.metric)


def case_test_stats(df: pd.DataFrame, selection: Selection) -> ResultTable:
    """`--table case-tests`: per dataset, pretrained vs scratch over the test cases."""
    return case_tests_table(case_tests(df, selection), selection.metric)


def significance_stats(df: pd.DataFrame, selection: Selection) -> ResultTable:
    """`--table significance`: the significance maps by dataset scale."""
    return significance_table(significance_map(df, selection, "scale"))


def rank_stats(df: pd.DataFrame, selection: Selection) -> ResultTable:
    """`--table ranks`: rank stability by dataset scale."""
    return rank_table(rank_stability(df, selection, "scale"))
