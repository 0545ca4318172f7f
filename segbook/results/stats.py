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
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import numpy as np
import pandas as pd

from segbook.results.collect import case_scores, run_folders
from segbook.results.configs import (DEFAULT_RECIPE, DELTA, MODEL_NAMES, comparability_classes, config_label,
                                     configurations, delta_pairs, shows_recipes, variant_profiles)
from segbook.results.scores import (CONFIG_KEYS, METRIC_NAMES, Config, Member, ScoreLookup, counted_runs, delta_unit,
                                    metric_factor, metric_label, metric_sign, score_lookup, whole_split)
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


def _frame_table(name: str, title: str, frame: pd.DataFrame, columns: Sequence[str]) -> ResultTable:
    """A frame's rows as a table of `columns`, numbers rounded as the statistics tables show them."""
    table = ResultTable(name, title, list(columns), display={"model": MODEL_NAMES})
    table.rows = [[_rounded(column, getattr(row, column)) for column in columns]
                  for row in frame.itertuples(index=False)]
    return table


def stats_table(comparison: pd.DataFrame, metric: str, title: str) -> ResultTable:
    """The comparison as a table for `emit` and the report; empty with a note when no size has both inits. The
    recipe is named only when one other than the default is compared, and the variant only when one is, as in the
    other tables."""
    columns = _named_columns(comparison)
    table = _frame_table("stats", f"pretrained vs scratch, {metric_label(metric)} {title}", comparison, columns)
    table.notes = [
        f"per STU-Net size and group, over the datasets with both initialisations (n): mean scores, {DELTA} "
        f"({delta_unit(metric)}) with its {CONFIDENCE:.0%} bootstrap CI ({BOOTSTRAP_SAMPLES} resamples, seed "
        f"{BOOTSTRAP_SEED}), wins/ties/losses of pretrained (tie: |difference| <= {100 * TIE_TOLERANCE:g} "
        f"{delta_unit(metric)}) and the two-sided Wilcoxon signed-rank p-value over datasets (NaN: all differences "
        "zero)", *_sign_note(metric)]
    if "better" in comparison.columns:
        table.notes.append(_counts_note())
    if comparison.empty:
        table.notes = ["no comparison: no STU-Net size has both pretrained and scratch results on a dataset"]
    return table


def recipe_stats_table(comparison: pd.DataFrame, metric: str, title: str = "by dataset scale") -> ResultTable:
    """`compare_recipes` as a table: the statistics of the recipes table's delta rows."""
    columns = [c for c in RECIPE_STATS_COLUMNS if c != "variant" or comparison["variant"].ne("").any()]
    table = _frame_table("recipe-stats", f"recipes vs scratch and vs {DEFAULT_RECIPE}, {metric_label(metric)} "
                         f"{title}", comparison, columns)
    table.notes = [
        f"per STU-Net size, recipe and group, over the datasets with both the recipe and the baseline it is compared "
        f"with (versus: scratch, as the {VS_SCRATCH} rows, or the {DEFAULT_RECIPE} recipe, as the {VS_DEFAULT} "
        f"rows): mean scores of baseline and recipe, their mean difference (points) with its {CONFIDENCE:.0%} "
        f"bootstrap CI ({BOOTSTRAP_SAMPLES} resamples, seed {BOOTSTRAP_SEED}), wins/ties/losses of the recipe (tie: "
        f"|difference| <= {100 * TIE_TOLERANCE:g} {delta_unit(metric)}) and the two-sided Wilcoxon signed-rank "
        "p-value", *_sign_note(metric)]
    if comparison.empty:
        table.notes = ["no comparison: no recipe has results on a dataset that also has its baseline's"]
    return table


def _named_columns(frame: pd.DataFrame) -> list[str]:
    """The frame's columns without `recipe` where every row has the default recipe, and without `variant` where
    none has one: the tables of the default configurations look as they always did."""
    return [c for c in frame.columns if not (c == "recipe" and frame["recipe"].eq(DEFAULT_RECIPE).all()
                                             or c == "variant" and frame["variant"].eq("").all())]


def _rounded(column: str, value: object) -> object:
    """Points to two decimals, p-values to three significant digits, NaN as None (shown as '-')."""
    if not isinstance(value, float):
        return value
    if math.isnan(value):
        return None
    return float(f"{value:.3g}") if column.startswith("p_") else round(value, 2) + 0.0  # no -0.0


def _sign_note(metric: str) -> list[str]:
    if metric_sign(metric) > 0:
        return []
    return [f"{METRIC_NAMES[metric]}: lower is better; every difference is baseline minus the compared "
            "configuration, so positive means the compared one (pretrained) is better"]


def _counts_note() -> str:
    return (f"better / not_different / worse: datasets of the group whose per-case test (Wilcoxon signed-rank over "
            f"the test cases, Holm-corrected across datasets) is significant at {ALPHA:g} with pretraining better, "
            "not significant, or significant with pretraining worse (table case-tests)")


# --- per case ---------------------------------------------------------------------------------------------------


def case_tests(df: pd.DataFrame, selection: Selection | str = "dice", alpha: float = ALPHA,
               **choices: Any) -> pd.DataFrame:
    """Per dataset and pretrained configuration with a scratch baseline: pretrained vs scratch over the test cases
    both scored (see CASE_TEST_COLUMNS), on the runs on the whole train split.

    Each case's score is the mean over foreground labels of its per-label metric, averaged over the seeds (and
    folds) that scored it (`collect.case_scores`, which reads `metrics.csv`). `delta` is the mean per-case difference
    (points; mm reversed for HD95), `p_value` the two-sided Wilcoxon signed-rank test, `p_holm` and `p_bh` it
    corrected across the datasets of the same configuration (Holm; Benjamini-Hochberg). The verdict is `better` or
    `worse` where `p_holm` < `alpha` (the direction: which of the positive and negative differences have the larger
    rank sum), else `not different`. Only runs with a folder (local, bundled) have cases; numbers imported from CSV are
    left out. The selection's `inits` do not apply."""
    selection = replace(Selection.of(selection, **choices), inits=None)
    metric, df = selection.metric, whole_split(df)
    configs = configurations(df, selection)
    pairs = delta_pairs(configs, variant_profiles(df))
    wanted = {c for pair in pairs for c in pair}
    keys = pd.MultiIndex.from_arrays([df[key] for key in CONFIG_KEYS])
    runs = counted_runs(df[keys.isin(list(wanted)) & df["evaluated"] & run_folders(df)])
    scores = case_scores(runs, metric)
    basis = score_lookup(df, metric, ()).basis
    by_config = {config: frame.set_index(["task", "case"])["score"]
                 for config, frame in scores.groupby(CONFIG_KEYS, sort=False)}
    rows = []
    for config, baseline in pairs:
        if config not in by_config or baseline not in by_config:
            continue
        both = pd.concat([by_config[config], by_config[baseline]], axis=1, keys=["mine", "base"],
                         join="inner").dropna()
        family = [_case_test(task, frame, metric) for task, frame in both.groupby(level="task", sort=True)
                  if basis.get((task, *config)) == basis.get((task, *baseline))]
        rows += [{"model": config[0], "recipe": config[2], "variant": config[3], **row}
                 for row in _corrected(family, alpha)]
    return pd.DataFrame(rows, columns=list(CASE_TEST_COLUMNS))


def _case_test(task: str, frame: pd.DataFrame, metric: str) -> dict[str, object]:
    differences = metric_sign(metric) * (frame["mine"].to_numpy() - frame["base"].to_numpy())
    return {"task": task, "cases": len(differences), "delta": metric_factor(metric) * differences.mean(),
            "p_value": wilcoxon_p(differences), "direction": _rank_direction(differences)}


def _rank_direction(differences: np.ndarray) -> int:
    """+1 when the positive differences have the larger rank sum (what the signed-rank test weighs), -1 when the
    negative ones, 0 when equal."""
    from scipy.stats import rankdata

    nonzero = differences[differences != 0]
    ranks = rankdata(np.abs(nonzero))
    return int(np.sign(ranks[nonzero > 0].sum() - ranks[nonzero < 0].sum()))


def corrected_p(p_values: Sequence[float], method: str, alpha: float = ALPHA) -> np.ndarray:
    """statsmodels' `multipletests` corrected p-values (`holm`, `fdr_bh`). Its Holm branch calls `gc.collect()`,
    which walks every object alive (a large results frame: a fifth of a second a call); the objects that exist
    before the call are frozen out of that walk, and thawed after."""
    import gc

    from statsmodels.stats.multitest import multipletests

    gc.freeze()
    try:
        return multipletests(p_values, alpha=alpha, method=method)[1]
    finally:
        gc.unfreeze()


def _corrected(family: list[dict[str, object]], alpha: float) -> list[dict[str, object]]:
    """Holm and Benjamini-Hochberg over the tests with a p-value; a test without one (all differences zero) is
    `not different`."""
    tested = [row for row in family if not math.isnan(row["p_value"])]
    if tested:
        p_values = [row["p_value"] for row in tested]
        holm = corrected_p(p_values, "holm", alpha)
        bh = corrected_p(p_values, "fdr_bh", alpha)
        for row, p_holm, p_bh in zip(tested, holm, bh):
            row.update(p_holm=float(p_holm), p_bh=float(p_bh))
    for row in family:
        direction = row.pop("direction")
        significant = row.get("p_holm", math.nan) < alpha
        row.setdefault("p_holm", math.nan)
        row.setdefault("p_bh", math.nan)
        row["verdict"] = VERDICTS[0] if significant and direction > 0 else (
            VERDICTS[2] if significant and direction < 0 else VERDICTS[1])
    return family


def case_tests_table(tests: pd.DataFrame, metric: str) -> ResultTable:
    """`case_tests` as a table (`segbook results --table case-tests`)."""
    columns = _named_columns(tests)
    table = _frame_table("case-tests", f"pretrained vs scratch per dataset over test cases, {metric_label(metric)}",
                         tests, columns)
    table.notes = [
        f"per dataset: the test cases scored by both (cases); a case's score is the mean over its foreground labels "
        f"(seeds and folds averaged per case); delta: mean per-case pretrained - scratch ({delta_unit(metric)}); "
        f"p_value: two-sided Wilcoxon signed-rank over the cases (scipy); p_holm, p_bh: corrected across the "
        f"datasets of each size (statsmodels multipletests, Holm and Benjamini-Hochberg); verdict at p_holm < "
        f"{ALPHA:g}", *_sign_note(metric)]
    if tests.empty:
        table.notes = ["no per-case comparison: no dataset has evaluated pretrained and scratch runs of one size"]
    return table


# --- configurations against each other ---------------------------------------------------------------------------


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
        table.rows.append([group, config, *(_rounded("p_value", p_values[label]) if label in p_values else None
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


# --- rank stability ----------------------------------------------------------------------------------------------


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


# --- as tables by name (`segbook.results.tables`) ----------------------------------------------------------------


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
