"""What a table's means leave out, said in its notes: the (case, label) pairs and labels a metric is undefined on.

A cell is a mean of means; what those means skip changes what the cell says, so every table says how much (the runs
left out whole, their evaluation files refused among them, are named by `segbook.results.cells.left_out_notes`):
- (case, label) pairs where the metric is undefined (reference and prediction both empty: left out of the label's
  mean over cases) and labels undefined on every test case (left out of their run's mean), counted per metric over
  the runs the table shows. Under the current conventions a label that only one mask lacks is never left out: it
  scores 0 (HD95: the worst case).
"""

from __future__ import annotations

from typing import Iterable

import pandas as pd

from segbook.evaluation.files import Exclusions
from segbook.results.collect import run_folders


def exclusion_notes(df: pd.DataFrame, metric: str, configs: Iterable[tuple[str, str, str, str]],
                    name: str | None = None) -> list[str]:
    """The notes of a table of `metric` (shown as `name`) over the runs of `df` of the `configs` (model, init,
    recipe, variant) it shows."""
    keys = pd.MultiIndex.from_arrays([df["model"], df["init"], df["recipe"], df["variant"]])
    shown = df[keys.isin(list(configs))]
    return _undefined_note(shown, metric, name or metric)


def _undefined_note(df: pd.DataFrame, metric: str, name: str) -> list[str]:
    scored = df[run_folders(df) & df["evaluated"] & df[metric].notna()]
    exclusions = [e for e in scored["exclusions"] if isinstance(e, Exclusions) and metric in e.excluded]
    pairs, labels = (sum(e.excluded[metric][i] for e in exclusions) for i in (0, 1))
    if not pairs and not labels:
        return []
    text = (f"{name}: {pairs} of {sum(e.pairs for e in exclusions)} (case, label) pairs of the {len(exclusions)} "
            "runs shown are left out of the means (reference and prediction both empty: the metric is undefined)")
    if labels:
        text += (f"; {labels} of {sum(e.labels for e in exclusions)} labels are left out of their run's mean "
                 "(undefined on every test case)")
    return [text]
