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
from segbook.results.scores import Config, Member, ScoreLookup, metric_sign, whole_split
from segbook.results.selection import Selection
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


def rank_stability(df: pd.DataFrame, selection: Selection | str = "dice", group_by: str = "all",
                   samples: int = RANK_SAMPLES, seed: int = BOOTSTRAP_SEED, **choices: Any) -> pd.DataFrame:
    """Per group, how often each configuration ranks first when the datasets are resampled with replacement
    (`samples` times, seeded): `first` is the share of resamples in which its mean score is the best (ties share),
    `mean_rank` its mean rank (1 = best). Only the group's datasets that have every configuration count (n), with
    their runs agreeing in data and evaluation settings. Configurations of different budgets, precision, plans or
    sources (`comparability_classes`) are ranked apart, the group then naming what they differ in: `small [2x1 it]`.
    """
    selection = Selection.of(selection, **choices)
    metric, df = selection.metric, whole_split(df)
    configs = configurations(df, selection)
    members, lookup = grouped_lookup(df, configs, selection, group_by)
    rng = np.random.default_rng(seed)
    named = shows_recipes(configs)
    profiles = variant_profiles(df)
    classes = comparability_classes(configs, profiles)
    rows = []
    for group, tasks in members.items():
        for label, ranked in classes.items():
            shown = group if len(classes) == 1 else f"{group} [{label}]"
            rows += _ranks(lookup, tasks, ranked, metric, rng, samples, shown, named)
    return pd.DataFrame(rows, columns=list(RANK_COLUMNS))


def _ranks(lookup: ScoreLookup, tasks: list[Member], configs: list[Config], metric: str, rng: np.random.Generator,
           samples: int, group: str, named: bool) -> list[dict[str, object]]:
    """The rank rows of `configs` over the members that have them all, their runs agreeing in basis."""
    from scipy.stats import rankdata

    complete = [[lookup[part][(task, *config)] for config in configs] for task, part in tasks
                if all((task, *config) in lookup[part] for config in configs)
                and len({lookup.basis.get((task, *config)) for config in configs}) == 1]
    if not complete or len(configs) < 2:
        return []
    scores = metric_sign(metric) * np.array(complete)
    means = scores[rng.integers(0, len(scores), size=(samples, len(scores)))].mean(axis=1)
    best = np.isclose(means, means.max(axis=1, keepdims=True), rtol=0, atol=1e-12)
    first = (best / best.sum(axis=1, keepdims=True)).mean(axis=0)
    ranks = rankdata(-means, axis=1).mean(axis=0)
    return [{"group": group, "config": config_label(config, named), "n": len(scores), "first": float(share),
             "mean_rank": float(rank)} for config, share, rank in zip(configs, first, ranks)]


def rank_table(ranks: pd.DataFrame, samples: int = RANK_SAMPLES) -> ResultTable:
    table = ResultTable("ranks", "rank stability: how often each configuration ranks first", list(RANK_COLUMNS))
    table.rows = [[row.group, row.config, row.n, round(100 * row.first, 1), round(row.mean_rank, 2)]
                  for row in ranks.itertuples(index=False)]
    table.columns = ["group", "configuration", "n", "first (%)", "mean rank"]
    table.notes = [f"bootstrap over datasets ({samples} resamples with replacement, seed {BOOTSTRAP_SEED}) of the "
                   "group's datasets that have every configuration (n): the share of resamples in which the "
                   "configuration's mean score is the best (ties share it) and its mean rank (1 = best)"]
    if ranks.empty:
        table.notes = ["no ranking: no dataset has every shown configuration"]
    return table
