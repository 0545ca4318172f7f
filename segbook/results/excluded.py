"""What a table leaves out, said in its notes: runs whose evaluation files were refused, and the (case, label)
pairs and labels its means leave out.

A cell is a mean of means; what those means skip changes what the cell says, so every table says how much:
- runs left out because their evaluation files failed the checks (`segbook.evaluation.files`; `collect.REFUSED`),
  counted and named;
- (case, label) pairs where the metric is undefined (reference and prediction both empty: left out of the label's
  mean over cases) and labels undefined on every test case (left out of their run's mean), counted per metric over
  the runs the table shows. Under the current conventions a label that only one mask lacks is never left out: it
  scores 0 (HD95: the worst case).
"""

from __future__ import annotations

from typing import Any, Iterable

import pandas as pd

from segbook.evaluation.files import Exclusions
from segbook.results.collect import LOCAL, REFUSED, run_folders
from segbook.runs import DEFAULT_FRACTION, DEFAULT_SEED

#: Runs named in a note at most; the others are counted.
NAMED = 8


def exclusion_notes(df: pd.DataFrame, metric: str, configs: Iterable[tuple[str, str, str]],
                    name: str | None = None) -> list[str]:
    """The notes of a table of `metric` (shown as `name`) over the runs of `df` of the `configs` it shows."""
    shown = df[pd.MultiIndex.from_arrays([df["model"], df["init"], df["recipe"]]).isin(list(configs))]
    return _refused_note(shown) + _undefined_note(shown, metric, name or metric)


def _refused_note(df: pd.DataFrame) -> list[str]:
    refused = df[df["status"].isin(REFUSED)]
    if refused.empty:
        return []
    names = [_run_name(row) for row in refused.itertuples()]
    more = f" and {len(names) - NAMED} more" if len(names) > NAMED else ""
    return [f"{len(names)} run(s) left out: their evaluation files failed segbook's checks (a warning names each "
            f"file and its problem): {'; '.join(names[:NAMED])}{more}"]


def _run_name(row: Any) -> str:
    extras = [*([f"seed {row.seed}"] if row.seed != DEFAULT_SEED else []),
              *([f"{100 * row.fraction:g}% of the train split"] if row.fraction != DEFAULT_FRACTION else []),
              f"fold {row.fold}", *([row.source] if row.source != LOCAL else [])]
    return f"{row.task} {row.model} {row.init} {row.recipe} ({', '.join(extras)})"


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
