"""`segbook report`: one self-contained HTML file with every table, the statistics and the figures.

Everything is inline (CSS, figures as base64 PNG drawn by matplotlib's Agg backend), so the file can be mailed,
attached to a ticket or opened offline as it is. The figures can also be written as PNG or PDF files for papers.
"""

from __future__ import annotations

import base64
import html
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import pandas as pd

from segbook import backbones
from segbook.errors import SegbookError
from segbook.io import atomic_path, atomic_write_text
from segbook.results.collect import LOCAL, ResultsError
from segbook.results.stats import (ALPHA, case_tests, case_tests_table, compare_pretrained, compare_recipes,
                                   rank_stability, rank_table, recipe_stats_table, significance_map,
                                   significance_table, stats_table)
from segbook.results.tables import (
    CONFIG_KEYS,
    DEFAULT_RECIPE,
    DELTA,
    DELTA_ROWS,
    METRIC_NAMES,
    MODEL_NAMES,
    SCRATCH_RECIPE,
    Cell,
    Config,
    ResultTable,
    ScoreLookup,
    comparable,
    config_label,
    configurations,
    dataset_facts,
    dataset_scores,
    dataset_table,
    delta_pairs,
    delta_unit,
    fraction_table,
    fraction_text,
    group_cell,
    group_members,
    group_table,
    grouping,
    metric_factor,
    metric_label,
    metric_sign,
    recipe_configs,
    recipe_table,
    run_fractions,
    score_lookup,
    score_lookups,
    scratch_candidates,
    seed_noise,
    shows_recipes,
    variant_profiles,
    whole_split,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FIGURE_FORMATS = ("png", "pdf")
PAGE_DPI, FILE_DPI = 110, 200
GROUPINGS = ("scale", "modality-target", "region")


@dataclass
class Drawn:
    """A figure for the page: the file stem it is saved under, its caption and the matplotlib figure."""

    name: str
    caption: str
    figure: Figure


def write_report(df: pd.DataFrame, out: str | os.PathLike, metric: str = "dice",
                 figures: str | os.PathLike | None = None, figure_format: str = "png", group_datasets: bool = False,
                 models: Sequence[str] | None = None, inits: Sequence[str] | None = None,
                 title: str = "SegBook results", description: str = "",
                 recipes: Sequence[str] | None = None) -> Path:
    """Write the HTML report to `out` (atomically); with `figures`, also each figure as `DIR/NAME.png|pdf`.

    `recipes` are the pretrained recipes to show (default: those in `df`); when `df` holds pretrained runs of more
    than one recipe, the report compares them in a section of its own."""
    if figure_format not in FIGURE_FORMATS:
        raise SegbookError(f"unknown figure format {figure_format!r}; choose {' or '.join(FIGURE_FORMATS)}")
    import matplotlib.style

    out = Path(out)
    # Matplotlib's defaults, whatever else ran in this process (nnU-Net's progress plots set seaborn's font scale 2.5).
    with matplotlib.style.context("default"):
        sections = _sections(df, metric, group_datasets, models, inits, recipes, figures, figure_format)
    atomic_write_text(out, _page(title, _subtitle(df, metric, description), sections))
    return out


def _sections(df: pd.DataFrame, metric: str, group_datasets: bool, models: Sequence[str] | None,
              inits: Sequence[str] | None, recipes: Sequence[str] | None, figures: str | os.PathLike | None,
              figure_format: str) -> list[str]:
    runs, df = df, whole_split(df)
    configs = configurations(df, models, inits, recipes)
    if not configs or dataset_facts(df, configs).empty:
        if len(runs):
            return [_fractions_section(runs, metric, models, inits, recipes, 1, figures, figure_format)]
        return ["<p class='empty'>no datasets: the results store has no runs of the requested configurations.</p>"]
    cases, cases_error = _case_tests(df, metric, models, recipes)
    parts = [_headline(df, metric, models, recipes)]
    for number, name in enumerate(GROUPINGS, start=1):
        by = grouping(name, group_datasets)
        table = group_table(runs, by, metric, models, inits, recipes)
        comparison = compare_pretrained(df, metric, name, group_datasets, models, recipes, cases)
        parts.append(f"<section><h2>{number}. {html.escape(table.title)}</h2>" + _table_html(table)
                     + _notes_html(table.notes))
        if name == "scale":
            parts.append(_figure_html(_violin(df, metric, configs), figures, figure_format))
        if not comparison.empty:
            drawn = _delta_bars(comparison, metric, by.title, f"delta_{name.replace('-', '_')}")
            parts.append(_figure_html(drawn, figures, figure_format))
        stats = stats_table(comparison, metric, by.title)
        parts.append(f"<h3>Pretrained vs scratch {html.escape(by.title)}</h3>" + _table_html(stats)
                     + _notes_html(stats.notes) + "</section>")
    number = len(GROUPINGS) + 1
    if df.loc[df["init"] == "pretrained", "recipe"].nunique() > 1:
        parts.append(_recipes_section(df, metric, models, recipes, number, figures, figure_format))
        number += 1
    parts.append(_evidence_section(df, metric, models, inits, recipes, cases, cases_error, number, figures,
                                   figure_format))
    number += 1
    if len(run_fractions(runs)) > 1:
        parts.append(_fractions_section(runs, metric, models, inits, recipes, number, figures, figure_format))
        number += 1
    cost = _cost_section(df, metric, configs, number, figures, figure_format)
    if cost:
        parts.append(cost)
        number += 1
    datasets = dataset_table(runs, metric, models, inits, recipes)
    parts.append(f"<section><h2>{number}. {html.escape(datasets.title)}</h2>" + _table_html(datasets)
                 + _notes_html(datasets.notes) + "</section>")
    parts.append(_definitions_html())
    return parts


def _case_tests(df: pd.DataFrame, metric: str, models: Sequence[str] | None,
                recipes: Sequence[str] | None) -> tuple[pd.DataFrame | None, str]:
    """The per-case tests, or why there are none: a run without per-case metrics for `metric` leaves the report
    without them (and says so) rather than testing fewer runs than the tables average."""
    try:
        return case_tests(df, metric, models, recipes), ""
    except ResultsError as error:
        return None, str(error)


def _evidence_section(df: pd.DataFrame, metric: str, models: Sequence[str] | None, inits: Sequence[str] | None,
                      recipes: Sequence[str] | None, cases: pd.DataFrame | None, cases_error: str, number: int,
                      figures: str | os.PathLike | None, figure_format: str) -> str:
    """Per-case tests per dataset, the significance maps by dataset scale (heatmaps and table), rank stability."""
    parts = [f"<section><h2>{number}. Evidence: per-case tests, significance maps, rank stability</h2>"]
    if cases is None:
        parts.append(f"<p class='empty'>no per-case tests: {html.escape(cases_error)}</p>")
    else:
        table = case_tests_table(cases, metric)
        parts.append(f"<h3>{html.escape(table.title)}</h3>" + _table_html(table) + _notes_html(table.notes))
    significance = significance_map(df, metric, "scale", False, models, inits, recipes)
    if not significance.empty:
        parts.append(_figure_html(_significance_heatmaps(significance, metric), figures, figure_format))
    table = significance_table(significance)
    parts.append(f"<h3>{html.escape(table.title)} (by dataset scale)</h3>" + _table_html(table)
                 + _notes_html(table.notes))
    ranks = rank_table(rank_stability(df, metric, "scale", False, models, inits, recipes))
    parts.append(f"<h3>{html.escape(ranks.title)} (by dataset scale)</h3>" + _table_html(ranks)
                 + _notes_html(ranks.notes) + "</section>")
    return "".join(parts)


def _fractions_section(df: pd.DataFrame, metric: str, models: Sequence[str] | None, inits: Sequence[str] | None,
                       recipes: Sequence[str] | None, number: int, figures: str | os.PathLike | None,
                       figure_format: str) -> str:
    """Data-efficiency curves per dataset scale and the fractions table (with each dataset's smallest fraction
    at which pretraining matches scratch on all the data)."""
    table = fraction_table(df, metric, models, inits, recipes)
    drawn = _fraction_curves(df, metric, configurations(df, models, inits, recipes))
    return (f"<section><h2>{number}. {html.escape(table.title)}</h2>" + _figure_html(drawn, figures, figure_format)
            + _table_html(table) + _notes_html(table.notes) + "</section>")


def _recipes_section(df: pd.DataFrame, metric: str, models: Sequence[str] | None, recipes: Sequence[str] | None,
                     number: int, figures: str | os.PathLike | None, figure_format: str) -> str:
    """The recipes table, each recipe's per-dataset gain over scratch, and the statistics of its delta rows."""
    table = recipe_table(df, metric, models, recipes)
    stats = recipe_stats_table(compare_recipes(df, metric, models=models, recipes=recipes), metric)
    drawn = _recipe_deltas(df, metric, recipe_configs(df, models, recipes))
    return (f"<section><h2>{number}. {html.escape(table.title)}</h2>" + _table_html(table) + _notes_html(table.notes)
            + _figure_html(drawn, figures, figure_format)
            + f"<h3>Recipes vs scratch and vs {DEFAULT_RECIPE} by dataset scale</h3>" + _table_html(stats)
            + _notes_html(stats.notes) + "</section>")


# --- text ------------------------------------------------------------------------------------------------------


def _cost_section(df: pd.DataFrame, metric: str, configs: Sequence[Config], number: int,
                  figures: str | os.PathLike | None, figure_format: str) -> str:
    """The cost table and the score-against-cost figure, when some run recorded its cost (`segbook.results.cost`)."""
    from segbook.results.cost import cost_figure, cost_summary, cost_table

    summary = cost_summary(df, metric, list(configs))
    if not summary["costed_runs"].any():
        return ""
    table = cost_table(df, metric, configs=list(configs), summary=summary)
    figure = cost_figure(summary, metric)
    drawn = "" if figure is None else _figure_html(Drawn(
        "cost", f"Figure: mean {metric_label(metric)} of each configuration against its training device-hours "
        "per run (left) and the forward TFLOPs of one 128^3 patch (right).", figure), figures, figure_format)
    return (f"<section><h2>{number}. {html.escape(table.title)}</h2>" + _table_html(table) + drawn
            + _notes_html(table.notes) + "</section>")


def _subtitle(df: pd.DataFrame, metric: str, description: str) -> str:
    evaluated = df[df["evaluated"]]
    local = int((evaluated["source"] == LOCAL).sum())
    imported = len(evaluated) - local
    facts = [f"metric: {metric_label(metric)}", f"{df['task'].nunique()} datasets",
             f"{local} evaluated runs" + (f" + {imported} imported results" if imported else ""),
             f"generated {time.strftime('%Y-%m-%d %H:%M')}"]
    return " &middot; ".join(html.escape(fact) for fact in [description, *facts] if fact)


def _headline(df: pd.DataFrame, metric: str, models: Sequence[str] | None, recipes: Sequence[str] | None) -> str:
    """One sentence per STU-Net size (and recipe): the average effect of pretraining over all datasets."""
    overall = compare_pretrained(df, metric, "all", models=models, recipes=recipes)
    if overall.empty:
        return "<p class='lead'>No STU-Net size has both pretrained and scratch results on a dataset yet.</p>"
    named = overall["recipe"].ne(DEFAULT_RECIPE).any()
    items = []
    for row in overall.itertuples():
        p_value = "n/a" if pd.isna(row.p_value) else f"{row.p_value:.3g}"
        recipe = f" ({html.escape(row.recipe)})" if named else ""
        variant = f" [{html.escape(row.variant)}]" if row.variant else ""
        items.append(f"<li><b>{MODEL_NAMES[row.model]}{recipe}{variant}</b>: {_signed_span(row.delta)} "
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
    baseline = _scratch_of(df, config)
    if baseline is None:
        return ""
    noise = seed_noise(df, metric, config, baseline).dropna(subset=["within_noise"])
    if noise.empty:
        return ""
    return (f"; &Delta;(PT) within seed noise on {int(noise['within_noise'].sum())} of {len(noise)} datasets "
            "(|&Delta;| &le; the larger seed standard deviation)")


def _scratch_of(df: pd.DataFrame, config: Config) -> Config | None:
    """The scratch configuration a pretrained one is compared with (`tables.comparable`), among those in `df`."""
    present = list(dict.fromkeys(zip(*(df[key] for key in CONFIG_KEYS))))
    return comparable(config, scratch_candidates(config, present), variant_profiles(df))


def _signed_span(value: float) -> str:
    kind = "pos" if value > 0 else "neg" if value < 0 else ""
    return f"<span class='{kind}'>{value + 0.0:+.2f}</span>"  # + 0.0: no -0.00


def _definitions_html() -> str:
    return """<section><h2>Definitions</h2><ul>
<li>A configuration is a network, its initialisation and its fine-tuning recipe (the paper's: segbook; from
scratch: scratch), and its variant: runs of one recipe whose training settings differ (budget, learning rate,
precision, checkpoint, plans, ...: their fingerprint) are configurations of their own, named by what differs
(<i>base scratch [12x3 it]</i>), as are runs kept apart by their source (a bundle scored on another test split,
numbers imported from CSV). Two recipes or two variants are never averaged into one cell; tables name the recipe
when another is shown, and the variant when there is one.</li>
<li>A run's score is the mean over labels of the per-label mean over test cases (cases where a metric is undefined,
e.g. Dice with empty reference and prediction, are left out of that label's mean).</li>
<li>A dataset's score for a configuration is the mean over its seeds of each seed's mean over its evaluated folds
(SegBook's protocol trains fold "all"); with more than one seed, &plusmn; is the standard deviation across seeds (of
a group cell: of the group's mean, per seed every dataset of the cell ran). With folds 0-4 a seed counts only
with all five folds evaluated. The runs of one cell agree in data and evaluation settings (patch size, spacing,
normalisation, checkpoint, ...) and test split; runs scored on a split other than their dataset's current one, or
whose record contradicts its folder, are left out, and the notes name them. Imported results are dataset-level
numbers, kept apart as their own rows. Every table but the training-data fractions shows the runs trained on the
whole train split.</li>
<li>Seed noise of a dataset's &Delta;(PT): the larger of the pretrained and scratch standard deviations across
seeds; the &Delta;(PT) is within seed noise (~) when its magnitude is no larger.</li>
<li>HD95 is a distance in mm where lower is better: its &Delta; is scratch minus pretrained, so that a positive
&Delta; always means pretraining helps.</li>
<li>Per-case tests: per dataset, the two-sided Wilcoxon signed-rank test of pretrained against scratch over the
test cases, on each case's mean over foreground labels (seeds averaged per case), corrected across datasets with
Holm (the verdicts better / not different / worse, at 0.05) and Benjamini-Hochberg.</li>
<li>Significance maps: per dataset scale, for every ordered pair of configurations the one-sided Wilcoxon
signed-rank test over the group's datasets that the row is better than the column, Holm-corrected over the pairs of
the group. Rank stability: datasets resampled with replacement (seeded); how often each configuration has the best
mean.</li>
<li>A group's score is the mean over its datasets that have the configuration; n says how many. A dataset without
the configuration is listed as missing and marks the cell with *; it is never averaged in.</li>
<li>By modality and target, Structure&amp;Lesion datasets give their seen structures, unseen structures and lesions
to the three groups (their score there is the mean of those labels), unless grouped whole.</li>
<li>&Delta;(PT) is the mean over datasets with both initialisations of pretrained minus scratch, in points, the
scratch variant being the one with the same budget, precision and plans, over the datasets where the two agree in
data and evaluation settings and test split; its
95% interval is a seeded percentile bootstrap over datasets; p is the two-sided Wilcoxon signed-rank test. A recipe's
&Delta; vs scratch is the same for its runs, its &Delta; vs segbook the paired mean of it minus the segbook recipe of
the same network.</li>
</ul></section>"""


def _notes_html(notes: Sequence[str]) -> str:
    if not notes:
        return ""
    items = "".join(f"<li class='{'sub' if note.startswith('  ') else ''}'>{html.escape(note.strip())}</li>"
                    for note in notes)
    return f"<ul class='notes'>{items}</ul>"


# --- tables ----------------------------------------------------------------------------------------------------


HEADERS = {"ci_low": "95% CI low", "ci_high": "95% CI high", "p_value": "Wilcoxon p", "delta": "&Delta;(PT)",
           "params (M)": "params (M)", "TMACs": "TMACs", "TFLOPs": "TFLOPs"}


def _table_html(table: ResultTable) -> str:
    if not table.rows:
        return "<p class='empty'>no datasets</p>"
    head = "".join(f"<th>{_header(column)}</th>" for column in table.columns)
    body = "".join(_row_html(table, row) for row in table.rows)
    return (f"<div class='scroll'><table class='{table.name}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
            "</table></div>")


def _header(column: str) -> str:
    """`base pretrained` -> `STU-Net-B<br>pretrained`, `large delta` -> `STU-Net-L<br>Δ(PT)`, `large llrd delta`
    -> `STU-Net-L<br>llrd Δ(PT)`."""
    if column in HEADERS:
        return HEADERS[column]
    model, _, rest = column.partition(" ")
    if model in MODEL_NAMES and rest:
        recipe, delta = (rest.removesuffix("delta").strip(), True) if rest.endswith("delta") else (rest, False)
        return f"{MODEL_NAMES[model]}<br>{html.escape(recipe)}{' ' if recipe and delta else ''}" + (
            "&Delta;(PT)" if delta else "")
    return html.escape(column)


def _row_html(table: ResultTable, row: list[Any]) -> str:
    is_delta = len(row) > 1 and row[1] in DELTA_ROWS
    cells = []
    for column, value in zip(table.columns, row):
        if isinstance(value, Cell):
            cells.append(_cell_html(value, table.show_count))
        elif column == "model":
            cells.append(f"<td class='label'>{html.escape(MODEL_NAMES.get(value, value))}</td>")
        elif value in DELTA_ROWS:
            label = "&Delta;(PT)" if value == DELTA else html.escape(value).replace("Delta", "&Delta;")
            cells.append(f"<td class='label'>{label}</td>")
        else:
            cells.append(_plain_html(column, value, table.name == "significance"))
    return f"<tr class='{'delta' if is_delta else ''}'>{''.join(cells)}</tr>"


def _plain_html(column: str, value: Any, p_values: bool = False) -> str:
    """A value that is not a Cell; `p_values`: every number in the table is a p-value (the significance map)."""
    if value is None:
        return "<td class='num missing'>&ndash;</td>"
    if isinstance(value, float):
        if column == "delta":
            return f"<td class='num'>{_signed_span(value)}</td>"
        text = (f"{value:.3g}" if p_values or column.startswith("p_") else f"{value:+.2f}" if column.startswith("ci_")
                else f"{value:.1f}" if column == "params (M)" else f"{value:.2f}")
        return f"<td class='num'>{text}</td>"
    if isinstance(value, int):
        return f"<td class='num'>{value}</td>"
    return f"<td>{html.escape(str(value))}</td>"


def _cell_html(cell: Cell, show_count: bool) -> str:
    if cell.value is None:
        return (f"<td class='num missing' title='{html.escape(cell.detail(), quote=True)}'>"
                f"{html.escape(cell.status or 'missing')}</td>")
    number = _signed_span(cell.value) if cell.signed else f"{cell.value:.2f}"
    number += "" if cell.spread is None else f"<span class='sd'> &plusmn;{cell.spread:.2f}</span>"
    count = f"<span class='n'>n={cell.count}</span>" if show_count else ""
    marker = f"<sup>{html.escape(cell.marker)}</sup>" if cell.marker else ""
    detail = f"missing: {cell.detail()}" if cell.missing else cell.status
    title = f" title='{html.escape(detail, quote=True)}'" if detail else ""
    return f"<td class='num'{title}>{number}{marker}{count}</td>"


# --- figures ---------------------------------------------------------------------------------------------------


def _figure_html(drawn: Drawn, folder: str | os.PathLike | None, figure_format: str) -> str:
    """The figure embedded as a base64 PNG; with `folder`, also saved there as a file for papers."""
    buffer = io.BytesIO()
    drawn.figure.savefig(buffer, format="png", dpi=PAGE_DPI, bbox_inches="tight")
    if folder is not None:
        with atomic_path(Path(folder) / f"{drawn.name}.{figure_format}") as path:
            drawn.figure.savefig(path, format=figure_format, dpi=FILE_DPI, bbox_inches="tight")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    caption = html.escape(drawn.caption)
    return (f"<figure id='{drawn.name}'><img alt='{caption}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{caption}</figcaption></figure>")


def _violin(df: pd.DataFrame, metric: str, configs: Sequence[Config]) -> Drawn:
    """Per-dataset scores of each configuration: distribution (violin) and every dataset (dots)."""
    import numpy as np
    from matplotlib.figure import Figure

    scores = dataset_scores(df, metric).set_index(CONFIG_KEYS)
    data = [metric_factor(metric) * (scores.loc[[config], "score"].to_numpy() if config in scores.index
                                     else np.array([])) for config in configs]
    named = shows_recipes(configs)
    figure = Figure(figsize=(max(6.0, 1.15 * len(configs) + 2), 4.2))
    axes = figure.subplots()
    rng = np.random.default_rng(0)
    for position, ((model, init, *_), values) in enumerate(zip(configs, data), start=1):
        colour = backbones.colour(model)
        if len(np.unique(values)) > 1:
            body = axes.violinplot(values, [position], widths=0.8, showextrema=False)["bodies"][0]
            body.set(facecolor=colour, edgecolor=colour, alpha=0.25 if init == "scratch" else 0.55)
        axes.scatter(position + rng.uniform(-0.12, 0.12, len(values)), values, s=9, color=colour, alpha=0.8,
                     edgecolors="none", zorder=3)
        if len(values):
            axes.hlines(np.median(values), position - 0.3, position + 0.3, color="black", linewidth=1.4, zorder=4)
    axes.set_xticks(range(1, len(configs) + 1),
                    [_violin_label(config, len(v), named) for config, v in zip(configs, data)], fontsize=8)
    axes.set_ylabel(f"{metric_label(metric)} per dataset")
    axes.set_title(f"Per-dataset {METRIC_NAMES[metric]} by configuration (black line: median)", fontsize=11)
    axes.grid(axis="y", alpha=0.3)
    axes.spines[["top", "right"]].set_visible(False)
    caption = (f"Figure: per-dataset {metric_label(metric)} of each configuration, mean over folds and seeds; each "
               "dot is a dataset.")
    return Drawn("violin_per_dataset", caption, figure)


def _violin_label(config: Config, count: int, with_recipe: bool) -> str:
    """`STU-Net-L`, `pretrained`, the recipe when the figure shows others, the variant, and n: a line each, so
    labels fit."""
    model, init, recipe, variant = config
    lines = [MODEL_NAMES[model], init, *([recipe] if with_recipe and recipe != SCRATCH_RECIPE else []),
             *([f"[{variant}]"] if variant else [])]
    return "\n".join(lines) + f" (n={count})"


def _delta_bars(comparison: pd.DataFrame, metric: str, title: str, name: str) -> Drawn:
    """Mean Delta(PT) per group and STU-Net size (and recipe), with the bootstrap 95% interval."""
    import numpy as np
    from matplotlib.figure import Figure

    groups = list(dict.fromkeys(comparison["group"]))
    series = list(dict.fromkeys(zip(comparison["model"], comparison["recipe"], comparison["variant"])))
    named = any(recipe != DEFAULT_RECIPE for _, recipe, _ in series)
    width = 0.8 / len(series)
    figure = Figure(figsize=(max(6.0, 0.45 * len(groups) * len(series) + 3), 3.8))
    axes = figure.subplots()
    for offset, (model, recipe, variant) in enumerate(series):
        mine = (comparison["model"] == model) & (comparison["recipe"] == recipe) & (comparison["variant"] == variant)
        rows = comparison[mine].set_index("group").reindex(groups)
        x = np.arange(len(groups)) + (offset - (len(series) - 1) / 2) * width
        errors = np.vstack([rows["delta"] - rows["ci_low"], rows["ci_high"] - rows["delta"]])
        label = " ".join([MODEL_NAMES[model], *([recipe] if named else []), *([f"[{variant}]"] if variant else [])])
        axes.bar(x, rows["delta"], width, yerr=errors, capsize=2, color=backbones.colour(model),
                 hatch=_hatch((recipe, variant), series), label=label, error_kw={"linewidth": 0.8})
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_xticks(range(len(groups)), [g.replace(" ", "\n", 1) for g in groups], fontsize=8)
    axes.set_ylabel(f"\u0394(PT) {METRIC_NAMES[metric]} ({delta_unit(metric)})")
    axes.set_title(f"Pretrained minus scratch {title}\n(bars: mean over datasets; whiskers: 95% bootstrap CI)",
                   fontsize=10)
    axes.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes.grid(axis="y", alpha=0.3)
    axes.spines[["top", "right"]].set_visible(False)
    caption = f"Figure: \u0394(PT) of {METRIC_NAMES[metric]} {title}, per STU-Net size, over datasets with both."
    return Drawn(name, caption, figure)


HATCHES = ("", "//", "..", "xx", "\\\\", "oo", "--", "++")


def _hatch(recipe: tuple[str, str], series: Sequence[tuple[str, str, str]]) -> str:
    """Sizes keep their colour; recipes (and variants) get a hatch each, so two of one size tell apart in print."""
    recipes = list(dict.fromkeys((r, v) for _, r, v in series))
    return HATCHES[recipes.index(recipe) % len(HATCHES)]


def _gains(lookup: ScoreLookup, config: Config, scratch: Config | None, metric: str) -> list[float]:
    """Per dataset with both (agreeing in basis), `config`'s score minus its network's from scratch (`scratch`, the
    comparable variant), in points (reversed for HD95)."""
    if scratch is None:
        return []
    factor = metric_sign(metric) * metric_factor(metric)
    tasks = sorted({task for task, *rest in lookup[None] if tuple(rest) == config})
    return [factor * (pair[0] - pair[1]) for task in tasks
            if (pair := lookup.pair(None, task, config, scratch)) is not None]


def _recipe_deltas(df: pd.DataFrame, metric: str, pretrained: Sequence[Config]) -> Drawn:
    """Per recipe and STU-Net size, every dataset's gain over the same network from scratch (box and dots): the
    spread behind the recipes table's Delta vs scratch rows."""
    import numpy as np
    from matplotlib.figure import Figure

    lookup = score_lookup(df, metric, ())
    data = [np.array(_gains(lookup, config, _scratch_of(df, config), metric)) for config in pretrained]
    figure = Figure(figsize=(max(6.0, 0.9 * len(pretrained) + 2), 4.0))
    axes = figure.subplots()
    rng = np.random.default_rng(0)
    for position, ((model, *_), values) in enumerate(zip(pretrained, data), start=1):
        if len(values):
            axes.boxplot(values, positions=[position], widths=0.5, showfliers=False,
                         medianprops={"color": "black"}, boxprops={"color": backbones.colour(model)})
        axes.scatter(position + rng.uniform(-0.12, 0.12, len(values)), values, s=12, color=backbones.colour(model),
                     alpha=0.85, edgecolors="none", zorder=3)
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_xticks(range(1, len(pretrained) + 1),
                    [f"{recipe}{f' [{variant}]' if variant else ''}\n{MODEL_NAMES[model]} (n={len(v)})"
                     for (model, _, recipe, variant), v in zip(pretrained, data)], fontsize=8)
    axes.set_ylabel(f"{METRIC_NAMES[metric]} gain over scratch ({delta_unit(metric)})")
    axes.set_title("Per-dataset gain over scratch per recipe (box: quartiles and median; dots: datasets)",
                   fontsize=10)
    axes.grid(axis="y", alpha=0.3)
    axes.spines[["top", "right"]].set_visible(False)
    caption = (f"Figure: per-dataset {METRIC_NAMES[metric]} of each recipe minus the same network from scratch "
               "(points); each dot is a dataset with both.")
    return Drawn("delta_recipes", caption, figure)


def _significance_heatmaps(significance: pd.DataFrame, metric: str) -> Drawn:
    """Per dataset-scale group, configurations x configurations: the Holm-corrected one-sided p-value that the row
    is better than the column, as Touchstone draws it (dark: significant)."""
    import numpy as np
    from matplotlib.figure import Figure

    groups = list(dict.fromkeys(significance["group"]))
    labels = list(dict.fromkeys(significance["config"]))
    size = 0.55 * len(labels) + 1.6
    figure = Figure(figsize=(size * len(groups) + 1.2, size + 0.6))
    axes_list = np.atleast_1d(figure.subplots(1, len(groups), squeeze=False)[0])
    for axes, group in zip(axes_list, groups):
        mine = significance[significance["group"] == group]
        matrix = np.full((len(labels), len(labels)), np.nan)
        for row in mine.itertuples():
            matrix[labels.index(row.config), labels.index(row.versus)] = row.p_holm
        image = axes.imshow(-np.log10(np.clip(matrix, 1e-6, 1)), cmap="Greens", vmin=0, vmax=-np.log10(1e-4))
        for i, j in zip(*np.where(~np.isnan(matrix))):
            p = matrix[i, j]
            axes.text(j, i, "*" if p < ALPHA else "", ha="center", va="center", color="white", fontsize=10)
        axes.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        axes.set_yticks(range(len(labels)), labels if axes is axes_list[0] else [""] * len(labels), fontsize=7)
        axes.set_title(group, fontsize=10)
        axes.set_xlabel("... than this one", fontsize=8)
    axes_list[0].set_ylabel("this configuration better ...", fontsize=8)
    figure.colorbar(image, ax=list(axes_list), shrink=0.8, label="-log10 p (Holm)")
    caption = (f"Figure: significance maps of {METRIC_NAMES[metric]} by dataset scale: row better than column, "
               f"one-sided Wilcoxon signed-rank over the group's datasets, Holm-corrected per group; * p < {ALPHA:g}.")
    return Drawn("significance_scale", caption, figure)


def _fraction_curves(df: pd.DataFrame, metric: str, configs: Sequence[Config]) -> Drawn:
    """Per dataset-scale group, each STU-Net size's pretrained and scratch score against the training-data fraction
    (mean over the group's datasets; whiskers: the standard deviation across seeds of that mean)."""
    import numpy as np
    from matplotlib.figure import Figure

    fractions = run_fractions(df)
    by = grouping("scale")
    members = group_members(dataset_facts(df, configs), by)
    lookups = {f: score_lookups(df, metric, (), f) for f in fractions}
    cases = df.drop_duplicates("task").set_index("task")["train_cases"]
    shown = [c for pair in delta_pairs(configs, variant_profiles(df)) for c in pair] or list(configs)
    figure = Figure(figsize=(3.6 * len(members) + 1.5, 3.6))
    axes_list = figure.subplots(1, len(members), squeeze=False)[0]
    for axes, (group, tasks) in zip(axes_list, members.items()):
        for config in dict.fromkeys(shown):
            cells = [group_cell(lookups[f][0], tasks, config, metric, lookups[f][1]) for f in fractions]
            points = [(f, c.value, c.spread or 0.0) for f, c in zip(fractions, cells) if c.value is not None]
            if points:
                x, y, spread = map(np.array, zip(*points))
                axes.errorbar(x, y, yerr=spread, marker="o", markersize=3, capsize=2, color=backbones.colour(config[0]),
                              linestyle="-" if config[1] == "pretrained" else "--",
                              label=f"{MODEL_NAMES[config[0]]} {config_label(config).split(' ', 1)[1]}")
        mean_cases = np.mean([cases[task] for task, _ in tasks])
        axes.set_xscale("log")
        axes.set_xticks(fractions, [f"{fraction_text(f)}\n\u2248{round(f * mean_cases)}" for f in fractions],
                        fontsize=7)
        axes.minorticks_off()
        axes.set_title(f"{group} (n={len(tasks)})", fontsize=10)
        axes.set_xlabel("train split fraction / \u2248 training cases (group mean)", fontsize=8)
        axes.grid(alpha=0.3)
    axes_list[0].set_ylabel(metric_label(metric))
    axes_list[-1].legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    caption = (f"Figure: data efficiency: {metric_label(metric)} against the fraction of the train split (and the "
               "group's mean number of training cases), pretrained (solid) and scratch (dashed), mean over the "
               "group's datasets with whiskers of the standard deviation across seeds.")
    return Drawn("fractions_scale", caption, figure)


# --- page ------------------------------------------------------------------------------------------------------


CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:#1d232a;margin:0;
background:#f6f7f9;line-height:1.45}
main{max-width:1320px;margin:0 auto;padding:28px 32px 60px;background:#fff;box-shadow:0 0 12px rgba(0,0,0,.06)}
h1{margin:0 0 4px;font-size:26px}h2{font-size:19px;margin:34px 0 10px;border-bottom:2px solid #e4e7eb;
padding-bottom:4px}h3{font-size:15px;margin:22px 0 8px;color:#39424e}
.subtitle{color:#5b6672;font-size:13.5px;margin-bottom:8px}
.lead{background:#f1f6fd;border-left:4px solid #4c72b0;padding:2px 16px 6px;margin-top:18px}
.lead h2{border:none;margin-top:12px}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:13px;margin:6px 0;font-variant-numeric:tabular-nums}
th{background:#eef1f5;font-weight:600;padding:6px 9px;text-align:center;border-bottom:2px solid #cfd5dc;
vertical-align:bottom}
td{padding:4px 9px;border-bottom:1px solid #e6e9ed;white-space:nowrap}
tbody tr:nth-child(even){background:#fafbfc}
td.num{text-align:right}td.label{font-weight:600}
tr.delta td{background:#fbf7ec;font-style:italic}
.n{display:block;font-size:10.5px;color:#7a8591;font-style:normal}
.missing{color:#9aa3ad;font-style:italic}
.sd{font-size:11px;color:#5b6672}
.pos{color:#1a7f37}.neg{color:#c2362b}
sup{color:#c2362b;font-weight:700}
ul.notes{font-size:12px;color:#5b6672;margin:4px 0 10px;padding-left:18px}
ul.notes li.sub{list-style:none;margin-left:10px}
figure{margin:16px 0}figure img{max-width:100%;height:auto;border:1px solid #e6e9ed}
figcaption{font-size:12px;color:#5b6672}
.empty{color:#7a8591;font-style:italic}
table.datasets{font-size:12px}table.datasets td{padding:3px 6px}
table.datasets td:first-child{white-space:normal;overflow-wrap:anywhere;min-width:150px;max-width:230px}
"""


def _page(title: str, subtitle: str, sections: list[str]) -> str:
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{CSS}</style></head>"
            f"<body><main><h1>{html.escape(title)}</h1><div class='subtitle'>{subtitle}</div>"
            f"{''.join(sections)}</main></body></html>\n")
