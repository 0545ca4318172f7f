"""The fractions table: every training-data fraction run, per dataset and configuration, and for each pretrained
configuration the smallest fraction at which it matches scratch trained on the whole train split.

Every other table shows the runs on the whole train split (fraction 1); this one shows them all (the test split is
always the whole one).
"""

from __future__ import annotations

from typing import Any, Mapping

import pandas as pd

from segbook.results.collect import LOWER_IS_BETTER
from segbook.results.configs import (MODEL_NAMES, axis_values, config_axes, configurations, dataset_facts,
                                     delta_pairs, pairing_notes, shows_recipes, variant_profiles)
from segbook.results.excluded import exclusion_notes
from segbook.results.scores import (METRIC_NAMES, SCORE_KEYS, Config, dataset_scores, delta_unit, metric_factor,
                                    metric_label, metric_sign, protocol_note)
from segbook.results.selection import Selection
from segbook.results.tables.table import Cell, ResultTable
from segbook.runs import DEFAULT_FRACTION

#: Pretraining "matches" scratch on all the data at a fraction when its score is at most this much worse (points;
#: mm for HD95): below the two-decimal precision that the tables print plus rounding, a tie.
MATCH_TOLERANCE = 0.1
MATCHES = "matches scratch@100%"


def fraction_text(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def run_fractions(df: pd.DataFrame) -> list[float]:
    """The training fractions with evaluated runs, smallest first."""
    return sorted(set(df.loc[df["evaluated"], "fraction"]))


def fraction_scores(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """`dataset_scores` at every training fraction run, with a `fraction` column (scores as stored)."""
    frames = [dataset_scores(df, metric, None, fraction).assign(fraction=fraction) for fraction in run_fractions(df)]
    columns = [*SCORE_KEYS, "score", "seed_sd", "seeds", "folds", "source", "basis", "basis_settings", "fraction"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def smallest_matching_fraction(pretrained: Mapping[float, float], scratch_full: float, metric: str) -> float | None:
    """The smallest fraction at which pretraining matches scratch trained on the whole train split: its score
    (mean over seeds) is no worse than scratch's at fraction 1 by more than MATCH_TOLERANCE, at that fraction and at
    every larger fraction run (so one lucky small run does not claim it). None: it never does."""
    sign, factor = metric_sign(metric), metric_factor(metric)
    found = None
    for fraction in sorted(pretrained, reverse=True):
        if sign * factor * (pretrained[fraction] - scratch_full) < -MATCH_TOLERANCE:
            break
        found = fraction
    return found


def fraction_table(df: pd.DataFrame, selection: Selection | str = "dice", **choices: Any) -> ResultTable:
    """A row per dataset and configuration, a column per training fraction run (mean over seeds, +- their standard
    deviation), and for each pretrained configuration the smallest fraction that matches scratch on all the data."""
    selection = Selection.of(selection, **choices)
    metric = selection.metric
    configs = configurations(df, selection)
    facts = dataset_facts(df, configs)
    fractions = run_fractions(df)
    scores = fraction_scores(df, metric)
    by_key = {(*key, fraction): (score, sd, seeds, basis) for *key, fraction, score, sd, seeds, basis in zip(
        *(scores[k] for k in SCORE_KEYS), scores["fraction"], scores["score"], scores["seed_sd"], scores["seeds"],
        scores["basis"])}
    axes = config_axes(configs)
    profiles = variant_profiles(df)
    baselines = dict(delta_pairs(configs, profiles))
    factor = metric_factor(metric)
    table = ResultTable("fractions", f"{metric_label(metric)} per training-data fraction",
                        ["task", "train cases", "model", "init", *axes,
                         *map(fraction_text, fractions), *([MATCHES] if baselines else [])],
                        count_label="seeds", detail_label="status", show_count=False, display={"model": MODEL_NAMES})
    for task, train_cases in zip(facts.index, facts["train_cases"]):
        for config in configs:
            values = {f: by_key[(task, *config, f)] for f in fractions if (task, *config, f) in by_key}
            if not values:
                continue
            cells = [Cell(factor * values[f][0], int(values[f][2]),
                          spread=None if pd.isna(values[f][1]) else factor * values[f][1]) if f in values
                     else Cell(None, status="missing") for f in fractions]
            match = _match_text(values, by_key.get((task, *baselines[config], DEFAULT_FRACTION)), metric) \
                if config in baselines else None
            table.rows.append([task, int(train_cases), *config[:2], *axis_values(config, axes), *cells,
                               *([match] if baselines else [])])
    table.notes = (_fraction_notes(table, metric, baselines)
                   + pairing_notes(configs, profiles, None, shows_recipes(configs))
                   + protocol_note(df.assign(fraction=DEFAULT_FRACTION)))
    table.notes += exclusion_notes(df, metric, configs, METRIC_NAMES[metric])
    return table


def _match_text(pretrained: dict[float, tuple], scratch_full: tuple | None, metric: str) -> str | None:
    """The smallest matching fraction among those whose runs agree with scratch's in data and evaluation settings
    and test split; None without such a scratch run (or such fractions)."""
    if scratch_full is None:
        return None
    comparable_fractions = {f: value[0] for f, value in pretrained.items() if value[3] == scratch_full[3]}
    if not comparable_fractions:
        return None
    found = smallest_matching_fraction(comparable_fractions, scratch_full[0], metric)
    return "never" if found is None else fraction_text(found)


def _fraction_notes(table: ResultTable, metric: str, baselines: Mapping[Config, Config]) -> list[str]:
    if not table.rows:
        return ["no datasets: no runs of the shown configurations"]
    notes = [f"cell: {metric_label(metric)} of the runs trained on that fraction of the train split (the test split "
             "is always the whole one): mean over seeds, \u00b1 the standard deviation across seeds where more than "
             "one; train cases: the dataset's whole train split"]
    if baselines:
        worse = "above" if metric in LOWER_IS_BETTER else "below"
        notes.append(f"{MATCHES}: the smallest fraction at which the pretrained network's score is at most "
                     f"{MATCH_TOLERANCE:g} {delta_unit(metric)} {worse} the same network's from scratch on the whole "
                     "train split, at that fraction and at every larger one run; never: at no fraction; '-': a "
                     "scratch row, or no scratch run on the whole train split")
    return notes

