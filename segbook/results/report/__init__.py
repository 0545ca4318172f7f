"""`segbook report`: one self-contained HTML file with every table, the statistics and the figures.

Everything is inline (CSS, figures as base64 PNG drawn by matplotlib's Agg backend), so the file can be mailed,
attached to a ticket or opened offline as it is. The figures can also be written as PNG or PDF files for papers.

The page is a headline, then the sections of the table registry (`segbook.results.tables.sections`) in its order,
numbered as they are shown (a section with nothing to show is left out), then the definitions. Each section has a
renderer here, which builds its tables through the registry where the report shows them as `segbook results`
prints them; `figures` draws, `markup` writes the page.
"""

from __future__ import annotations

import html
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd

from segbook.errors import SegbookError
from segbook.io import atomic_write_text
from segbook.results.collect import LOCAL, ResultsError
from segbook.results.configs import DEFAULT_RECIPE, MODEL_NAMES, configurations, dataset_facts, scratch_of
from segbook.results.cost import cost_figure, cost_summary, cost_table
from segbook.results.report.figures import (FIGURE_FORMATS, Drawn, Figures, delta_bars, fraction_curves,
                                            recipe_deltas, significance_heatmaps, violin)
from segbook.results.report.markup import definitions_html, notes_html, page_html, signed_span, table_html
from segbook.results.scores import METRIC_NAMES, Config, delta_unit, metric_label, metric_sign, seed_noise, whole_split
from segbook.results.selection import MEAN, Selection
from segbook.results.stats import (case_tests, case_tests_table, compare_pretrained, rank_stability, rank_table,
                                   significance_map, significance_table, stats_table)
from segbook.results.tables import TableSpec, sections, table_spec
from segbook.results.tables.fractions import run_fractions
from segbook.results.tables.groups import grouping
from segbook.results.tables.recipes import recipe_configs

EVIDENCE = "Evidence: per-case tests, significance maps, rank stability"


@dataclass(frozen=True, eq=False)
class Page:
    """What every section reads: the collected runs, those on the whole train split (`df`), the selection and the
    configurations it shows, the per-case tests (or why there are none) and where figures go."""

    runs: pd.DataFrame
    df: pd.DataFrame
    selection: Selection
    configs: list[Config]
    cases: pd.DataFrame | None
    cases_error: str
    figures: Figures


def write_report(df: pd.DataFrame, out: str | os.PathLike, selection: Selection | str = "dice",
                 figures: str | os.PathLike | None = None, figure_format: str = "png", title: str = "SegBook results",
                 description: str = "", **choices: Any) -> Path:
    """Write the HTML report to `out` (atomically); with `figures`, also each figure as `DIR/NAME.png|pdf`.

    `selection`: a `Selection`, or a metric with its other fields as keywords (`Selection.of`); its `recipes` are the
    pretrained recipes to show (default: those in `df`); when `df` holds pretrained runs of more than one recipe,
    the report compares them in a section of its own."""
    if figure_format not in FIGURE_FORMATS:
        raise SegbookError(f"unknown figure format {figure_format!r}; choose {' or '.join(FIGURE_FORMATS)}")
    import matplotlib.style

    selection, out = Selection.of(selection, **choices), Path(out)
    if selection.summary != MEAN:
        raise SegbookError(f"the report shows means beside statistics of mean differences; summary "
                           f"{selection.summary!r} applies to the tables (`segbook results --summary median`)")
    # Matplotlib's defaults, whatever else ran in this process (nnU-Net's progress plots set seaborn's font scale 2.5).
    with matplotlib.style.context("default"):
        parts = _parts(df, selection, Figures(figures, figure_format))
    atomic_write_text(out, page_html(title, _subtitle(df, selection.metric, description), parts))
    return out


def _parts(runs: pd.DataFrame, selection: Selection, figures: Figures) -> list[str]:
    """The headline, the registry's sections that have something to show, numbered, and the definitions; only the
    fractions section when no run is on the whole train split."""
    df = whole_split(runs)
    configs = configurations(df, selection)
    if not configs or dataset_facts(df, configs).empty:
        if len(runs):
            return _numbered([_fraction_section(Page(runs, df, selection, configs, None, "", figures),
                                                table_spec("fractions"))])
        return ["<p class='empty'>no datasets: the results store has no runs of the requested configurations.</p>"]
    page = Page(runs, df, selection, configs, *_case_tests(df, selection), figures)
    shown = [RENDERERS[section](page, specs) for section, specs in sections().items()]
    return [_headline(page), *_numbered(shown), definitions_html()]


def _numbered(shown: Iterable[tuple[str, str] | None]) -> list[str]:
    """Each shown section (title, body) with its number, in order."""
    present = [section for section in shown if section is not None]
    return [f"<section><h2>{number}. {html.escape(title)}</h2>{body}</section>"
            for number, (title, body) in enumerate(present, start=1)]


def _case_tests(df: pd.DataFrame, selection: Selection) -> tuple[pd.DataFrame | None, str]:
    """The per-case tests, or why there are none: a run without per-case metrics for the metric leaves the report
    without them (and says so) rather than testing fewer runs than the tables average."""
    try:
        return case_tests(df, selection), ""
    except ResultsError as error:
        return None, str(error)


# --- sections: (page, the section's tables in the registry) -> (title, body), or None when there is nothing ---------


def _groups(page: Page, specs: list[TableSpec]) -> tuple[str, str]:
    """A table by group of datasets, its Delta(PT) bars (by scale, the per-dataset violins first) and its
    statistics."""
    (spec,) = specs
    metric, by = page.selection.metric, grouping(spec.name, page.selection.group_datasets)
    table = spec.build(page.runs, page.selection)
    comparison = compare_pretrained(page.df, page.selection, spec.name, page.cases)
    body = table_html(table) + notes_html(table.notes)
    if spec.name == "scale":
        body += page.figures.html(violin(page.df, metric, page.configs))
    if not comparison.empty:
        body += page.figures.html(delta_bars(comparison, metric, by.title, f"delta_{spec.name.replace('-', '_')}"))
    stats = stats_table(comparison, metric, by.title)
    return table.title, (body + f"<h3>Pretrained vs scratch {html.escape(by.title)}</h3>" + table_html(stats)
                         + notes_html(stats.notes))


def _recipes(page: Page, specs: list[TableSpec]) -> tuple[str, str] | None:
    """The recipes table, each recipe's per-dataset gain over scratch, and the statistics of its delta rows: when
    pretrained runs of more than one recipe are shown."""
    df = page.df
    if df.loc[df["init"] == "pretrained", "recipe"].nunique() <= 1:
        return None
    (spec,) = specs
    selection = replace(page.selection, inits=None)  # each recipe against scratch: --init does not apply
    table, stats = spec.build(df, selection), spec.stats(df, selection)
    drawn = recipe_deltas(df, selection.metric, recipe_configs(df, selection))
    return table.title, (table_html(table) + notes_html(table.notes) + page.figures.html(drawn)
                         + f"<h3>Recipes vs scratch and vs {DEFAULT_RECIPE} by dataset scale</h3>" + table_html(stats)
                         + notes_html(stats.notes))


def _evidence(page: Page, specs: list[TableSpec]) -> tuple[str, str]:
    """Per-case tests per dataset, the significance maps by dataset scale (heatmaps and table), rank stability: the
    registry's statistics tables, in its order."""
    parts = {"case-tests": _case_tests_html, "significance": _significance_html, "ranks": _ranks_html}
    return EVIDENCE, "".join(parts[spec.name](page) for spec in specs)


def _case_tests_html(page: Page) -> str:
    if page.cases is None:
        return f"<p class='empty'>no per-case tests: {html.escape(page.cases_error)}</p>"
    table = case_tests_table(page.cases, page.selection.metric)
    return f"<h3>{html.escape(table.title)}</h3>" + table_html(table) + notes_html(table.notes)


def _significance_html(page: Page) -> str:
    significance = significance_map(page.df, page.selection, "scale")
    drawn = "" if significance.empty else page.figures.html(significance_heatmaps(significance,
                                                                                  page.selection.metric))
    table = significance_table(significance)
    return (drawn + f"<h3>{html.escape(table.title)} (by dataset scale)</h3>" + table_html(table)
            + notes_html(table.notes))


def _ranks_html(page: Page) -> str:
    table = rank_table(rank_stability(page.df, page.selection, "scale"))
    return f"<h3>{html.escape(table.title)} (by dataset scale)</h3>" + table_html(table) + notes_html(table.notes)


def _fractions(page: Page, specs: list[TableSpec]) -> tuple[str, str] | None:
    """The fractions section, when runs on more than one training fraction were collected."""
    (spec,) = specs
    return _fraction_section(page, spec) if len(run_fractions(page.runs)) > 1 else None


def _fraction_section(page: Page, spec: TableSpec) -> tuple[str, str]:
    """Data-efficiency curves per dataset scale and the fractions table (with each dataset's smallest fraction at
    which pretraining matches scratch on all the data)."""
    table = spec.build(page.runs, page.selection)
    drawn = fraction_curves(page.runs, page.selection.metric, configurations(page.runs, page.selection))
    curves = "" if drawn is None else page.figures.html(drawn)
    return table.title, curves + table_html(table) + notes_html(table.notes)


def _cost(page: Page, specs: list[TableSpec]) -> tuple[str, str] | None:
    """The cost table and the score-against-cost figure, when some run recorded its cost (`segbook.results.cost`)."""
    metric = page.selection.metric
    summary = cost_summary(page.df, metric, list(page.configs))
    if not summary["costed_runs"].any():
        return None
    table = cost_table(page.df, page.selection, configs=list(page.configs), summary=summary)
    figure = cost_figure(summary, metric)
    drawn = "" if figure is None else page.figures.html(Drawn(
        "cost", f"Figure: mean {metric_label(metric)} of each configuration against its training device-hours "
        "per run (left) and the forward TFLOPs of one 128^3 patch (right).", figure))
    return table.title, table_html(table) + drawn + notes_html(table.notes)


def _datasets(page: Page, specs: list[TableSpec]) -> tuple[str, str]:
    (spec,) = specs
    table = spec.build(page.runs, page.selection)
    return table.title, table_html(table) + notes_html(table.notes)


def _external(page: Page, specs: list[TableSpec]) -> tuple[str, str] | None:
    """The external table and internal-against-external figure, when some run was evaluated on another dataset."""
    from segbook.results.external import external_comparison, external_figure, external_table

    frame = external_comparison(page.df, page.selection)
    if frame.empty:
        return None
    table = external_table(page.df, page.selection, frame=frame)
    figure = external_figure(frame, page.selection.metric)
    drawn = page.figures.html(Drawn(
        "external", f"Figure: internal against external mean {metric_label(page.selection.metric)} per (trained on, "
        "tested on) pair and configuration (circles pretrained, squares scratch); below the diagonal: worse on the "
        "data the run never saw.", figure))
    return table.title, table_html(table) + drawn + notes_html(table.notes)


def _budgets(page: Page, specs: list[TableSpec]) -> tuple[str, str] | None:
    """The budgets table, when runs of more than one training budget were collected."""
    if page.df.loc[page.df["evaluated"], "budget"].nunique() < 2:
        return None
    (spec,) = specs
    table = spec.build(page.runs, page.selection)
    return table.title, table_html(table) + notes_html(table.notes)


def _curves(page: Page, specs: list[TableSpec]) -> tuple[str, str] | None:
    """The learning curves (`segbook.results.curves`), when some configuration has more than one point: snapshot
    evaluations or several budgets."""
    from segbook.results.curves import curve_figure, curve_points, curve_table

    points = curve_points(page.runs, page.selection)
    if not (points.groupby("family").size() > 1).any():
        return None
    metric = page.selection.metric
    table = curve_table(page.runs, page.selection)
    figure = curve_figure(points, metric)
    drawn = "" if figure is None else page.figures.html(Drawn(
        "curves", f"Figure: mean {metric_label(metric)} against training device-hours per configuration; solid: "
        "finished runs of each budget; dashed: snapshots of one budget's schedule (learning rate not decayed).",
        figure))
    return table.title, table_html(table) + drawn + notes_html(table.notes)


#: How the report shows each section of the table registry.
RENDERERS: dict[str, Callable[[Page, list[TableSpec]], tuple[str, str] | None]] = {
    "scale": _groups, "modality-target": _groups, "region": _groups, "recipes": _recipes, "evidence": _evidence,
    "fractions": _fractions, "cost": _cost, "datasets": _datasets, "external": _external,
    "budgets": _budgets, "curves": _curves}


# --- text ------------------------------------------------------------------------------------------------------


def _subtitle(df: pd.DataFrame, metric: str, description: str) -> str:
    evaluated = df[df["evaluated"]]
    local = int((evaluated["source"] == LOCAL).sum())
    imported = len(evaluated) - local
    facts = [f"metric: {metric_label(metric)}", f"{df['task'].nunique()} datasets",
             f"{local} evaluated runs" + (f" + {imported} imported results" if imported else ""),
             f"generated {time.strftime('%Y-%m-%d %H:%M')}"]
    return " &middot; ".join(html.escape(fact) for fact in [description, *facts] if fact)


def _headline(page: Page) -> str:
    """One sentence per STU-Net size (and recipe): the average effect of pretraining over all datasets."""
    df, metric = page.df, page.selection.metric
    overall = compare_pretrained(df, page.selection, "all")
    if overall.empty:
        return "<p class='lead'>No STU-Net size has both pretrained and scratch results on a dataset yet.</p>"
    named = overall["recipe"].ne(DEFAULT_RECIPE).any()
    items = []
    for row in overall.itertuples():
        p_value = "n/a" if pd.isna(row.p_value) else f"{row.p_value:.3g}"
        recipe = f" ({html.escape(row.recipe)})" if named else ""
        variant = f" [{html.escape(row.variant)}]" if row.variant else ""
        items.append(f"<li><b>{MODEL_NAMES[row.model]}{recipe}{variant}</b>: {signed_span(row.delta)} "
                     f"{delta_unit(metric)} (95% CI {row.ci_low:+.2f} to {row.ci_high:+.2f}) over {row.n} datasets; "
                     f"wins / ties / losses {row.wins} / {row.ties} / {row.losses}; Wilcoxon p = {p_value}"
                     f"{_noise_sentence(df, metric, (row.model, 'pretrained', row.recipe, row.variant))}</li>")
    how = ("the same network trained from scratch minus the pretrained network (lower is better, so positive means "
           "pretraining helps)" if metric_sign(metric) < 0 else
           "the pretrained network minus the same network trained from scratch")
    return (f"<section class='lead'><h2>Pretraining at a glance</h2><p>{METRIC_NAMES[metric]}: {how}, over every "
            f"dataset with both (seeds averaged):</p><ul>{''.join(items)}</ul></section>")


def _noise_sentence(df: pd.DataFrame, metric: str, config: Config) -> str:
    """`; Delta(PT) within seed noise on k of n datasets` where datasets ran more than one seed."""
    baseline = scratch_of(df, config)
    if baseline is None:
        return ""
    noise = seed_noise(df, metric, config, baseline).dropna(subset=["within_noise"])
    if noise.empty:
        return ""
    return (f"; &Delta;(PT) within seed noise on {int(noise['within_noise'].sum())} of {len(noise)} datasets "
            "(|&Delta;| &le; the larger seed standard deviation)")
