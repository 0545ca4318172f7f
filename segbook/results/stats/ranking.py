"""Configurations against each other: significance maps (one-sided Wilcoxon per ordered pair, Holm-corrected per
group) and rank stability (bootstrap over datasets).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd

from segbook.results.configs import comparability_classes, config_label, configurations, shows_recipes, variant_profiles
from segbook.results.collect import case_scores, run_folders
from segbook.results.scores import CONFIG_KEYS, Config, Member, ScoreLookup, counted_runs, metric_sign, whole_split
from segbook.results.selection import AGGREGATE_THEN_RANK, RANK_THEN_AGGREGATE, Selection
from segbook.results.stats.cases import corrected_p
from segbook.results.stats.paired import ALPHA, BOOTSTRAP_SEED, RANK_SAMPLES, rounded
from segbook.results.tables.groups import grouped_lookup
from segbook.results.tables.table import ResultTable


SIGNIFICANCE_COLUMNS = ("group", "config", "versus", "n", "p_value", "p_holm")
#: `significance_map`'s frame attribute: the pairs of configurations it never tests (their common training settings
#: differ: `comparability_classes`).
NEVER_COMPARED = "never_compared"


def significance_map(df: pd.DataFrame, selection: Selection | str = "dice", group_by: str = "scale",
                     **choices: Any) -> pd.DataFrame:
    """Per group, every ordered pair of configurations (config, versus): the one-sided Wilcoxon signed-rank test
    over the group's datasets that have both that `config` is better than `versus` (dataset scores, seeds
    averaged), and its p-value Holm-corrected over all the ordered pairs of the group (SIGNIFICANCE_COLUMNS). Two
    configurations are tested only where they share their common training settings (`comparability_classes`: budget,
    precision, plans, source), on the datasets where their runs agree in data and evaluation settings."""
    selection = Selection.of(selection, **choices)
    metric, df = selection.metric, whole_split(df)
    configs = configurations(df, selection)
    members, lookup = grouped_lookup(df, configs, selection, group_by)
    named = shows_recipes(configs)
    profiles = variant_profiles(df)
    classes = comparability_classes(configs, profiles)
    together = {(a, b) for members in classes.values() for a in members for b in members}
    rows = []
    never = [f"{config_label(config, named)} vs {config_label(versus, named)}" for i, config in enumerate(configs)
             for versus in configs[i + 1:] if (config, versus) not in together]
    for group, tasks in members.items():
        mine = []
        for config in configs:
            for versus in configs:
                if config != versus:
                    differences = (_differences(lookup, tasks, config, versus, metric)
                                   if (config, versus) in together else np.array([]))
                    mine.append({"group": group, "config": config_label(config, named),
                                 "versus": config_label(versus, named), "n": len(differences),
                                 "p_value": _greater_p(differences)})
        tested = [row for row in mine if not math.isnan(row["p_value"])]
        if tested:
            for row, p_holm in zip(tested, corrected_p([row["p_value"] for row in tested], "holm")):
                row["p_holm"] = float(p_holm)
        rows += [{"p_holm": math.nan, **row} for row in mine]
    frame = pd.DataFrame(rows, columns=list(SIGNIFICANCE_COLUMNS))
    frame.attrs[NEVER_COMPARED] = never
    return frame


def _differences(lookup: ScoreLookup, tasks: list[Member], config: Config, versus: Config,
                 metric: str) -> np.ndarray:
    pairs = [pair for task, part in tasks if (pair := lookup.pair(part, task, config, versus)) is not None]
    return metric_sign(metric) * np.array([a - b for a, b in pairs], float)


def _greater_p(differences: np.ndarray) -> float:
    """One-sided p that the differences are centred above zero; NaN when there is nothing to rank."""
    from scipy.stats import wilcoxon

    if not np.any(differences != 0):
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(wilcoxon(differences, alternative="greater").pvalue)


def significance_table(significance: pd.DataFrame) -> ResultTable:
    """The maps as a table: per group a row per configuration, a column per configuration it is tested against,
    the Holm-corrected one-sided p-value that the row's configuration is better than the column's."""
    labels = list(dict.fromkeys(significance["config"]))
    table = ResultTable("significance", "significance maps: row configuration better than column configuration",
                        ["group", "configuration", *labels])
    for (group, config), frame in significance.groupby(["group", "config"], sort=False):
        p_values = dict(zip(frame["versus"], frame["p_holm"]))
        table.rows.append([group, config, *(rounded("p_value", p_values[label]) if label in p_values else None
                                            for label in labels)])
    table.notes = [f"cell: one-sided Wilcoxon signed-rank p-value over the group's datasets with both (dataset "
                   f"scores, seeds averaged) that the row is better than the column, Holm-corrected over every ordered "
                   f"pair of the group; significant below {ALPHA:g}; '-': the same configuration, or nothing to rank"]
    never = significance.attrs.get(NEVER_COMPARED)
    if never:
        table.notes.append(f"never compared (trained with different budgets, precision or plans, or kept apart by "
                           f"their source): {'; '.join(never)}")
    if significance.empty:
        table.notes = ["no datasets: no runs of the shown configurations"]
    return table


RANK_COLUMNS = ("group", "config", "n", "first", "mean_rank")
#: rank-then-aggregate's further columns: how many of the n datasets were ranked per case (the others on their
#: dataset scores) and each configuration's average rank over the n datasets (1 = best).
RANK_THEN_AGGREGATE_COLUMNS = ("per_case", "average_rank")
#: The frame attribute naming the method that ranked it.
METHOD = "method"
#: `_case_table`'s column of a configuration: its fields joined.
CASE_COLUMN_JOIN = "\t"


def rank_stability(df: pd.DataFrame, selection: Selection | str = "dice", group_by: str = "all",
                   samples: int = RANK_SAMPLES, seed: int = BOOTSTRAP_SEED, **choices: Any) -> pd.DataFrame:
    """Per group, how often each configuration ranks first when the datasets are resampled with replacement
    (`samples` times, seeded): `first` is the share of resamples in which it is the best (ties share), `mean_rank`
    its mean place (1 = best). Only the group's datasets that have every configuration count (n), with their runs
    agreeing in data and evaluation settings. Configurations of different budgets, precision, plans or sources
    (`comparability_classes`) are ranked apart, the group then naming what they differ in: `small [2x1 it]`.

    The selection's `rank_method` says what "best" is: `aggregate-then-rank`, the best mean score over the
    resampled datasets; `rank-then-aggregate` (the challenge convention), the lowest average rank, where each
    dataset gives every configuration its mean rank over the test cases that all of them scored (ties share the
    average rank, scipy's `rankdata`), or its rank on the dataset scores where the dataset has no such cases
    (numbers imported from CSV, a label group of a split dataset). Its frame adds `per_case` and `average_rank`
    (RANK_THEN_AGGREGATE_COLUMNS, on all n datasets); `attrs["method"]` names the method.
    """
    selection = Selection.of(selection, **choices)
    metric, df = selection.metric, whole_split(df)
    method = selection.rank_method
    configs = configurations(df, selection)
    members, lookup = grouped_lookup(df, configs, selection, group_by)
    cases = _case_table(df, configs, metric) if method == RANK_THEN_AGGREGATE else None
    rng = np.random.default_rng(seed)
    named = shows_recipes(configs)
    profiles = variant_profiles(df)
    classes = comparability_classes(configs, profiles)
    rows = []
    for group, tasks in members.items():
        for label, ranked in classes.items():
            shown = group if len(classes) == 1 else f"{group} [{label}]"
            rows += _ranks(lookup, tasks, ranked, metric, rng, samples, shown, named, cases)
    columns = [*RANK_COLUMNS, *(RANK_THEN_AGGREGATE_COLUMNS if cases is not None else ())]
    frame = pd.DataFrame(rows, columns=columns)
    frame.attrs[METHOD] = method
    return frame


def _case_table(df: pd.DataFrame, configs: list[Config], metric: str) -> dict[str, pd.DataFrame]:
    """Per dataset, its test cases x configurations: the per-case scores (`collect.case_scores`, seeds and folds
    averaged per case) of the counted runs with a folder of `configs` (numbers imported from CSV have none)."""
    keys = pd.MultiIndex.from_arrays([df[key] for key in CONFIG_KEYS])
    runs = counted_runs(df[keys.isin(configs) & df["evaluated"] & run_folders(df)])
    tables = {}
    for task, scores in case_scores(runs, metric).groupby("task", sort=False):
        columns = [_case_column(tuple(key)) for key in zip(*(scores[key] for key in CONFIG_KEYS))]
        tables[task] = scores.assign(config=columns).pivot_table(index="case", columns="config", values="score",
                                                                 aggfunc="first")
    return tables


def _case_column(config: Config) -> str:
    return CASE_COLUMN_JOIN.join(config)


def _ranks(lookup: ScoreLookup, tasks: list[Member], configs: list[Config], metric: str, rng: np.random.Generator,
           samples: int, group: str, named: bool,
           cases: dict[str, pd.DataFrame] | None = None) -> list[dict[str, object]]:
    """The rank rows of `configs` over the members that have them all, their runs agreeing in basis; `cases`
    (`_case_table`) ranks them rank-then-aggregate."""
    from scipy.stats import rankdata

    complete = [(task, part) for task, part in tasks
                if all((task, *config) in lookup[part] for config in configs)
                and len({lookup.basis.get((task, *config)) for config in configs}) == 1]
    if not complete or len(configs) < 2:
        return []
    sign = metric_sign(metric)
    scores = sign * np.array([[lookup[part][(task, *config)] for config in configs] for task, part in complete])
    if cases is None:  # the mean score of each resample, ranked
        aggregates = scores[rng.integers(0, len(scores), size=(samples, len(scores)))].mean(axis=1)
        extra: list[dict[str, object]] = [{} for _ in configs]
    else:  # each dataset's ranks, averaged over each resample (lower is better: negated to rank like scores)
        per_dataset = [_dataset_ranks(cases, task, part, configs, sign, row) for (task, part), row in
                       zip(complete, scores)]
        ranks = np.array([dataset_ranks for dataset_ranks, _ in per_dataset])
        aggregates = -ranks[rng.integers(0, len(ranks), size=(samples, len(ranks)))].mean(axis=1)
        per_case = sum(ranked for _, ranked in per_dataset)
        extra = [{"per_case": per_case, "average_rank": float(rank)} for rank in ranks.mean(axis=0)]
    best = np.isclose(aggregates, aggregates.max(axis=1, keepdims=True), rtol=0, atol=1e-12)
    first = (best / best.sum(axis=1, keepdims=True)).mean(axis=0)
    places = rankdata(-aggregates, axis=1).mean(axis=0)
    return [{"group": group, "config": config_label(config, named), "n": len(scores), "first": float(share),
             "mean_rank": float(place), **more} for config, share, place, more in zip(configs, first, places, extra)]


def _dataset_ranks(cases: dict[str, pd.DataFrame], task: str, part: str | None, configs: list[Config], sign: float,
                   scores: np.ndarray) -> tuple[np.ndarray, bool]:
    """A dataset's rank of each configuration (1 = best, ties averaged): the mean over the test cases every
    configuration scored of the per-case ranks, or the rank of its dataset `scores` (signed: higher is better)
    where it has no such case; and whether it was ranked per case."""
    from scipy.stats import rankdata

    columns = [_case_column(config) for config in configs]
    table = cases.get(task)
    if part is None and table is not None and all(column in table.columns for column in columns):
        both = sign * table[columns].dropna().to_numpy(float)
        if len(both):
            return rankdata(-both, axis=1).mean(axis=0), True
    return rankdata(-scores), False


def rank_table(ranks: pd.DataFrame, samples: int = RANK_SAMPLES) -> ResultTable:
    """The rank stability as a table, with what its method ranks (`rank_stability`)."""
    method = ranks.attrs.get(METHOD, AGGREGATE_THEN_RANK)
    bootstrap = (f"bootstrap over datasets ({samples} resamples with replacement, seed {BOOTSTRAP_SEED}) of the "
                 "group's datasets that have every configuration (n)")
    if method == AGGREGATE_THEN_RANK:
        table = ResultTable("ranks", "rank stability (aggregate-then-rank): how often each configuration ranks "
                            "first", ["group", "configuration", "n", "first (%)", "mean rank"])
        table.rows = [[row.group, row.config, row.n, round(100 * row.first, 1), round(row.mean_rank, 2)]
                      for row in ranks.itertuples(index=False)]
        table.notes = [f"aggregate-then-rank: {bootstrap}: the share of resamples in which the configuration's mean "
                       "score is the best (ties share it) and its mean rank (1 = best)"]
    else:
        table = ResultTable("ranks", "rank stability (rank-then-aggregate): average ranks, and how often each "
                            "configuration ranks first",
                            ["group", "configuration", "n", "ranked per case", "average rank", "first (%)",
                             "mean rank"])
        table.rows = [[row.group, row.config, row.n, row.per_case, round(row.average_rank, 2),
                       round(100 * row.first, 1), round(row.mean_rank, 2)] for row in ranks.itertuples(index=False)]
        table.notes = ["rank-then-aggregate (the challenge convention): per dataset, the configurations are ranked "
                       "on every test case that all of them scored (a case's score: the mean over its foreground "
                       "labels, seeds and folds averaged; ties share the average rank) and the ranks averaged over "
                       "those cases; a dataset without such cases (numbers imported from CSV, a label group of a "
                       "split dataset) ranks them on its dataset scores. ranked per case: how many of the n datasets "
                       "were ranked per case; average rank: the mean over the n datasets of the dataset ranks "
                       "(1 = best)",
                       f"{bootstrap}: the share of resamples in which the configuration's average rank is the lowest "
                       "(ties share it) and its mean place (1 = best)"]
    if ranks.empty:
        table.notes = ["no ranking: no dataset has every shown configuration"]
    return table
