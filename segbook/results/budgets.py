"""Budgets as an axis in the results: whether a shorter training budget gives the answer of the longest
(`segbook results --table budgets`), and score against compute across configurations and budgets with its Pareto
front (`--table pareto`), optionally counting what pretraining cost (`--pretraining-cost amortise`).

A budget is the epochs a run trained (the collected frame's `budget`); each budget of a (model, init, recipe) is a
configuration variant of its own (`segbook.results.cells`), so no number here averages two budgets. Delta(PT) of a
budget pairs its pretrained runs with the scratch runs of the same network and budget (`configs.delta_pairs`), per
dataset, over the datasets where both have scores of agreeing data and evaluation settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from segbook import backbones
from segbook.results.configs import DELTA, config_label, configurations, delta_pairs, shows_recipes, variant_profiles
from segbook.results.cost import run_costs
from segbook.results.scores import (CONFIG_KEYS, Config, dataset_scores, delta_unit, metric_factor, metric_label,
                                    metric_sign, protocol_note, whole_split)
from segbook.results.selection import AMORTISE, Selection
from segbook.results.stats.paired import BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED, CONFIDENCE, bootstrap_ci
from segbook.results.tables.table import ResultTable


@dataclass
class BudgetPoint:
    """One configuration at one budget: its scores per dataset (stored units), its dataset scales, cost per run and,
    pretrained, its per-dataset Delta(PT) against scratch at the same budget (points; mm reversed for HD95)."""

    config: Config
    budget: int
    scores: dict[str, float]
    hours: float
    device: str | None
    runs: int
    costed_runs: int
    deltas: dict[str, float] | None = None


def budget_points(df: pd.DataFrame, selection: Selection) -> list[BudgetPoint]:
    """Every shown configuration (each budget a variant of its own) of the runs on the whole train split, with its
    scores, cost and Delta(PT) per dataset."""
    metric, df = selection.metric, whole_split(df)
    configs = configurations(df, selection)
    scores = dataset_scores(df, metric)
    by_config = {tuple(key): group for key, group in scores.groupby(CONFIG_KEYS, sort=False)}
    costs = run_costs(df)
    cost_of = {tuple(key): group for key, group in costs.groupby(CONFIG_KEYS, sort=False)}
    points: dict[Config, BudgetPoint] = {}
    for config in configs:
        group = by_config.get(config)
        if group is None:
            continue
        mine = cost_of.get(config, costs.iloc[:0])
        timed = mine[mine["device_hours"].notna()]
        points[config] = BudgetPoint(
            config, int(group["budget"].iloc[0]), dict(zip(group["task"], group["score"])),
            float(timed["device_hours"].mean()) if len(timed) else math.nan,
            "+".join(sorted(set(timed["device"].dropna()))) or None, len(mine), len(timed))
    bases = dict(zip(zip(scores["task"], *(scores[k] for k in CONFIG_KEYS)), scores["basis"]))
    factor = metric_sign(metric) * metric_factor(metric)
    for config, baseline in delta_pairs(list(points), variant_profiles(df)):
        mine, theirs = points[config].scores, points[baseline].scores
        points[config].deltas = {task: factor * (score - theirs[task]) for task, score in mine.items()
                                 if task in theirs and bases[(task, *config)] == bases[(task, *baseline)]}
    order = {config[:3]: index for index, config in reversed(list(enumerate(configs)))}
    return sorted(points.values(), key=lambda point: (order[point.config[:3]], point.budget))  # 5 before 10


def mean_score(point: BudgetPoint, factor: float, tasks: set[str] | None = None) -> float:
    values = [score for task, score in point.scores.items() if tasks is None or task in tasks]
    return factor * float(np.mean(values)) if values else math.nan


# --- agreement with the largest budget --------------------------------------------------------------------------


@dataclass
class Agreement:
    """How one budget's per-dataset Delta(PT) agrees with the largest budget's over the datasets both have."""

    datasets: int
    same_sign: float
    spearman: float
    difference: float
    ci_low: float
    ci_high: float


def agreement(deltas: dict[str, float], reference: dict[str, float]) -> Agreement:
    """Share of common datasets whose Delta(PT) has the reference's sign (a zero matches only a zero), Spearman's
    rank correlation of the two (NaN under three datasets or with a constant side), and the mean of (this minus the
    reference) with its bootstrap CI over datasets (`stats.paired.bootstrap_ci`)."""
    from scipy.stats import spearmanr

    tasks = sorted(set(deltas) & set(reference))
    mine, theirs = np.array([deltas[t] for t in tasks]), np.array([reference[t] for t in tasks])
    if not tasks:
        return Agreement(0, math.nan, math.nan, math.nan, math.nan, math.nan)
    constant = len(tasks) < 3 or np.ptp(mine) == 0 or np.ptp(theirs) == 0
    rho = math.nan if constant else float(spearmanr(mine, theirs).statistic)
    low, high = bootstrap_ci(mine - theirs)
    return Agreement(len(tasks), float(np.mean(np.sign(mine) == np.sign(theirs))), rho,
                     float(np.mean(mine - theirs)), low, high)


def by_scale(deltas: dict[str, float], scales: dict[str, str]) -> dict[str, list[float]]:
    grouped: dict[str, list[float]] = {}
    for task, delta in deltas.items():
        grouped.setdefault(scales[task], []).append(delta)
    return grouped


def within_reference(deltas: dict[str, float], reference: dict[str, float], scales: dict[str, str]) -> bool | None:
    """Whether this budget's mean Delta(PT) in every scale group lies within the reference's bootstrap CI of that
    group (over the datasets both have); None when they share no dataset."""
    tasks = set(deltas) & set(reference)
    if not tasks:
        return None
    mine = by_scale({t: deltas[t] for t in tasks}, scales)
    theirs = by_scale({t: reference[t] for t in tasks}, scales)
    for scale, values in theirs.items():
        low, high = bootstrap_ci(np.array(values))
        if not low <= float(np.mean(mine[scale])) <= high:
            return False
    return True


def family(config: Config) -> tuple[str, str, str]:
    """The (model, init, recipe) whose budgets are compared with each other."""
    return config[:3]


def budget_table(df: pd.DataFrame, selection: Selection | str = "dice", **choices: Any) -> ResultTable:
    """`segbook results --table budgets`: a row per configuration and budget (see the module's docstring)."""
    selection = Selection.of(selection, **choices)
    metric = selection.metric
    points = budget_points(df, selection)
    scales = dict(zip(df["task"], df["scale"]))
    factor = metric_factor(metric)
    named = shows_recipes([p.config for p in points])
    table = ResultTable("budgets", f"{metric_label(metric)} and {DELTA} per training budget, against the largest",
                        ["configuration", "budget (epochs)", "datasets", metric_label(metric), DELTA,
                         "device", "device-hours/run", "vs largest: datasets", "same sign", "Spearman",
                         f"{DELTA} difference", "CI low", "CI high", "by-scale within CI", "smallest agreeing budget"])
    notes: list[str] = []
    families: dict[tuple[str, str, str], list[BudgetPoint]] = {}
    for point in points:
        families.setdefault(family(point.config), []).append(point)
    for members in families.values():
        members.sort(key=lambda p: p.budget)
        largest = [p for p in members if p.budget == members[-1].budget]
        reference = largest[0] if len(largest) == 1 and largest[0].deltas else None
        if len(largest) > 1:
            notes.append(f"{config_label(largest[0].config, named)}: several variants train its largest budget; no "
                         "agreement is computed for this configuration")
        verdicts = {id(p): within_reference(p.deltas, reference.deltas, scales)
                    if reference and p.deltas else None for p in members}
        smallest = next((p.budget for p in members if verdicts[id(p)]), None)
        for point in members:
            agreed = agreement(point.deltas, reference.deltas) if reference and point.deltas else None
            delta = float(np.mean(list(point.deltas.values()))) if point.deltas else None
            table.rows.append([
                config_label(point.config, named), point.budget, len(point.scores),
                _rounded(mean_score(point, factor), 2), _rounded(delta, 2), point.device or "-",
                _rounded(point.hours, 3), *(_agreement_cells(agreed)),
                {True: "yes", False: "no", None: None}[verdicts[id(point)]],
                None if reference is None else smallest])
    table.notes = _budget_notes(table, metric) + notes + protocol_note(df)
    return table


def _agreement_cells(agreed: Agreement | None) -> list[Any]:
    if agreed is None:
        return [None] * 6
    return [agreed.datasets, _rounded(agreed.same_sign, 3), _rounded(agreed.spearman, 3),
            *(_rounded(v, 2) for v in (agreed.difference, agreed.ci_low, agreed.ci_high))]


def _budget_notes(table: ResultTable, metric: str) -> list[str]:
    if not table.rows:
        return ["no configurations: no evaluated runs on the whole train split"]
    return [f"a row per configuration and training budget (epochs trained): budgets are never averaged; "
            f"{metric_label(metric)}: mean over its datasets (seeds averaged); {DELTA}: mean over datasets of "
            f"pretrained - scratch of the same network at the same budget, in {delta_unit(metric)}",
            "device-hours/run: the mean training device-hours of its runs with a cost record (GPU-hours where device "
            "is cuda)",
            f"vs largest: the pretrained configuration's per-dataset {DELTA} against the one at the largest budget "
            f"present, over the datasets both have: share with the same sign, Spearman rank correlation (scipy; '-' "
            f"under 3 datasets or when one side is constant), and the mean difference (this - largest) with its "
            f"{CONFIDENCE:.0%} bootstrap CI over datasets ({BOOTSTRAP_SAMPLES} resamples, seed {BOOTSTRAP_SEED})",
            f"by-scale within CI: whether this budget's mean {DELTA} in every dataset-scale group lies within the "
            f"largest budget's {CONFIDENCE:.0%} bootstrap CI of that group; smallest agreeing budget: the smallest "
            "budget for which it does"]


def _rounded(value: Any, digits: int) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), digits)


# --- score against compute ----------------------------------------------------------------------------------------


def pareto_front(hours: list[float], scores: list[float]) -> list[bool]:
    """Which points no other point dominates (no more hours and no lower score, better in one); a point with an
    unknown (NaN) cost is on no front."""
    known = [not (math.isnan(h) or math.isnan(s)) for h, s in zip(hours, scores)]
    return [ok and not any(k and h2 <= h and s2 >= s and (h2 < h or s2 > s)
                           for h2, s2, k in zip(hours, scores, known))
            for h, s, ok in zip(hours, scores, known)]


def pretraining_hours(model: str, given: dict[str, float]) -> tuple[float, str] | None:
    """A model's pretraining GPU-hours and where the number comes from: --pretraining-gpu-hours, else the backbone
    catalogue's published figure; None where neither knows it."""
    if model in given:
        return given[model], "--pretraining-gpu-hours"
    return backbones.pretraining_cost(model)


def pareto_table(df: pd.DataFrame, selection: Selection | str = "dice", **choices: Any) -> ResultTable:
    """`segbook results --table pareto`: every configuration at every budget, its mean score over the datasets
    every shown point has, its training device-hours per run (plus, with --pretraining-cost amortise, its
    pretraining GPU-hours over the number of downstream datasets shown) and whether it is on the Pareto front."""
    selection = Selection.of(selection, **choices)
    metric = selection.metric
    points = [p for p in budget_points(df, selection) if p.scores]
    common = set.intersection(*(set(p.scores) for p in points)) if points else set()
    tasks = set().union(*(set(p.scores) for p in points)) if points else set()
    amortise = selection.pretraining_cost == AMORTISE
    given = dict(selection.pretraining_gpu_hours)
    factor = metric_factor(metric)
    rows = []
    for point in points:
        pretraining = pretraining_hours(point.config[0], given) if point.config[1] == "pretrained" else None
        extra = 0.0
        if amortise and point.config[1] == "pretrained":
            extra = pretraining[0] / len(tasks) if pretraining else math.nan
        rows.append((point, pretraining, extra, point.hours + extra, mean_score(point, factor, common)))
    front = pareto_front([r[3] for r in rows], [metric_sign(metric) * r[4] for r in rows])
    named = shows_recipes([p.config for p in points])
    table = ResultTable("pareto", f"{metric_label(metric)} against compute per configuration and budget",
                        ["configuration", "budget (epochs)", "device", "training hours/run",
                         "pretraining GPU-hours", "source", "amortised hours/task", "hours/run counted",
                         metric_label(metric), "Pareto front"])
    for (point, pretraining, extra, total, score), on_front in zip(rows, front):
        unknown = math.isnan(total)
        table.rows.append([config_label(point.config, named), point.budget, point.device or "-",
                           _rounded(point.hours, 3), _rounded(pretraining[0], 1) if pretraining else None,
                           pretraining[1] if pretraining else ("unknown" if point.config[1] == "pretrained" else None),
                           ("unknown" if math.isnan(extra) else _rounded(extra, 3)) if amortise else None,
                           "unknown" if unknown else _rounded(total, 3), _rounded(score, 2),
                           "yes" if on_front else "unknown cost" if unknown else "no"])
    table.notes = _pareto_notes(table, metric, amortise, len(common), len(tasks)) + protocol_note(df)
    return table


def _pareto_notes(table: ResultTable, metric: str, amortise: bool, common: int, tasks: int) -> list[str]:
    if not table.rows:
        return ["no configurations: no evaluated runs on the whole train split"]
    counted = (f"training device-hours per run plus, for a pretrained configuration, its pretraining GPU-hours / "
               f"{tasks} (the downstream datasets shown); a pretrained configuration whose pretraining cost is "
               "unknown (neither the backbone catalogue nor --pretraining-gpu-hours MODEL=H gives it) has an unknown "
               "cost, on no front" if amortise else
               "training device-hours per run only (pretraining not counted: --pretraining-cost amortise adds it)")
    return [f"a row per configuration and training budget (never averaged); {metric_label(metric)}: mean over the "
            f"{common} dataset(s) every row has, so that rows compare", f"hours/run counted: {counted}",
            f"Pareto front: no other row has no more hours counted and no worse {metric_label(metric)}, with one of "
            "the two strictly better; a row without a cost record has an unknown cost"]
