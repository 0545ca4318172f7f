"""The tables by group of datasets: by dataset scale (the paper's main table), by modality x target, by region.

A row per configuration, and a Delta(PT) row per pretrained one with a comparable scratch configuration; a column
per non-empty group. A group's score is the mean over its datasets that have the configuration, shown with how many
that is; datasets without it are listed as missing and mark the cell, never averaged in. Delta(PT) is the paired
mean of pretrained minus scratch over the datasets of the group that have both (`segbook.results.scores.ScoreLookup
.pair`). Runs on the whole train split, seeds averaged (docs/results.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import pandas as pd

from segbook import backbones
from segbook.registry import REGIONS, SCALES
from segbook.results.collect import LOWER_IS_BETTER
from segbook.results.configs import (DELTA, MODEL_NAMES, axis_values, config_axes, config_label,
                                     configurations, dataset_facts, delta_pairs, pairing_notes, shows_recipes,
                                     variant_profiles)
from segbook.results.excluded import exclusion_notes
from segbook.results.scores import (METRIC_NAMES, Config, Member, ScoreLookup, SeedLookup, dataset_scores,
                                    delta_convention, group_spread, metric_factor, metric_label, metric_sign,
                                    protocol_note, score_lookup, score_lookups, seed_noise, summarised, summary_text,
                                    whole_split)
from segbook.results.selection import MEAN, Selection, TableError
from segbook.runs import default_recipe
from segbook.results.tables.table import MISSING_MARK, Cell, ResultTable

AVERAGE = "average"
MODALITY_ORDER = ("CT", "MRI", "Ultrasound", "CT&PET")
#: The paper's modality x target groups; other combinations (a user's ultrasound structures) show when present.
PAPER_MODALITY_TARGETS = {("CT", "seen structure"), ("CT", "unseen structure"), ("CT", "lesion"),
                          ("MRI", "seen structure"), ("MRI", "unseen structure"), ("MRI", "lesion"),
                          ("Ultrasound", "lesion"), ("CT&PET", "lesion"), ("CT", "structure&lesion"),
                          ("MRI", "structure&lesion")}
TARGET_GROUPS = {"Seen Structure": "seen structure", "Unseen Structure": "unseen structure", "Lesion": "lesion",
                 "Structure&Lesion": "structure&lesion"}
PART_GROUPS = {"seen": "seen structure", "unseen": "unseen structure", "lesion": "lesion"}
REGION_ORDER = ("Head and Neck", "Pelvic", "Limb", "Thoracic", "Abdominal", "Other", "unknown")


@dataclass(frozen=True)
class Grouping:
    """A way of grouping datasets: every possible group in display order, and the groups of one dataset."""

    name: str
    title: str
    groups: tuple[str, ...]
    members_of: Callable[[Any], list[tuple[str, str | None]]]
    #: Groups shown in their place when they have datasets, but not reported as empty (not in the paper).
    quiet: frozenset[str] = frozenset()


def grouping(name: str, group_datasets: bool = False) -> Grouping:
    """`scale`, `modality-target` (label-level unless `group_datasets`), `region` or `all`."""
    if name == "scale":
        return Grouping(name, "by dataset scale", (*SCALES, AVERAGE), lambda t: [(t.scale, None), (AVERAGE, None)])
    if name == "modality-target":
        targets = [*PART_GROUPS.values(), *(["structure&lesion"] if group_datasets else [])]
        pairs = [(m, t) for m in MODALITY_ORDER for t in targets]
        quiet = frozenset(f"{m} {t}" for m, t in pairs if (m, t) not in PAPER_MODALITY_TARGETS)
        how = "whole datasets by target" if group_datasets else "structure&lesion datasets split by label"
        return Grouping(name, f"by modality and target ({how})", tuple(f"{m} {t}" for m, t in pairs),
                        lambda t: _modality_target_members(t, group_datasets), quiet)
    if name == "region":
        regions = (*REGION_ORDER, *(r for r in REGIONS if r not in REGION_ORDER))
        return Grouping(name, "by region, with bone and vessel", (*regions, "Bone", "Vessel"), _region_members,
                        frozenset({"unknown"}))
    if name == "all":
        return Grouping(name, "over all datasets", ("all",), lambda t: [("all", None)])
    raise TableError(f"unknown grouping {name!r}; choose scale, modality-target, region or all")


def _modality_target_members(facts: Any, group_datasets: bool) -> list[tuple[str, str | None]]:
    """Structure&Lesion datasets give each part of their labels to that part's group, unless grouped whole."""
    if facts.target != "Structure&Lesion" or group_datasets:
        return [(f"{facts.modality} {TARGET_GROUPS[facts.target]}", None)]
    return [(f"{facts.modality} {PART_GROUPS[part]}", part) for part in facts.parts.split("+") if part]


def _region_members(facts: Any) -> list[tuple[str, str | None]]:
    return [(facts.region, None), *([("Bone", None)] if facts.bone else []),
            *([("Vessel", None)] if facts.vessel else [])]


def group_members(facts: pd.DataFrame, by: Grouping) -> dict[str, list[Member]]:
    """Group -> its (task, part) members among `facts`, for the non-empty groups, in display order."""
    members: dict[str, list[Member]] = {group: [] for group in by.groups}
    for task, row in zip(facts.index, facts.itertuples()):
        for group, part in by.members_of(row):
            members.setdefault(group, []).append((task, part))
    return {group: tasks for group, tasks in members.items() if tasks}



def grouped_lookup(df: pd.DataFrame, configs: Sequence[Config], selection: Selection,
                   group_by: str) -> tuple[dict[str, list[Member]], ScoreLookup]:
    """The non-empty groups of `group_by` among the datasets with runs of `configs`, and their members' scores
    (the statistics compare configurations within them)."""
    members = group_members(dataset_facts(df, configs), grouping(group_by, selection.group_datasets))
    return members, score_lookup(df, selection.metric, {part for tasks in members.values() for _, part in tasks})


def group_cell(lookup: ScoreLookup, members: list[Member], config: Config, metric: str = "dice",
               seeds: SeedLookup | None = None, summary: str = MEAN) -> Cell:
    """The configuration's `summary` (mean, or median with quartiles) over the members that have it; the spread
    across seeds goes with the mean only."""
    factor = metric_factor(metric)
    values, missing = [], []
    for task, part in members:
        value = lookup[part].get((task, *config))
        if value is None:
            missing.append(task)
        else:
            values.append(value)
    center, quartiles = summarised(values, summary)
    spread = group_spread(seeds, members, config) if summary == MEAN else None
    return Cell(None if center is None else factor * center, len(values), tuple(missing),
                marker=MISSING_MARK if missing and values else "",
                spread=None if spread is None else factor * spread, quartiles=_scaled(quartiles, factor))


def delta_cell(lookup: ScoreLookup, members: list[Member], config: Config, baseline: Config,
               metric: str = "dice", summary: str = MEAN) -> Cell:
    """The paired `summary` (mean, or median with quartiles) of `config` minus `baseline` over the members that
    have both (reversed where lower is better)."""
    factor = metric_sign(metric) * metric_factor(metric)
    diffs, missing = [], []
    for task, part in members:
        pair = lookup.pair(part, task, config, baseline)
        if pair is None:
            missing.append(task)
        else:
            diffs.append(pair[0] - pair[1])
    center, quartiles = summarised(diffs, summary)
    return Cell(None if center is None else factor * center, len(diffs), tuple(missing),
                marker=MISSING_MARK if missing and diffs else "", signed=True,
                quartiles=_scaled(quartiles, factor))


def _scaled(quartiles: tuple[float, float] | None, factor: float) -> tuple[float, float] | None:
    """Quartiles in the shown unit, low first (a negative factor, HD95's reversed Delta, swaps them)."""
    if quartiles is None:
        return None
    low, high = sorted((factor * quartiles[0], factor * quartiles[1]))
    return low, high



def group_table(df: pd.DataFrame, selection: Selection, group_by: str) -> ResultTable:
    """Rows per configuration (and a Delta(PT) row per pretrained one), a column per non-empty group of `group_by`
    (`grouping`); runs on the whole train split, seeds averaged."""
    metric, by = selection.metric, grouping(group_by, selection.group_datasets)
    runs, df = df, whole_split(df)
    configs = configurations(df, selection)
    facts = dataset_facts(df, configs)
    members = group_members(facts, by)
    parts = {part for tasks in members.values() for _, part in tasks}
    lookup, seeds = score_lookups(df, metric, parts)
    cost = by.name == "scale"
    named = shows_recipes(configs)
    axes = config_axes(configs)
    table = ResultTable(by.name, f"{metric_label(metric)} {by.title}",
                        ["model", "init", *axes, *(["params (M)", "TMACs", "TFLOPs"] if cost else []), *members],
                        display={"model": MODEL_NAMES})
    profiles = variant_profiles(runs)
    baselines = dict(delta_pairs(configs, profiles))
    shown = []
    for config in configs:
        model, init = config[:2]
        cells = [group_cell(lookup, tasks, config, metric, seeds, selection.summary) for tasks in members.values()]
        table.rows.append([model, init, *axis_values(config, axes), *(_cost(model) if cost else []), *cells])
        shown.append((config, cells))
        if config in baselines:
            table.rows.append([model, DELTA, *axis_values(config, axes), *([None] * 3 if cost else []),
                               *(delta_cell(lookup, tasks, config, baselines[config], metric, selection.summary)
                                 for tasks in members.values())])
    table.notes = (group_notes(table, members, by, metric, selection.summary)
                   + missing_notes(shown, lookup, list(facts.index), named, selection.summary)
                   + pairing_notes(configs, profiles, lookup, named)
                   + seed_notes(df, metric, list(baselines.items()), seeds is not None, named, selection.summary)
                   + protocol_note(runs))
    table.notes += exclusion_notes(df, metric, configs, METRIC_NAMES[metric])
    return table



def seed_notes(df: pd.DataFrame, metric: str, pairs: Sequence[tuple[Config, Config]], seeded: bool,
               named: bool = False, summary: str = MEAN) -> list[str]:
    """How cells average seeds and, per Delta(PT), on how many datasets it is within seed noise."""
    if not seeded:
        return []
    notes = ["seeds: a dataset's score is the mean over its seeds; a cell's \u00b1 is the standard deviation across "
             "seeds of the cell's mean (over the seeds every dataset of the cell ran)" if summary == MEAN else
             "seeds: a dataset's score is the mean over its seeds (no \u00b1: the spread across seeds is of a mean)"]
    scores = dataset_scores(whole_split(df), metric)
    for config, baseline in pairs:
        noise = seed_noise(df, metric, config, baseline, scores).dropna(subset=["within_noise"])
        if len(noise):
            label = config_label(config, named or config[2] != default_recipe(*config[:2]))
            notes.append(f"{label}: {DELTA} within seed noise on {int(noise['within_noise'].sum())} of "
                         f"{len(noise)} datasets (|{DELTA}| <= the larger seed standard deviation of pretrained and "
                         "scratch; per dataset: --table datasets)")
    return notes


def _cost(model: str) -> list[float | None]:
    """Parameters (M), TMACs and TFLOPs of one 128^3 patch, as the registry catalogues them (no torch here)."""
    cost = backbones.cost(model)
    if cost is None:
        return [None, None, None]
    parameters, macs = cost
    return [round(parameters / 1e6, 1), round(macs / 1e12, 2), round(2 * macs / 1e12, 2)]


def group_notes(table: ResultTable, members: dict[str, list[Member]], by: Grouping, metric: str,
                summary: str = MEAN) -> list[str]:
    if not members:
        return ["no datasets: no runs of the shown configurations"]
    notes = [f"cell: {summary_text(summary)} {metric_label(metric)} over the n datasets of the group that have the "
             "configuration" + ("" if summary == MEAN else " (quartiles: numpy.percentile, linear interpolation)")]
    if "TMACs" in table.columns:
        notes.append("params, TMACs (forward multiply-accumulates; the STU-Net paper's 'TFLOPs') and TFLOPs "
                     "(= 2 x TMACs) for one 128^3 patch; nnU-Net's network depends on each dataset's plans, "
                     "and ResEnc's are its reference architecture's (6 stages), which the plans adapt")
    if any(row[1] == DELTA for row in table.rows):
        per_recipe = ", per recipe (its pretrained runs minus scratch)" if "recipe" in table.columns else ""
        what = summary_text(summary)
        notes.append(f"{DELTA}: {what} of (pretrained - scratch) over the datasets that have both, in points"
                     + per_recipe if metric not in LOWER_IS_BETTER else
                     f"{DELTA}: {what} of (scratch - pretrained) over the datasets that have both, in mm" + per_recipe)
        notes += [note for note in [delta_convention(metric)] if note]
    empty = [group for group in by.groups if group not in members and group not in by.quiet]
    if empty:
        notes.append(f"no datasets: {', '.join(empty)}")
    return notes


def missing_notes(shown: list[tuple[Config, list[Cell]]], lookup: ScoreLookup, order: list[str],
                   with_recipe: bool, summary: str = MEAN) -> list[str]:
    """Per configuration, the datasets (in registry order) that some of its cells lack; a dataset lacks a part
    score when its result was imported without per-label scores."""
    lines = []
    for config, cells in shown:
        absent = sorted({task for cell in cells for task in cell.missing}, key=order.index)
        named = [task if lookup[None].get((task, *config)) is None else f"{task} (no per-label scores)"
                 for task in absent]
        if named:
            lines.append(f"  {config_label(config, with_recipe)}: {_names(named)}")
    if not lines:
        return []
    how = "averages" if summary == MEAN else "is the median and quartiles of"
    return [f"{MISSING_MARK} not every dataset of the group has this configuration: the cell {how} those that do. "
            "Missing:", *lines]


def _names(tasks: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(tasks[:limit])
    return f"{shown} and {len(tasks) - limit} more ({len(tasks)} datasets)" if len(tasks) > limit else shown


def scale_table(df: pd.DataFrame, selection: Selection | str = "dice", **choices: Any) -> ResultTable:
    """The paper's main table: small / medium / large / average, with parameters and forward cost. `selection`: a
    `Selection`, or a metric with its other fields as keywords (`Selection.of`), as every table takes it."""
    return group_table(df, Selection.of(selection, **choices), "scale")


def modality_target_table(df: pd.DataFrame, selection: Selection | str = "dice", **choices: Any) -> ResultTable:
    """By modality x target: structure&lesion datasets split by label, or grouped whole (`group_datasets`)."""
    return group_table(df, Selection.of(selection, **choices), "modality-target")


def region_table(df: pd.DataFrame, selection: Selection | str = "dice", **choices: Any) -> ResultTable:
    """By region, with bone and vessel as groups of their own."""
    return group_table(df, Selection.of(selection, **choices), "region")

