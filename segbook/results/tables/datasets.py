"""The per-dataset table: a row per dataset, every configuration side by side, a Delta(PT) per pretrained one.

Each cell is the dataset's score (mean over seeds of each seed's mean over folds, ± the standard deviation across
seeds), or why it has none (the status of its runs); a dagger marks a cell that averages only the seeds evaluated so
far. With more than one seed, a seed-noise column per Delta(PT) and a mark on each Delta(PT) within it. With the
selection's `summary` median, each cell is the median (Q1, Q3) over the dataset's test cases of the per-case score
(`collect.case_scores`: the mean over foreground labels, seeds and folds averaged per case), and each Delta(PT) that
of the paired per-case differences.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pandas as pd

from segbook.results.collect import IMPORTED_PREFIX, LOCAL, case_scores, run_folders
from segbook.results.configs import (DELTA, config_label, configurations, dataset_facts, delta_label, delta_pairs,
                                     pairing_notes, shows_recipes, variant_profiles)
from segbook.results.excluded import exclusion_notes
from segbook.results.scores import (CONFIG_KEYS, METRIC_NAMES, SCORE_KEYS, Config, ScoreKey, ScoreLookup,
                                    counted_runs, dataset_scores, metric_factor, metric_label, metric_sign,
                                    protocol_note, seed_noise, summarised, whole_split)
from segbook.results.selection import MEAN, MEDIAN, Selection
from segbook.results.tables.table import NOISE_MARK, PARTIAL_MARK, Cell, ResultTable
from segbook.runs import DEFAULT_SEED

def dataset_table(df: pd.DataFrame, selection: Selection | str = "dice", **choices: Any) -> ResultTable:
    """A row per dataset, every configuration side by side, a Delta(PT) per pretrained configuration, and the
    sources used; runs on the whole train split, seeds averaged. With more than one seed, a `SIZE seed noise`
    column per Delta(PT) and a NOISE_MARK on each Delta(PT) within it (`seed_noise`)."""
    selection = Selection.of(selection, **choices)
    metric, runs, df = selection.metric, df, whole_split(df)
    configs = configurations(df, selection)
    facts = dataset_facts(df, configs)
    frame = dataset_scores(df, metric)
    keys = list(zip(*(frame[key] for key in SCORE_KEYS)))
    scores = dict(zip(keys, zip(frame["score"], frame["folds"], frame["source"], frame["seed_sd"], frame["seeds"])))
    lookup = ScoreLookup({None: dict(zip(keys, frame["score"]))}, dict(zip(keys, frame["basis"])),
                         dict(zip(keys, frame["basis_settings"])))
    pending = _pending(df, metric)
    profiles = variant_profiles(runs)
    pairs = delta_pairs(configs, profiles)
    named = shows_recipes(configs)
    splits = _splits(df)
    median = selection.summary == MEDIAN
    cases = _case_series(df, configs, metric) if median else None
    noise = {config: seed_noise(df, metric, config, baseline, frame).set_index("task") for config, baseline in pairs
             } if frame["seeds"].gt(1).any() and not median else {}
    table = ResultTable("datasets", f"{metric_label(metric)} per dataset",
                        ["task", "modality", "target", "scale", *(config_label(c, named) for c in configs),
                         *(delta_label(config, named) for config, _ in pairs),
                         *(f"{delta_label(config, named).removesuffix(' delta')} seed noise" for config in noise),
                         "source", "split"],
                        count_label="cases" if median else "folds", detail_label="status", show_count=False,
                        display={"split": {sha: sha[:12] for sha in splits.values()}})
    for task, modality, target, scale in zip(facts.index, facts["modality"], facts["target"], facts["scale"]):
        cells = {config: _dataset_cell(scores, pending, (task, *config), metric) for config in configs}
        sources = sorted({cell.source for cell in cells.values() if cell.source}, key=lambda s: (s != LOCAL, s))
        deltas = [_dataset_delta(cells[config], cells[baseline], metric, noise.get(config), task,
                                 lookup.mismatch(task, config, baseline)) for config, baseline in pairs]
        if cases is not None:
            deltas = [_case_delta(delta, cases.get((task, *config)), cases.get((task, *baseline)), metric)
                      for delta, (config, baseline) in zip(deltas, pairs)]
            cells = {config: _case_cell(cell, cases.get((task, *config)), metric) for config, cell in cells.items()}
        table.rows.append([task, modality, target, scale, *cells.values(), *deltas,
                           *(_noise_value(frame, task) for frame in noise.values()),
                           ", ".join(sources) or "-", splits.get(task)])
    table.notes = (_dataset_notes(table, metric, selection.summary) + pairing_notes(configs, profiles, lookup, named)
                   + _noise_notes(noise, named) + protocol_note(runs))
    table.notes += exclusion_notes(df, metric, configs, METRIC_NAMES[metric])
    return table


def _case_series(df: pd.DataFrame, configs: list[Config], metric: str) -> dict[ScoreKey, pd.Series]:
    """(task, *config) -> its per-case scores (`collect.case_scores`, indexed by case) from the counted runs with a
    folder (numbers imported from CSV have no cases)."""
    keys = pd.MultiIndex.from_arrays([df[key] for key in CONFIG_KEYS])
    runs = counted_runs(df[keys.isin(configs) & df["evaluated"] & run_folders(df)])
    scores = case_scores(runs, metric)
    return {key: frame.set_index("case")["score"].dropna() for key, frame in scores.groupby(SCORE_KEYS, sort=False)}


def _case_cell(cell: Cell, cases: pd.Series | None, metric: str) -> Cell:
    """The dataset cell as the median (Q1, Q3) over its test cases (`count`: how many), or why it has none."""
    if cell.value is None:
        return cell
    if cases is None or cases.empty:
        return Cell(None, 0, status="no per-case scores (numbers imported from CSV)")
    median, quartiles = summarised(cases.to_numpy(), MEDIAN)
    factor = metric_factor(metric)
    return replace(cell, value=factor * median, count=len(cases), spread=None,
                   quartiles=(factor * quartiles[0], factor * quartiles[1]))


def _case_delta(delta: Cell, mine: pd.Series | None, base: pd.Series | None, metric: str) -> Cell:
    """A dataset's Delta(PT) as the median (Q1, Q3) of the paired per-case differences (signed: positive means
    pretraining helps), over the cases both scored; the mean's Delta where it has none (a reason)."""
    if delta.value is None:
        return delta
    both = pd.concat([mine, base], axis=1, join="inner").dropna() if mine is not None and base is not None else None
    if both is None or both.empty:
        return Cell(None, 0, status="- (no per-case scores of both)")
    sign, factor = metric_sign(metric), metric_factor(metric)
    median, quartiles = summarised(sign * (both.iloc[:, 0] - both.iloc[:, 1]).to_numpy(), MEDIAN)
    return Cell(factor * median, len(both), signed=True, quartiles=(factor * quartiles[0], factor * quartiles[1]))


def _noise_value(noise: pd.DataFrame, task: str) -> float | None:
    value = noise["noise"].get(task)
    return None if value is None or pd.isna(value) else round(float(value), 2)


def _noise_notes(noise: dict[Config, pd.DataFrame], named: bool) -> list[str]:
    if not noise:
        return []
    counts = "; ".join(f"{config_label(config, named)}: {int(frame['within_noise'].dropna().sum())} of "
                       f"{len(frame['within_noise'].dropna())}" for config, frame in noise.items())
    return [f"seed noise: the larger of pretrained's and scratch's standard deviations across seeds; {NOISE_MARK} "
            f"marks a {DELTA} no larger than it (within seed noise: {counts} datasets); cells show the mean over "
            "seeds \u00b1 the standard deviation across seeds"]


def _splits(df: pd.DataFrame) -> dict[str, str]:
    """Each dataset's test split (SHA-256) as its evaluated runs recorded it, those kept apart aside (one:
    `segbook.results.cells`)."""
    local = df[run_folders(df) & df["evaluated"] & df["split"].notna() & (df["apart"] == "")]
    return dict(zip(local["task"], local["split"]))


def _pending(df: pd.DataFrame, metric: str) -> dict[ScoreKey, list[tuple[str, str]]]:
    """(task, *config) -> (which run, why) for each run or imported result without a score."""
    pending: dict[ScoreKey, list[tuple[str, str]]] = {}
    waiting = df[~df["evaluated"] | df[metric].isna()]
    for row in waiting.itertuples():
        which = row.source if row.source != LOCAL else (
            f"fold {row.fold}" if row.seed == DEFAULT_SEED else f"seed {row.seed} fold {row.fold}")
        unevaluated = isinstance(row.unevaluated, dict) and metric in row.unevaluated
        why = (row.unevaluated[metric] if unevaluated else
               f"no {METRIC_NAMES[metric]}") if row.evaluated else row.status
        pending.setdefault((row.task, row.model, row.init, row.recipe, row.variant), []).append((which, why))
    return pending


def _dataset_cell(scores: dict, pending: dict, key: ScoreKey, metric: str = "dice") -> Cell:
    waiting = pending.get(key, [])
    folds = "; ".join(f"{which}: {why}" for which, why in waiting)
    if key not in scores:
        statuses = {status for _, status in waiting}
        return Cell(None, 0, status=statuses.pop() if len(statuses) == 1 else folds or "missing")
    score, count, source, spread, seeds = scores[key]
    factor = metric_factor(metric)
    return Cell(factor * score, int(count), status=folds, marker=PARTIAL_MARK if waiting else "", source=source,
                spread=None if pd.isna(spread) else factor * spread, seeds=int(seeds))


def _dataset_delta(pretrained: Cell, scratch: Cell, metric: str = "dice", noise: pd.DataFrame | None = None,
                   task: str = "", mismatch: str | None = None) -> Cell:
    if pretrained.value is None or scratch.value is None:
        return Cell(None, 0, status="-")
    if mismatch:
        return Cell(None, 0, status=f"- (runs differ: {mismatch})")
    within = noise is not None and noise["within_noise"].get(task) in (True, 1)
    return Cell(metric_sign(metric) * (pretrained.value - scratch.value), 1, signed=True,
                marker=NOISE_MARK if within else "")


def _dataset_notes(table: ResultTable, metric: str, summary: str = MEAN) -> list[str]:
    if not table.rows:
        return ["no datasets: no runs of the shown configurations"]
    notes = [f"cell: mean {metric_label(metric)} over the dataset's evaluated folds; 'missing': no run; "
             "otherwise the status of its runs" if summary == MEAN else
             f"cell: median (Q1, Q3) {metric_label(metric)} over the dataset's test cases (cases: how many) of the "
             "per-case score, the mean over the case's foreground labels with seeds and folds averaged per case "
             f"(quartiles: numpy.percentile, linear interpolation); {DELTA}: median (Q1, Q3) of the paired per-case "
             "differences over the cases both scored; 'missing': no run; otherwise the status of its runs"]
    partial = [f"  {row[0]} {column}: {cell.status}" for row in table.rows
               for column, cell in zip(table.columns, row) if isinstance(cell, Cell) and cell.marker == PARTIAL_MARK]
    if partial:
        notes += [f"{PARTIAL_MARK} averages the seeds evaluated so far; not counted:", *partial]
    if any(IMPORTED_PREFIX in str(row[-2]) for row in table.rows):
        notes.append("source imported:NAME: numbers imported from $SEGBOOK_HOME/results/imported/NAME.csv, "
                     "configurations of their own ([imported:NAME]): published numbers come with their authors' "
                     "settings, plans and split, so they are never averaged or compared with runs")
    return notes

