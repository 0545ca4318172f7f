"""The lesion table (`segbook results --table lesions`): lesion-wise detection next to the lesion labels' Dice.

A row per dataset with lesion labels and configuration (variants apart): reference lesions over the test cases,
lesion sensitivity (detected / reference lesions, pooled over the cases and the evaluated folds and seeds of the runs
on the whole train split) and false-positive lesions per test
case, read from each run's `summary.json["lesions"]` (`segbook.evaluation.lesions` defines them), beside the mean
Dice of the dataset's lesion labels. Local runs take precedence over bundled ones of the same configuration;
numbers imported from CSV have no lesion counts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from segbook.results.collect import LOCAL, run_folders
from segbook.results.configs import config_label, configurations, shows_recipes
from segbook.results.scores import CONFIG_KEYS, METRIC_NAMES, check_comparable, protocol_note, whole_split
from segbook.results.selection import Selection
from segbook.results.tables.table import ResultTable
from segbook.runs import summary_path

COUNTS = ("lesions_reference", "lesions_detected", "lesions_false_positive", "num_cases")


def lesion_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Per evaluated run of a dataset with lesion labels: its lesion counts (NaN when its evaluation predates them)."""
    runs = df[df["evaluated"] & df["parts"].str.contains("lesion", na=False) & run_folders(df)]
    records = [{"task": row.task, "model": row.model, "init": row.init, "recipe": row.recipe, "variant": row.variant,
                "source": row.source, "dice_lesion": row.dice_lesion, **_counts(Path(row.path))}
               for row in runs.itertuples()]
    return pd.DataFrame(records, columns=["task", *CONFIG_KEYS, "source", "dice_lesion", *COUNTS])


def _counts(folder: Path) -> dict[str, float]:
    try:
        summary = json.loads(summary_path(folder).read_bytes())
        lesions, cases = summary.get("lesions"), summary.get("num_cases")
    except (OSError, ValueError, AttributeError):
        lesions, cases = None, None
    if not isinstance(lesions, dict):
        return dict.fromkeys(COUNTS, math.nan)
    return {**{key: float(lesions.get(key, math.nan)) for key in COUNTS[:3]}, "num_cases": float(cases)}


def lesion_table(df: pd.DataFrame, selection: Selection | str = "dice", **choices: Any) -> ResultTable:
    """The lesion counts of the selection's configurations (the selection's metric does not apply: lesions are
    counted, and their labels scored by Dice)."""
    check_comparable(df)
    runs, df = df, whole_split(df)
    configs = configurations(df, Selection.of(selection, **choices))
    named = shows_recipes(configs)
    rows = lesion_rows(df)
    table = ResultTable("lesions", "Lesion-wise detection per dataset with lesion labels",
                        ["task", "configuration", "runs", "source", "reference lesions", "sensitivity (%)",
                         "false-positive lesions/case", f"lesion {METRIC_NAMES['dice']} (%)"])
    for (task, *config), group in rows.groupby(["task", *CONFIG_KEYS], sort=True):
        if tuple(config) not in configs:
            continue
        local = group[group["source"] == LOCAL]
        chosen = local if len(local) else group[group["source"] == group["source"].min()]
        table.rows.append([task, config_label(tuple(config), named), len(chosen),
                           chosen["source"].iloc[0], *_pooled(chosen)])
    table.notes = [
        "a lesion is a 26-connected component of a lesion label; a reference lesion is detected when a predicted "
        "voxel of its label overlaps it; a predicted component overlapping no reference lesion is a false positive",
        "sensitivity: detected / reference lesions, pooled over the test cases and the evaluated folds; false "
        "positives per test case likewise; lesion Dice: the mean Dice of the dataset's lesion labels",
        "'not recorded': evaluated before lesion counts were (evaluate again with `segbook evaluate --force`)",
        *protocol_note(runs)]
    if not table.rows:
        table.notes.insert(0, "no datasets: no evaluated runs of datasets with lesion labels")
    return table


def _pooled(runs: pd.DataFrame) -> list[Any]:
    dice = runs["dice_lesion"].mean()
    dice_cell = None if math.isnan(dice) else round(100 * dice, 2)
    if runs["lesions_reference"].isna().any():
        return ["not recorded", None, None, dice_cell]
    reference, detected = runs["lesions_reference"].sum(), runs["lesions_detected"].sum()
    sensitivity = round(100 * detected / reference, 2) if reference else None
    per_case = round(runs["lesions_false_positive"].sum() / runs["num_cases"].sum(), 3)
    return [int(reference), sensitivity, per_case, dice_cell]
