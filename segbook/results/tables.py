"""The benchmark's tables: scores by dataset scale, by modality x target, by region, and per dataset.

Definitions (docs/results.md): a run's score is the mean over labels of the per-label mean over test cases; a
dataset's score for a configuration is the mean over its evaluated folds; a group's score is the mean over its
datasets that have the configuration, shown with how many that is. Datasets without the configuration are listed
as missing and mark the cell, never averaged in. Delta(PT) is the paired mean of pretrained minus scratch over the
datasets of the group that have both.

A configuration is (model, initialisation, recipe): two recipes of one network are never averaged into one cell.
Tables name the recipe only when a recipe other than the defaults (segbook, scratch) is shown, so the paper's
tables look as they always did. The runs of one dataset are never averaged or compared across plans or test splits
(`check_comparable` refuses them, naming the runs), and every table's notes say which folds and plans it shows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import pandas as pd

from segbook.errors import SegbookError
from segbook.registry import REGIONS, SCALES
from segbook.recipes import BUILTIN_ORDER
from segbook import backbones
from segbook.results.collect import IMPORTED_PREFIX, LOCAL, METRICS, default_plans, run_folders
from segbook.runs import DEFAULT_RECIPES, INITS, STUNET_MODELS

#: The paper's configurations in its order: nnU-Net's default network, then each STU-Net size scratch / pretrained.
CONFIGURATIONS: tuple[tuple[str, str], ...] = (("nnunet", "scratch"),
                                               *((m, i) for m in STUNET_MODELS for i in ("scratch", "pretrained")))


class _ModelNames(Mapping[str, str]):
    """A model's row name in tables and reports, from the backbone registry (`Backbone.title`: "STU-Net-L",
    "nnU-Net ResEnc-L"); a model no longer registered shows under its own name."""

    def __getitem__(self, model: str) -> str:
        return backbones.table_name(model)

    def __contains__(self, model: object) -> bool:
        return isinstance(model, str) and backbones.is_known(model)

    def __iter__(self):
        return iter(backbones.model_names())

    def __len__(self) -> int:
        return len(backbones.model_names())


MODEL_NAMES: Mapping[str, str] = _ModelNames()


def all_configurations() -> list[tuple[str, str]]:
    """Every (model, init) in table order: the paper's, then each other backbone (ResEnc, users') scratch, then
    pretrained where it has weights."""
    others = [(b.name, i) for b in backbones.all_backbones() for i in ("scratch", "pretrained")
              if (b.name, i) not in CONFIGURATIONS and b.name not in STUNET_MODELS and b.name != "nnunet"
              and (i == "scratch" or b.pretrainable)]
    return [*CONFIGURATIONS, *others]
DELTA = "Delta(PT)"
DEFAULT_RECIPE = DEFAULT_RECIPES["pretrained"]
SCRATCH_RECIPE = DEFAULT_RECIPES["scratch"]
#: The recipes table's delta rows: a recipe minus scratch, and minus the default recipe, of the same model.
VS_SCRATCH = "Delta vs scratch"
VS_DEFAULT = f"Delta vs {DEFAULT_RECIPE}"
DELTA_ROWS = (DELTA, VS_SCRATCH, VS_DEFAULT)
MISSING_MARK = "*"  # a group cell that some datasets of the group lack
PARTIAL_MARK = "\u2020"  # a dataset cell averaging only some of the folds that were started (a dagger)
AVERAGE = "average"
METRIC_NAMES = {"dice": "Dice", "nsd": "NSD"}
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
TABLES = ("scale", "modality-target", "region", "datasets", "recipes")
Config = tuple[str, str, str]  # (model, init, recipe)
Member = tuple[str, str | None]  # (task, part): part None scores the whole dataset
ScoreLookup = dict[str | None, dict[tuple[str, str, str, str], float]]
#: What identifies a dataset score: the dataset and the configuration.
SCORE_KEYS = ["task", "model", "init", "recipe"]
LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 PARTIAL_MARK: r"$^\dagger$"}


class TableError(SegbookError):
    """A table request that cannot be met (unknown metric, model or grouping)."""


# --- cells and tables ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One score (percent) with how many datasets (or folds) it averages and what is missing from it."""

    value: float | None
    count: int = 0
    missing: tuple[str, ...] = ()
    status: str = ""
    marker: str = ""
    signed: bool = False
    source: str = ""

    def number(self) -> float | None:
        return None if self.value is None else round(self.value, 4)

    def text(self, show_count: bool = True) -> str:
        if self.value is None:
            return (self.status or "missing") + self.marker
        number = f"{self.value:+.2f}" if self.signed else f"{self.value:.2f}"
        return number + (f" (n={self.count})" if show_count else "") + self.marker

    def detail(self) -> str:
        return "; ".join(self.missing) if self.missing else self.status


@dataclass
class ResultTable:
    """A table ready for any output format: plain values and `Cell`s, with footnotes."""

    name: str
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    count_label: str = "n"
    detail_label: str = "missing"
    show_count: bool = True
    #: Per column, how codes read in text formats (e.g. `base` -> `STU-Net-B`); csv and json keep the codes.
    display: dict[str, Mapping[str, str]] = field(default_factory=dict)

    def records(self, fmt: str) -> list[dict[str, Any]]:
        """Rows for `segbook.cli.output.emit`: formatted cells in text formats, numbers plus counts in csv/json."""
        machine = fmt in ("csv", "json")
        records = [dict(self._record(row, machine)) for row in self.rows]
        return [{_latex(k): _latex(v) for k, v in r.items()} for r in records] if fmt == "latex" else records

    def _record(self, row: list[Any], machine: bool) -> Iterable[tuple[str, Any]]:
        for column, value in zip(self.columns, row):
            if isinstance(value, Cell) and machine:
                yield column, value.number()
                yield f"{column} {self.count_label}", value.count
                yield f"{column} {self.detail_label}", value.detail()
            elif isinstance(value, Cell):
                yield column, value.text(self.show_count)
            elif machine:
                yield column, value
            else:
                yield column, "-" if value is None else self.display.get(column, {}).get(value, value)


def _latex(value: Any) -> Any:
    """pandas' `to_latex` writes text as it is; `CT&PET` or `Task001_X` would break the document."""
    if not isinstance(value, str):
        return value
    return re.sub("|".join(map(re.escape, LATEX_ESCAPES)), lambda match: LATEX_ESCAPES[match[0]], value)


# --- dataset-level scores --------------------------------------------------------------------------------------


def score_column(metric: str, part: str | None = None) -> str:
    if metric not in METRICS:
        raise TableError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return metric if part is None else f"{metric}_{part}"


def check_comparable(df: pd.DataFrame) -> None:
    """`TableError` naming the runs when the evaluated local (or bundled) runs of one dataset were trained with
    different plans or scored on different test splits: their scores would be averaged (over folds) or compared
    (in a Delta) as if they measured the same thing. Each backbone's own default plans count as the same choice
    (ResEnc trains on nnU-Net's ResEnc plans, STU-Net on nnUNetPlans, as nnU-Net's own comparisons do). Runs
    recorded before splits were (no `split`) are not checked for it."""
    local = df[run_folders(df) & df["evaluated"]]
    local = local.assign(plans_choice=[
        "each backbone's default" if plans == default_plans(model) else plans
        for plans, model in zip(local["plans"], local["model"])])
    named = local["path"].where(local["source"] == LOCAL, local["source"] + " " + local["path"])
    for column, shown, what, fix in (("plans_choice", "plans", "plans", "tabulate one plans at a time (--plans)"),
                                     ("split", "split", "test splits",
                                      "evaluate them all on the dataset's current split (runs trained beside another "
                                      "split must be trained again), or keep the others in another --results-dir "
                                      "(runs of a bundle:NAME: leave bundles out with --no-imported)")):
        known = local[local[column].notna()]
        counts = known.groupby("task")[column].nunique()
        for task in counts[counts > 1].index:
            runs = known[known["task"] == task]
            listing = "; ".join(f"{value}: {', '.join(named[runs.index[runs[shown] == value]])}"
                                for value in sorted(runs[shown].unique()))
            raise TableError(f"{task}: runs with different {what} are never averaged or compared ({listing}); "
                             f"{fix}")


def dataset_scores(df: pd.DataFrame, metric: str = "dice", part: str | None = None) -> pd.DataFrame:
    """Per (task, model, init, recipe): the mean over evaluated folds (fraction), the number of folds and the source.

    Local runs take precedence over imported numbers for the same configuration of a dataset. Runs of one dataset
    with different plans or test splits are refused (`check_comparable`).
    """
    check_comparable(df)
    column = score_column(metric, part)
    scored = df.loc[df["evaluated"] & df[column].notna(), [*SCORE_KEYS, "source", column]]
    local = scored[scored["source"] == LOCAL]
    imported = scored[scored["source"] != LOCAL]
    imported = imported[~imported.set_index(SCORE_KEYS).index.isin(local.set_index(SCORE_KEYS).index)]
    _check_single_import(imported)
    grouped = pd.concat([local, imported]).groupby(SCORE_KEYS, sort=False)
    return grouped.agg(score=(column, "mean"), folds=(column, "size"), source=("source", "first")).reset_index()


def _check_single_import(imported: pd.DataFrame) -> None:
    counts = imported.groupby(SCORE_KEYS)["source"].nunique()
    clashes = counts[counts > 1]
    if len(clashes):
        task, model, init, _ = clashes.index[0]
        raise TableError(f"{task} {model} {init} is given by more than one imported file; remove one from "
                         "$SEGBOOK_HOME/results/imported/")


def score_lookup(df: pd.DataFrame, metric: str, parts: Iterable[str | None]) -> ScoreLookup:
    """For each part and the whole dataset (None), (task, model, init, recipe) -> dataset score (fraction)."""
    lookup: ScoreLookup = {}
    for part in {None, *parts}:
        scores = dataset_scores(df, metric, part)
        lookup[part] = dict(zip(zip(*(scores[key] for key in SCORE_KEYS)), scores["score"]))
    return lookup


# --- configurations, datasets and groups -----------------------------------------------------------------------


def configurations(df: pd.DataFrame, models: Sequence[str] | None = None, inits: Sequence[str] | None = None,
                   recipes: Sequence[str] | None = None) -> list[Config]:
    """The paper's configurations present in `df`, or those requested, present or not.

    `models` alone asks for both initialisations of each; `inits` alone, that initialisation of the models present.
    A pretrained network shows with each of `recipes` (the pretrained runs' recipes), or when none are given with
    each recipe it has in `df` (the default one if none); a scratch network with each recipe it has (`scratch`).
    """
    for value, allowed, what in ((models, backbones.model_names(), "model"), (inits, INITS, "init")):
        unknown = sorted(set(value or ()) - set(allowed))
        if unknown:
            raise TableError(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(allowed)}")
    present = set(zip(df["model"], df["init"], df["recipe"]))
    pairs = {(model, init) for model, init, _ in present}
    if models or inits:
        models = models or {model for model, _ in pairs}
        pairs = {(m, i) for m, i in all_configurations() if m in models and i in (inits or INITS)}
    return [(m, i, r) for m, i in all_configurations() if (m, i) in pairs
            for r in _recipes_of(present, m, i, recipes)]


def _recipes_of(present: set[Config], model: str, init: str, recipes: Sequence[str] | None) -> list[str]:
    if init == "pretrained" and recipes:
        chosen = set(recipes) - {SCRATCH_RECIPE}
    else:
        chosen = {r for m, i, r in present if (m, i) == (model, init)} or {DEFAULT_RECIPES[init]}
    return sorted(chosen, key=recipe_order)


def recipe_order(name: str) -> tuple[int, str]:
    """The built-in recipes in `segbook recipes`' order (the paper's first), then the user's by name."""
    return (BUILTIN_ORDER.index(name) if name in BUILTIN_ORDER else len(BUILTIN_ORDER), name)


def shows_recipes(configs: Iterable[Config]) -> bool:
    """Whether a table must name recipes: only when one other than the defaults is shown."""
    return any(recipe != DEFAULT_RECIPES[init] for _, init, recipe in configs)


def dataset_facts(df: pd.DataFrame, configs: Sequence[Config]) -> pd.DataFrame:
    """One row of registry facts per dataset with any run (evaluated or not) of the shown configurations."""
    shown = df[pd.MultiIndex.from_arrays([df["model"], df["init"], df["recipe"]]).isin(list(configs))]
    return shown.drop_duplicates("task").sort_values("dataset_id").set_index("task")


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


def protocol_note(df: pd.DataFrame) -> list[str]:
    """Which folds and plans the local scores come from (the paper's protocol: fold all, the authors' v1 plans)."""
    local = df[(df["source"] == LOCAL) & df["evaluated"]]
    if local.empty:
        return []
    folds = sorted(set(local["fold"]), key=lambda fold: (fold != "all", fold))
    fold_text = "fold all (SegBook's protocol)" if folds == ["all"] else f"the mean of folds {', '.join(folds)}"
    splits = "one test split per dataset (its SHA-256: `--table datasets`, column split)"
    return [f"local runs: {fold_text}; plans {', '.join(sorted(set(local['plans'])))}; {splits}"]


# --- group tables ----------------------------------------------------------------------------------------------


def group_cell(lookup: ScoreLookup, members: list[Member], config: Config) -> Cell:
    values, missing = [], []
    for task, part in members:
        value = lookup[part].get((task, *config))
        if value is None:
            missing.append(task)
        else:
            values.append(value)
    mean = 100.0 * sum(values) / len(values) if values else None
    return Cell(mean, len(values), tuple(missing), marker=MISSING_MARK if missing and values else "")


def delta_cell(lookup: ScoreLookup, members: list[Member], config: Config, baseline: Config) -> Cell:
    """The paired mean of `config` minus `baseline` over the members that have both."""
    diffs, missing = [], []
    for task, part in members:
        score, base = lookup[part].get((task, *config)), lookup[part].get((task, *baseline))
        if score is None or base is None:
            missing.append(task)
        else:
            diffs.append(score - base)
    mean = 100.0 * sum(diffs) / len(diffs) if diffs else None
    return Cell(mean, len(diffs), tuple(missing), marker=MISSING_MARK if missing and diffs else "", signed=True)


def delta_pairs(configs: Sequence[Config]) -> list[tuple[Config, Config]]:
    """(pretrained, scratch) of each pretrained configuration whose network is also shown from scratch: the ones
    with a Delta(PT), one per recipe."""
    return [((model, init, recipe), (model, "scratch", SCRATCH_RECIPE)) for model, init, recipe in configs
            if init == "pretrained" and (model, "scratch", SCRATCH_RECIPE) in configs]


def group_table(df: pd.DataFrame, by: Grouping, metric: str = "dice", models: Sequence[str] | None = None,
                inits: Sequence[str] | None = None, recipes: Sequence[str] | None = None) -> ResultTable:
    """Rows per configuration (and a Delta(PT) row per pretrained one), a column per non-empty group."""
    configs = configurations(df, models, inits, recipes)
    facts = dataset_facts(df, configs)
    members = group_members(facts, by)
    lookup = score_lookup(df, metric, {part for tasks in members.values() for _, part in tasks})
    cost = by.name == "scale"
    named = ["recipe"] if shows_recipes(configs) else []
    table = ResultTable(by.name, f"{METRIC_NAMES[metric]} (%) {by.title}",
                        ["model", "init", *named, *(["params (M)", "TMACs", "TFLOPs"] if cost else []), *members],
                        display={"model": MODEL_NAMES})
    baselines = dict(delta_pairs(configs))
    shown = []
    for config in configs:
        model, init, recipe = config
        cells = [group_cell(lookup, tasks, config) for tasks in members.values()]
        table.rows.append([model, init, *([recipe] if named else []), *(_cost(model) if cost else []), *cells])
        shown.append((config, cells))
        if config in baselines:
            table.rows.append([model, DELTA, *([recipe] if named else []), *([None] * 3 if cost else []),
                               *(delta_cell(lookup, tasks, config, baselines[config]) for tasks in members.values())])
    table.notes = (_group_notes(table, members, by, metric) + _missing_notes(shown, lookup, list(facts.index),
                                                                              bool(named)) + protocol_note(df))
    return table


def _cost(model: str) -> list[float | None]:
    """Parameters (M), TMACs and TFLOPs of one 128^3 patch, as the registry catalogues them (no torch here)."""
    cost = backbones.cost(model)
    if cost is None:
        return [None, None, None]
    parameters, macs = cost
    return [round(parameters / 1e6, 1), round(macs / 1e12, 2), round(2 * macs / 1e12, 2)]


def _group_notes(table: ResultTable, members: dict[str, list[Member]], by: Grouping, metric: str) -> list[str]:
    if not members:
        return ["no datasets: no runs of the shown configurations"]
    notes = [f"cell: mean {METRIC_NAMES[metric]} (%) over the n datasets of the group that have the configuration"]
    if "TMACs" in table.columns:
        notes.append("params, TMACs (forward multiply-accumulates; the STU-Net paper's 'TFLOPs') and TFLOPs "
                     "(= 2 x TMACs) for one 128^3 patch; nnU-Net's network depends on each dataset's plans, "
                     "and ResEnc's are its reference architecture's (6 stages), which the plans adapt")
    if any(row[1] == DELTA for row in table.rows):
        per_recipe = ", per recipe (its pretrained runs minus scratch)" if "recipe" in table.columns else ""
        notes.append(f"{DELTA}: mean of (pretrained - scratch) over the datasets that have both, in points"
                     + per_recipe)
    empty = [group for group in by.groups if group not in members and group not in by.quiet]
    if empty:
        notes.append(f"no datasets: {', '.join(empty)}")
    return notes


def _missing_notes(shown: list[tuple[Config, list[Cell]]], lookup: ScoreLookup, order: list[str],
                   with_recipe: bool) -> list[str]:
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
    return [f"{MISSING_MARK} not every dataset of the group has this configuration: the cell averages those that "
            "do. Missing:", *lines]


def _names(tasks: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(tasks[:limit])
    return f"{shown} and {len(tasks) - limit} more ({len(tasks)} datasets)" if len(tasks) > limit else shown


def scale_table(df: pd.DataFrame, metric: str = "dice", models: Sequence[str] | None = None,
                inits: Sequence[str] | None = None, recipes: Sequence[str] | None = None) -> ResultTable:
    """The paper's main table: small / medium / large / average, with parameters and forward cost."""
    return group_table(df, grouping("scale"), metric, models, inits, recipes)


def modality_target_table(df: pd.DataFrame, metric: str = "dice", group_datasets: bool = False,
                          models: Sequence[str] | None = None, inits: Sequence[str] | None = None,
                          recipes: Sequence[str] | None = None) -> ResultTable:
    return group_table(df, grouping("modality-target", group_datasets), metric, models, inits, recipes)


def region_table(df: pd.DataFrame, metric: str = "dice", models: Sequence[str] | None = None,
                 inits: Sequence[str] | None = None, recipes: Sequence[str] | None = None) -> ResultTable:
    return group_table(df, grouping("region"), metric, models, inits, recipes)


# --- recipes ---------------------------------------------------------------------------------------------------


def recipe_configs(df: pd.DataFrame, models: Sequence[str] | None = None,
                   recipes: Sequence[str] | None = None) -> list[Config]:
    """The recipes table's pretrained configurations: each network with each recipe it was fine-tuned with, or
    those requested (`models`, `recipes`), present or not."""
    return [config for config in configurations(df, models, None, recipes) if config[1] == "pretrained"]


def recipe_baselines(config: Config, shown: Sequence[Config]) -> list[tuple[str, Config]]:
    """What a recipe is compared with: its network from scratch, and its network fine-tuned with the default
    recipe (when that is another and is `shown`)."""
    model, _, recipe = config
    default = (model, "pretrained", DEFAULT_RECIPE)
    return [(VS_SCRATCH, (model, "scratch", SCRATCH_RECIPE)),
            *([(VS_DEFAULT, default)] if recipe != DEFAULT_RECIPE and default in shown else [])]


def recipe_table(df: pd.DataFrame, metric: str = "dice", models: Sequence[str] | None = None,
                 recipes: Sequence[str] | None = None) -> ResultTable:
    """By dataset scale per recipe: per network its scratch row, then each recipe's row with its delta rows."""
    pretrained = recipe_configs(df, models, recipes)
    networks = list(dict.fromkeys(model for model, _, _ in pretrained))
    rows = [config for model in networks
            for config in [(model, "scratch", SCRATCH_RECIPE), *(c for c in pretrained if c[0] == model)]]
    by = grouping("scale")
    facts = dataset_facts(df, rows)
    members = group_members(facts, by)
    lookup = score_lookup(df, metric, ())
    table = ResultTable("recipes", f"{METRIC_NAMES[metric]} (%) by dataset scale per fine-tuning recipe",
                        ["model", "init", "recipe", *members], display={"model": MODEL_NAMES})
    shown = []
    for config in rows:
        cells = [group_cell(lookup, tasks, config) for tasks in members.values()]
        table.rows.append([*config, *cells])
        shown.append((config, cells))
        for label, baseline in recipe_baselines(config, pretrained) if config[1] == "pretrained" else []:
            table.rows.append([config[0], label, config[2],
                               *(delta_cell(lookup, tasks, config, baseline) for tasks in members.values())])
    table.notes = (_group_notes(table, members, by, metric) + _recipe_notes(table, pretrained)
                   + _missing_notes(shown, lookup, list(facts.index), True) + protocol_note(df))
    return table


def _recipe_notes(table: ResultTable, pretrained: Sequence[Config]) -> list[str]:
    if not table.rows:
        return []
    notes = [f"{VS_SCRATCH}: mean of (recipe - scratch of the same network) over the datasets that have both, in "
             "points"]
    if any(row[1] == VS_DEFAULT for row in table.rows):
        notes.append(f"{VS_DEFAULT}: mean of (recipe - the {DEFAULT_RECIPE} recipe of the same network) over the "
                     "datasets that have both, in points")
    elif all(recipe != DEFAULT_RECIPE for _, _, recipe in pretrained):
        notes.append(f"no {VS_DEFAULT} rows: the {DEFAULT_RECIPE} recipe is not shown (add it to --recipes)")
    return notes


# --- per dataset -----------------------------------------------------------------------------------------------


def config_label(config: Config, with_recipe: bool = False) -> str:
    """`large pretrained`, or with the recipe `large pretrained llrd` (scratch's recipe goes without saying)."""
    model, init, recipe = config
    return " ".join([model, init, *([recipe] if with_recipe and recipe != SCRATCH_RECIPE else [])])


def delta_label(config: Config, with_recipe: bool = False) -> str:
    model, _, recipe = config
    return f"{model} {recipe} delta" if with_recipe else f"{model} delta"


def dataset_table(df: pd.DataFrame, metric: str = "dice", models: Sequence[str] | None = None,
                  inits: Sequence[str] | None = None, recipes: Sequence[str] | None = None) -> ResultTable:
    """A row per dataset, every configuration side by side, a Delta(PT) per pretrained configuration, and the
    sources used."""
    configs = configurations(df, models, inits, recipes)
    facts = dataset_facts(df, configs)
    scores = dataset_scores(df, metric)
    scores = dict(zip(zip(*(scores[key] for key in SCORE_KEYS)),
                      zip(scores["score"], scores["folds"], scores["source"])))
    pending = _pending(df, metric)
    pairs = delta_pairs(configs)
    named = shows_recipes(configs)
    splits = _splits(df)
    table = ResultTable("datasets", f"{METRIC_NAMES[metric]} (%) per dataset",
                        ["task", "modality", "target", "scale", *(config_label(c, named) for c in configs),
                         *(delta_label(config, named) for config, _ in pairs), "source", "split"],
                        count_label="folds", detail_label="status", show_count=False,
                        display={"split": {sha: sha[:12] for sha in splits.values()}})
    for task, modality, target, scale in zip(facts.index, facts["modality"], facts["target"], facts["scale"]):
        cells = {config: _dataset_cell(scores, pending, (task, *config)) for config in configs}
        sources = sorted({cell.source for cell in cells.values() if cell.source}, key=lambda s: (s != LOCAL, s))
        table.rows.append([task, modality, target, scale, *cells.values(),
                           *(_dataset_delta(cells[config], cells[baseline]) for config, baseline in pairs),
                           ", ".join(sources) or "-", splits.get(task)])
    table.notes = _dataset_notes(table, metric) + protocol_note(df)
    return table


def _splits(df: pd.DataFrame) -> dict[str, str]:
    """Each dataset's test split (SHA-256) as its evaluated runs recorded it (`check_comparable`: one)."""
    local = df[run_folders(df) & df["evaluated"] & df["split"].notna()]
    return dict(zip(local["task"], local["split"]))


def _pending(df: pd.DataFrame, metric: str) -> dict[tuple[str, str, str, str], list[tuple[str, str]]]:
    """(task, model, init, recipe) -> (which run, why) for each run or imported result without a score."""
    pending: dict[tuple[str, str, str, str], list[tuple[str, str]]] = {}
    waiting = df[~df["evaluated"] | df[metric].isna()]
    for row in waiting.itertuples():
        which = f"fold {row.fold}" if row.source == LOCAL else row.source
        why = f"no {METRIC_NAMES[metric]}" if row.evaluated else row.status
        pending.setdefault((row.task, row.model, row.init, row.recipe), []).append((which, why))
    return pending


def _dataset_cell(scores: dict, pending: dict, key: tuple[str, str, str, str]) -> Cell:
    waiting = pending.get(key, [])
    folds = "; ".join(f"{which}: {why}" for which, why in waiting)
    if key not in scores:
        statuses = {status for _, status in waiting}
        return Cell(None, 0, status=statuses.pop() if len(statuses) == 1 else folds or "missing")
    score, count, source = scores[key]
    return Cell(100.0 * score, int(count), status=folds, marker=PARTIAL_MARK if waiting else "", source=source)


def _dataset_delta(pretrained: Cell, scratch: Cell) -> Cell:
    if pretrained.value is None or scratch.value is None:
        return Cell(None, 0, status="-")
    return Cell(pretrained.value - scratch.value, 1, signed=True)


def _dataset_notes(table: ResultTable, metric: str) -> list[str]:
    if not table.rows:
        return ["no datasets: no runs of the shown configurations"]
    notes = [f"cell: mean {METRIC_NAMES[metric]} (%) over the dataset's evaluated folds; 'missing': no run; "
             "otherwise the status of its runs"]
    partial = [f"  {row[0]} {column}: {cell.status}" for row in table.rows
               for column, cell in zip(table.columns, row) if isinstance(cell, Cell) and cell.marker]
    if partial:
        notes += [f"{PARTIAL_MARK} averages the evaluated folds only; not evaluated yet:", *partial]
    if any(IMPORTED_PREFIX in str(row[-2]) for row in table.rows):
        notes.append("source imported:NAME: numbers imported from $SEGBOOK_HOME/results/imported/NAME.csv "
                     "(local runs take precedence); published numbers come with their authors' plans and split")
    return notes


def build_table(df: pd.DataFrame, name: str, metric: str = "dice", group_datasets: bool = False,
                models: Sequence[str] | None = None, inits: Sequence[str] | None = None,
                recipes: Sequence[str] | None = None) -> ResultTable:
    """Any of TABLES by name: what `segbook results --table NAME` prints."""
    if name == "datasets":
        return dataset_table(df, metric, models, inits, recipes)
    if name == "recipes":
        if inits:
            raise TableError("the recipes table compares each recipe's pretrained runs with scratch: --init does "
                             "not apply to it")
        return recipe_table(df, metric, models, recipes)
    if name not in TABLES:
        raise TableError(f"unknown table {name!r}; choose one of {', '.join(TABLES)}")
    return group_table(df, grouping(name, group_datasets), metric, models, inits, recipes)
