"""Every table by name: the one registry that `segbook results --table NAME [--stats]` and the report ask.

Each entry says what its table shows (the CLI's --help), how it is built and how its `--stats` form is, and which
section of the report shows it; the entries' order is the order of the report's sections, numbered from it.
Builders are named "module:function" and imported when called, so that the CLI's parser reads this module without
importing pandas (`segbook --help` stays instant).

The tables, by kind: `table` (Cell and ResultTable: one table in any output format), `groups` (by dataset scale,
modality x target, region), `datasets`, `recipes`, `fractions`; the statistics in `segbook.results.stats`, the cost
and lesion tables in `segbook.results.cost` and `segbook.results.lesions`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from segbook.results.selection import AGGREGATE_THEN_RANK, MEAN, NONE, Selection, TableError

if TYPE_CHECKING:
    import pandas as pd

    from segbook.results.tables.table import ResultTable


@dataclass(frozen=True)
class Builder:
    """A function named "module:function" with keyword arguments bound; called with (df, selection), it imports
    its module and gives the table."""

    target: str
    arguments: tuple[tuple[str, str], ...] = ()

    def __call__(self, df: pd.DataFrame, selection: Selection) -> ResultTable:
        module, _, function = self.target.partition(":")
        return getattr(importlib.import_module(module), function)(df, selection, **dict(self.arguments))


def builder(target: str, **arguments: str) -> Builder:
    return Builder(target, tuple(arguments.items()))


@dataclass(frozen=True)
class TableSpec:
    """A table by name: what it shows (`about`, as --help says it), its builder and that of its `--stats` form
    (None: --stats does not apply to it), the report section that shows it (None: only `segbook results`),
    whether `segbook results` collects the runs of every recipe for it when --recipes is not given, and whether its
    cells summarise datasets or test cases, so that `--summary median` applies to it."""

    name: str
    about: str
    build: Builder
    stats: Builder | None
    section: str | None
    every_recipe: bool = False
    summarises: bool = False


#: The --stats form of the tables that compare pretrained with scratch over groups of datasets.
PAIRED = "segbook.results.stats:pretrained_stats"


def _group(name: str, about: str) -> TableSpec:
    """A table by group of datasets, whose --stats compares pretrained with scratch per group."""
    return TableSpec(name, about, builder("segbook.results.tables.groups:group_table", group_by=name),
                     builder(PAIRED, group_by=name), section=name, summarises=True)


def _statistic(name: str, function: str, about: str) -> TableSpec:
    """A statistics table: --stats gives it as it is."""
    statistic = builder(f"segbook.results.stats:{function}")
    return TableSpec(name, f"statistics: {about}", statistic, statistic, section="evidence")


TABLES: tuple[TableSpec, ...] = (
    _group("scale", "the paper's main table, default"),
    _group("modality-target", "structure&lesion datasets split by label, or whole with --group-datasets"),
    _group("region", "with bone and vessel"),
    TableSpec("recipes", "by scale per fine-tuning recipe, against scratch and the segbook recipe",
              builder("segbook.results.tables.recipes:recipe_table"), builder("segbook.results.stats:recipe_stats"),
              section="recipes", every_recipe=True, summarises=True),
    _statistic("case-tests", "case_test_stats", "per dataset, pretrained vs scratch over the test cases, Holm and "
               "Benjamini-Hochberg corrected"),
    _statistic("significance", "significance_stats", "per scale group, every configuration against every other, "
               "one-sided, Holm"),
    _statistic("ranks", "rank_stats", "bootstrap over datasets: how often each configuration ranks first"),
    TableSpec("fractions", "every training-data fraction per dataset, and the smallest at which pretraining "
              "matches scratch on all the data", builder("segbook.results.tables.fractions:fraction_table"),
              builder(PAIRED, group_by="all"), section="fractions"),
    TableSpec("cost", "device-hours, memory, throughput, params, TFLOPs and Delta(PT) per device-hour per "
              "configuration", builder("segbook.results.cost:cost_table"), None, section="cost"),
    TableSpec("budgets", "per configuration and training budget: score, Delta(PT), device-hours, and agreement with "
              "the largest budget (sign, Spearman, Delta(PT) difference with bootstrap CI, smallest agreeing budget)",
              builder("segbook.results.budgets:budget_table"), None, section="budgets"),
    TableSpec("curves", "score against device-hours per configuration: snapshot evaluations (learning rate not "
              "decayed) and finished runs of each budget", builder("segbook.results.curves:curve_table"), None,
              section="curves"),
    TableSpec("pareto", "score against compute across configurations and budgets, the Pareto front marked "
              "(--pretraining-cost amortise counts pretraining)", builder("segbook.results.budgets:pareto_table"),
              None, section=None),
    TableSpec("datasets", "a row per dataset, every configuration side by side",
              builder("segbook.results.tables.datasets:dataset_table"), builder(PAIRED, group_by="all"),
              section="datasets", summarises=True),
    TableSpec("lesions", "lesion sensitivity and false positives per case",
              builder("segbook.results.lesions:lesion_table"), None, section=None),
    TableSpec("external", "per (trained on, tested on) pair: internal and external scores, the gap, Delta(PT) on "
              "each and whether pretraining narrows the gap (segbook evaluate --on)",
              builder("segbook.results.external:external_table"), None, section="external"),
)
NAMES = tuple(spec.name for spec in TABLES)
DEFAULT_TABLE = "scale"


def table_spec(name: str) -> TableSpec:
    for spec in TABLES:
        if spec.name == name:
            return spec
    raise TableError(f"unknown table {name!r}; choose one of {', '.join(NAMES)}")


def build_table(df: pd.DataFrame, name: str, selection: Selection | str = "dice", stats: bool = False,
                **choices: Any) -> ResultTable:
    """Any table by name, or with `stats` its --stats form: what `segbook results --table NAME [--stats]` prints.
    `selection`: a `Selection`, or a metric with its other fields as keywords (`Selection.of`)."""
    selection = Selection.of(selection, **choices)
    spec = check_request(name, selection, stats)
    return (spec.stats if stats else spec.build)(df, selection)


def check_request(name: str, selection: Selection, stats: bool = False) -> TableSpec:
    """The table's spec, or a `TableError` saying why the request does not apply to it (before anything is
    collected): --stats to a table without a --stats form, --summary median to one whose cells are no summary over
    datasets or cases, a rank method to a table other than ranks."""
    spec = table_spec(name)
    if stats and spec.stats is None:
        raise TableError(f"--stats compares pretrained with scratch per group; it does not apply to --table {name}")
    if selection.summary != MEAN and (stats or not spec.summarises):
        shown = "--stats gives tests of mean differences" if stats else (
            f"--table {name}'s cells are statistics, costs or counts, not a summary over datasets or test cases")
        raise TableError(f"--summary {selection.summary} does not apply: {shown}; it applies to --table "
                         f"{', '.join(s.name for s in TABLES if s.summarises)} (without --stats)")
    if (selection.pretraining_cost != NONE or selection.pretraining_gpu_hours) and name != "pareto":
        raise TableError(f"--pretraining-cost and --pretraining-gpu-hours say what --table pareto counts; they do not "
                         f"apply to --table {name}")
    if selection.pretraining_gpu_hours and selection.pretraining_cost == NONE:
        raise TableError("--pretraining-gpu-hours gives the hours that --pretraining-cost amortise counts; add it")
    if selection.rank_method != AGGREGATE_THEN_RANK and name != "ranks":
        raise TableError(f"--method says how --table ranks ranks configurations; it does not apply to --table {name}")
    return spec


def sections() -> dict[str, list[TableSpec]]:
    """The report's sections in order, each with the tables it shows."""
    found: dict[str, list[TableSpec]] = {}
    for spec in TABLES:
        if spec.section is not None:
            found.setdefault(spec.section, []).append(spec)
    return found


def table_help() -> str:
    """What `segbook results --help` says of --table."""
    return ("; ".join(f"{spec.name} ({spec.about})" for spec in TABLES) + ". Seeds are averaged; all but fractions "
            "show the runs on the whole train split")
