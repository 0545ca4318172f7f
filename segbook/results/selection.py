"""What a table shows of the collected runs: one value, built once, that every table and statistic reads.

`segbook results` and `segbook report` build it from their options (`Selection.from_args`); Python users build it
directly or pass its fields as keywords (`Selection.of`). It imports nothing heavy, so the CLI's parser can name it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import Any, Mapping

from segbook.errors import SegbookError


class TableError(SegbookError):
    """A table request that cannot be met (unknown table, metric, model or grouping)."""


#: How a cell summarises its datasets (group tables) or test cases (per-dataset tables): the mean, or the median
#: with the first and third quartiles ("median (Q1, Q3)").
MEAN, MEDIAN = "mean", "median"
SUMMARIES = (MEAN, MEDIAN)
#: How `--table ranks` ranks configurations: rank the mean scores over datasets, or (the challenge convention) rank
#: per case, average the ranks per dataset, then over datasets (`segbook.results.stats.ranking`).
AGGREGATE_THEN_RANK, RANK_THEN_AGGREGATE = "aggregate-then-rank", "rank-then-aggregate"
RANK_METHODS = (AGGREGATE_THEN_RANK, RANK_THEN_AGGREGATE)
#: Whether `--table pareto` counts pretraining: not at all, or each pretrained configuration's pretraining GPU-hours
#: divided by the number of downstream datasets shown (`segbook.results.budgets`).
NONE, AMORTISE = "none", "amortise"
PRETRAINING_COSTS = (NONE, AMORTISE)


@dataclass(frozen=True)
class Selection:
    """The metric to score, and which configurations and groups a table shows.

    `models` and `inits` (None: every one present) pick configurations; `recipes` are the pretrained recipes to show
    (None: those in the frame; scratch runs keep theirs); `group_datasets` groups whole datasets by target in the
    modality x target grouping instead of splitting structure&lesion datasets by label; `summary` how cells
    summarise (SUMMARIES); `rank_method` how the ranks table ranks (RANK_METHODS). Sequences are kept as tuples, so
    a selection is hashable and never changes under its user.
    """

    metric: str = "dice"
    models: tuple[str, ...] | None = None
    inits: tuple[str, ...] | None = None
    recipes: tuple[str, ...] | None = None
    group_datasets: bool = False
    summary: str = MEAN
    rank_method: str = AGGREGATE_THEN_RANK
    pretraining_cost: str = NONE
    pretraining_gpu_hours: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        for name, allowed in (("summary", SUMMARIES), ("rank_method", RANK_METHODS),
                              ("pretraining_cost", PRETRAINING_COSTS)):
            if getattr(self, name) not in allowed:
                raise TableError(f"unknown {name.replace('_', ' ')} {getattr(self, name)!r}; choose "
                                 f"{' or '.join(allowed)}")
        for name in ("models", "inits", "recipes"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        hours = self.pretraining_gpu_hours
        object.__setattr__(self, "pretraining_gpu_hours", tuple(sorted(
            (dict(hours) if not isinstance(hours, dict) else hours).items())))

    @classmethod
    def of(cls, selection: Selection | str = "dice", **choices: Any) -> Selection:
        """One selection from the Python API's two spellings: a `Selection` (with `choices` replacing its fields),
        or a metric with the other fields as keywords (`scale_table(df, "hd95", models=["base"])`)."""
        chosen = selection if isinstance(selection, Selection) else cls(selection)
        return replace(chosen, **choices) if choices else chosen

    @classmethod
    def from_args(cls, args: argparse.Namespace, recipes: Mapping[str, str] | None = None) -> Selection:
        """The options `segbook results` and `segbook report` share; `recipes`: `--recipes` resolved to their
        initialisations (`segbook.results.resolve_recipes`), of which the tables show the pretrained ones."""
        pretrained = None if recipes is None else [name for name, init in recipes.items() if init == "pretrained"]
        return cls(args.metric, args.models, args.init, pretrained, args.group_datasets)


def parse_pretraining_hours(values: list[str] | None) -> tuple[tuple[str, float], ...]:
    """`--pretraining-gpu-hours MODEL=H ...`: a known model, once, with a positive finite number of GPU-hours; a
    `TableError` names what is wrong."""
    import math

    from segbook import backbones

    found: dict[str, float] = {}
    for value in values or []:
        model, equals, hours = value.partition("=")
        if not equals:
            raise TableError(f"--pretraining-gpu-hours {value!r}: write MODEL=HOURS, e.g. large=800")
        if not backbones.is_known(model):
            raise TableError(f"--pretraining-gpu-hours {value!r}: unknown model {model!r}; known: "
                             f"{', '.join(backbones.model_names())}")
        try:
            number = float(hours)
        except ValueError:
            number = math.nan
        if not (math.isfinite(number) and number > 0):
            raise TableError(f"--pretraining-gpu-hours {value!r}: the hours must be a positive number")
        if model in found:
            raise TableError(f"--pretraining-gpu-hours names {model} more than once")
        found[model] = number
    return tuple(sorted(found.items()))
