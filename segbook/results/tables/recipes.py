"""The recipes table: by dataset scale per fine-tuning recipe, each recipe against scratch and the default recipe.

Per network fine-tuned with a shown recipe: its scratch row(s), then each recipe's row with its delta rows, a recipe
minus scratch of the same network and minus the default recipe of the same network, each against the variant whose
shared training settings match (`segbook.results.configs.comparable`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Sequence

import pandas as pd

from segbook.results.configs import (DEFAULT_RECIPE, DELTA, MODEL_NAMES, axis_values, comparable,
                                     configurations, dataset_facts, shows_variants, unpaired_note, variant_profiles)
from segbook.results.excluded import exclusion_notes
from segbook.results.scores import (METRIC_NAMES, Config, metric_label, protocol_note, score_lookups, summary_text,
                                    whole_split)
from segbook.results.selection import MEAN, Selection, TableError
from segbook.runs import default_recipe
from segbook.results.tables.groups import (delta_cell, group_cell, group_members, group_notes, grouping,
                                           missing_notes, seed_notes)
from segbook.results.tables.table import ResultTable

#: The recipes table's delta rows: a recipe minus scratch, and minus the default recipe, of the same model.
VS_SCRATCH = "Delta vs scratch"
VS_DEFAULT = f"Delta vs {DEFAULT_RECIPE}"
DELTA_ROWS = (DELTA, VS_SCRATCH, VS_DEFAULT)


def recipe_configs(df: pd.DataFrame, selection: Selection) -> list[Config]:
    """The recipes table's pretrained configurations: each network with each recipe it was fine-tuned with, or
    those the selection requests (its `models`, `recipes`; not its `inits`), present or not."""
    return [config for config in configurations(df, replace(selection, inits=None)) if config[1] == "pretrained"]


def recipe_rows(df: pd.DataFrame, pretrained: Sequence[Config]) -> list[Config]:
    """The recipes table's rows: per network fine-tuned with a shown recipe, its scratch configurations (each
    variant), then its pretrained ones."""
    networks = list(dict.fromkeys(config[0] for config in pretrained))
    return [config for model in networks
            for config in [*configurations(df, Selection(models=[model], inits=["scratch"])),
                           *(c for c in pretrained if c[0] == model)]]


def _baseline_candidates(config: Config, shown: Sequence[Config]) -> list[tuple[str, list[Config]]]:
    """What a recipe may be compared with: its network from scratch, and fine-tuned with the default recipe (when
    that is another recipe and is `shown`), each in the variants shown."""
    model, _, recipe, _ = config
    scratch = [c for c in shown if c[:3] == (model, "scratch", default_recipe(model, "scratch"))]
    default = [c for c in shown if c[:3] == (model, "pretrained", DEFAULT_RECIPE)] if recipe != DEFAULT_RECIPE else []
    return [(VS_SCRATCH, scratch), *([(VS_DEFAULT, default)] if default else [])]


def recipe_baselines(config: Config, shown: Sequence[Config],
                     profiles: Mapping[Config, dict[str, Any]]) -> list[tuple[str, Config]]:
    """What a recipe is compared with: its network from scratch, and its network fine-tuned with the default
    recipe (when that is another and is `shown`), each the variant whose shared settings match (`comparable`)."""
    found = [(label, comparable(config, candidates, profiles))
             for label, candidates in _baseline_candidates(config, shown)]
    return [(label, baseline) for label, baseline in found if baseline is not None]


def recipe_table(df: pd.DataFrame, selection: Selection | str = "dice", **choices: Any) -> ResultTable:
    """By dataset scale per recipe: per network its scratch row, then each recipe's row with its delta rows. Each
    recipe's pretrained runs are compared with scratch, so choosing initialisations has no meaning here: an error."""
    selection = Selection.of(selection, **choices)
    if selection.inits:
        raise TableError("the recipes table compares each recipe's pretrained runs with scratch: --init does not "
                         "apply to it")
    metric, runs, df = selection.metric, df, whole_split(df)
    pretrained = recipe_configs(df, selection)
    rows = recipe_rows(df, pretrained)
    by = grouping("scale")
    facts = dataset_facts(df, rows)
    members = group_members(facts, by)
    lookup, seeds = score_lookups(df, metric, ())
    profiles = variant_profiles(runs)
    axes = ["recipe", *(["variant"] if shows_variants(rows) else [])]
    table = ResultTable("recipes", f"{metric_label(metric)} by dataset scale per fine-tuning recipe",
                        ["model", "init", *axes, *members], display={"model": MODEL_NAMES})
    shown, notes = [], []
    for config in rows:
        cells = [group_cell(lookup, tasks, config, metric, seeds, selection.summary) for tasks in members.values()]
        table.rows.append([*config[:2], *axis_values(config, axes), *cells])
        shown.append((config, cells))
        for label, baseline in recipe_baselines(config, rows, profiles) if config[1] == "pretrained" else []:
            table.rows.append([config[0], label, *axis_values(config, axes),
                               *(delta_cell(lookup, tasks, config, baseline, metric, selection.summary)
                                 for tasks in members.values())])
        notes += [note for label, candidates in (_baseline_candidates(config, rows) if config[1] == "pretrained"
                                                 else [])
                  for note in [unpaired_note(config, candidates, profiles, label, True)] if note]
    pairs = [(c, b) for c in pretrained for label, b in recipe_baselines(c, rows, profiles) if label == VS_SCRATCH]
    table.notes = (group_notes(table, members, by, metric, selection.summary)
                   + _recipe_notes(table, pretrained, selection.summary) + notes
                   + missing_notes(shown, lookup, list(facts.index), True, selection.summary)
                   + seed_notes(df, metric, pairs, seeds is not None, True, selection.summary) + protocol_note(runs))
    table.notes += exclusion_notes(df, metric, rows, METRIC_NAMES[metric])
    return table


def _recipe_notes(table: ResultTable, pretrained: Sequence[Config], summary: str = MEAN) -> list[str]:
    if not table.rows:
        return []
    what = summary_text(summary)
    notes = [f"{VS_SCRATCH}: {what} of (recipe - scratch of the same network) over the datasets that have both, in "
             "points"]
    if any(row[1] == VS_DEFAULT for row in table.rows):
        notes.append(f"{VS_DEFAULT}: {what} of (recipe - the {DEFAULT_RECIPE} recipe of the same network) over the "
                     "datasets that have both, in points")
    elif all(recipe != DEFAULT_RECIPE for _, _, recipe, _ in pretrained):
        notes.append(f"no {VS_DEFAULT} rows: the {DEFAULT_RECIPE} recipe is not shown (add it to --recipes)")
    return notes

