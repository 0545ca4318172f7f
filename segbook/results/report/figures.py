"""The report's figures (matplotlib's Agg backend, no pyplot state): per-dataset violins, Delta(PT) bars per group,
each recipe's gain over scratch, significance heatmaps and data-efficiency curves; and where a drawn figure goes
(`Figures`: embedded in the page as a base64 PNG, and with a folder also as a PNG or PDF file for papers).
"""

from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import pandas as pd

from segbook import backbones
from segbook.io import atomic_path
from segbook.results.configs import (DEFAULT_RECIPE, MODEL_NAMES, SCRATCH_RECIPE, config_label, dataset_facts,
                                     delta_pairs, scratch_of, shows_recipes, variant_profiles)
from segbook.results.scores import (CONFIG_KEYS, METRIC_NAMES, Config, ScoreLookup, dataset_scores, delta_unit,
                                    metric_factor, metric_label, metric_sign, score_lookup, score_lookups)
from segbook.results.stats import ALPHA
from segbook.results.tables.fractions import fraction_text, run_fractions
from segbook.results.tables.groups import group_cell, group_members, grouping

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FIGURE_FORMATS = ("png", "pdf")
PAGE_DPI, FILE_DPI = 110, 200


@dataclass
class Drawn:
    """A figure for the page: the file stem it is saved under, its caption and the matplotlib figure."""

    name: str
    caption: str
    figure: Figure




@dataclass(frozen=True)
class Figures:
    """Where drawn figures go: embedded in the page, and with `folder` also saved there as files of `format`."""

    folder: str | os.PathLike | None = None
    format: str = "png"

    def html(self, drawn: Drawn) -> str:
        """The figure embedded as a base64 PNG; with a folder, also saved there as a file for papers."""
        buffer = io.BytesIO()
        drawn.figure.savefig(buffer, format="png", dpi=PAGE_DPI, bbox_inches="tight")
        if self.folder is not None:
            with atomic_path(Path(self.folder) / f"{drawn.name}.{self.format}") as path:
                drawn.figure.savefig(path, format=self.format, dpi=FILE_DPI, bbox_inches="tight")
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        caption = html.escape(drawn.caption)
        return (f"<figure id='{drawn.name}'><img alt='{caption}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{caption}</figcaption></figure>")


def violin(df: pd.DataFrame, metric: str, configs: Sequence[Config]) -> Drawn:
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


def delta_bars(comparison: pd.DataFrame, metric: str, title: str, name: str) -> Drawn:
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


def recipe_deltas(df: pd.DataFrame, metric: str, pretrained: Sequence[Config]) -> Drawn:
    """Per recipe and STU-Net size, every dataset's gain over the same network from scratch (box and dots): the
    spread behind the recipes table's Delta vs scratch rows."""
    import numpy as np
    from matplotlib.figure import Figure

    lookup = score_lookup(df, metric, ())
    data = [np.array(_gains(lookup, config, scratch_of(df, config), metric)) for config in pretrained]
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


def significance_heatmaps(significance: pd.DataFrame, metric: str) -> Drawn:
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


def fraction_curves(df: pd.DataFrame, metric: str, configs: Sequence[Config]) -> Drawn | None:
    """Per dataset-scale group, each STU-Net size's pretrained and scratch score against the training-data fraction
    (mean over the group's datasets; whiskers: the standard deviation across seeds of that mean); None when no
    dataset has runs of the configurations shown (the table's notes say so)."""
    import numpy as np
    from matplotlib.figure import Figure

    fractions = run_fractions(df)
    by = grouping("scale")
    members = group_members(dataset_facts(df, configs), by)
    if not members:
        return None
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

