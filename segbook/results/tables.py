"""The benchmark's tables: scores by dataset scale, by modality x target, by region, and per dataset.

Definitions (docs/results.md): a run's score is the mean over labels of the per-label mean over test cases; a
dataset's score for a configuration is the mean over its evaluated folds; a group's score is the mean over its
datasets that have the configuration, shown with how many that is. Datasets without the configuration are listed
as missing and mark the cell, never averaged in. Delta(PT) is the paired mean of pretrained minus scratch over the
datasets of the group that have both.

A configuration is (model, initialisation, recipe, variant): two recipes of one network are never averaged into one
cell, nor two variants, the runs of one recipe with different training fingerprints (`segbook.results.cells`: a
variant is "" where all share one). Seeds are averaged: a dataset's score is the mean over seeds of each seed's mean
over folds, shown with the standard deviation across seeds where there is more than one. Training fractions are an
axis of their own: every table shows the runs on the whole train split (fraction 1) except `fraction_table`, which
shows them all.
For HD95 (a distance in mm) lower is better: scores are in mm, and every Delta is scratch minus pretrained, so that
a positive Delta always means pretraining helps.
Tables name the recipe only when a recipe other than the defaults (segbook, scratch) is shown, and the variant only
when one is, so the paper's tables look as they always did. Two configurations are compared (Delta(PT), the recipes'
deltas, statistics) only where their shared training settings match (`delta_pairs`) and, per dataset, where their
runs' data and evaluation settings and test split agree (`ScoreLookup.pair`). Every table's notes say which folds
and plans it shows, and which runs were left out and why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import pandas as pd

from segbook.errors import SegbookError
from segbook.registry import REGIONS, SCALES
from segbook.recipes import BUILTIN_ORDER
from segbook import backbones, fingerprint
from segbook.results.cells import CELL_KEYS, left_out_notes
from segbook.results.collect import IMPORTED_PREFIX, LOCAL, LOWER_IS_BETTER, METRICS, default_plans, run_folders
from segbook.results.excluded import exclusion_notes
from segbook.runs import DEFAULT_FRACTION, DEFAULT_SEED, INITS, default_recipe


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


DELTA = "Delta(PT)"
#: SegBook's recipes (`segbook.backbones.STUDY_RECIPES`), which the recipes table's rows are compared with.
DEFAULT_RECIPE = backbones.STUDY_RECIPES["pretrained"]
SCRATCH_RECIPE = backbones.STUDY_RECIPES["scratch"]
#: The recipes table's delta rows: a recipe minus scratch, and minus the default recipe, of the same model.
VS_SCRATCH = "Delta vs scratch"
VS_DEFAULT = f"Delta vs {DEFAULT_RECIPE}"
DELTA_ROWS = (DELTA, VS_SCRATCH, VS_DEFAULT)
MISSING_MARK = "*"  # a group cell that some datasets of the group lack
PARTIAL_MARK = "\u2020"  # a dataset cell averaging only some of the folds that were started (a dagger)
NOISE_MARK = "~"  # a dataset's Delta(PT) no larger than its seed noise
AVERAGE = "average"
METRIC_NAMES = {"dice": "Dice", "nsd": "NSD", "iou": "IoU", "precision": "Precision", "recall": "Recall",
                "hd95": "HD95"}
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
TABLES = ("scale", "modality-target", "region", "datasets", "recipes", "fractions")
Config = tuple[str, str, str, str]  # (model, init, recipe, variant)
Member = tuple[str, str | None]  # (task, part): part None scores the whole dataset
ScoreKey = tuple[str, str, str, str, str]  # (task, *Config)
#: What identifies a configuration, and a dataset score: the dataset and the configuration.
CONFIG_KEYS = ["model", "init", "recipe", "variant"]
SCORE_KEYS = ["task", *CONFIG_KEYS]
#: (task, *config) -> {seed: that seed's dataset score}, per part as in ScoreLookup.
SeedLookup = dict[str | None, dict[ScoreKey, dict[int, float]]]
#: The training settings two configurations compared with each other must share (fingerprint.SHARED) and the
#: source their runs are kept apart by.
SHARED_KEYS = (*fingerprint.SHARED, "source")
#: Those every configuration has (not the checkpoint of pretrained ones): configurations ranked or tested against
#: each other share them (`comparability_classes`).
COMMON_KEYS = tuple(key for key in SHARED_KEYS if key not in ("weights", "stem_tiling"))
LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 PARTIAL_MARK: r"$^\dagger$"}


class TableError(SegbookError):
    """A table request that cannot be met (unknown metric, model or grouping)."""


class ScoreLookup(dict):
    """Per part and the whole dataset (None): (task, *config) -> dataset score (as stored); `basis`: (task, *config)
    -> the basis of its runs (data and evaluation settings and test split, `segbook.results.cells`) and `settings`
    its readable values. Two configurations of a dataset are compared only where their bases agree (`pair`)."""

    def __init__(self, scores: dict[str | None, dict[ScoreKey, float]] | None = None,
                 basis: dict[ScoreKey, str] | None = None, settings: dict[ScoreKey, dict] | None = None):
        super().__init__(scores or {})
        self.basis = basis or {}
        self.settings = settings or {}

    def pair(self, part: str | None, task: str, config: Config, baseline: Config) -> tuple[float, float] | None:
        """(score, baseline's score) of a dataset (part) where both have one and their bases agree."""
        score, base = self[part].get((task, *config)), self[part].get((task, *baseline))
        if score is None or base is None or self.basis.get((task, *config)) != self.basis.get((task, *baseline)):
            return None
        return score, base

    def mismatch(self, task: str, config: Config, baseline: Config) -> str | None:
        """How the runs of two configurations of a dataset differ in data or evaluation settings or test split; None
        when they agree (or one has no runs)."""
        mine, theirs = (self.settings.get((task, *c)) for c in (config, baseline))
        if mine is None or theirs is None or self.basis[(task, *config)] == self.basis[(task, *baseline)]:
            return None
        return "; ".join(fingerprint.differences(mine, theirs))


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
    #: The standard deviation across seeds (same unit as `value`), where more than one seed was run.
    spread: float | None = None
    #: How many seeds a dataset cell averages (its `count` being the folds each seed averages).
    seeds: int | None = None

    def number(self) -> float | None:
        return None if self.value is None else round(self.value, 4)

    def text(self, show_count: bool = True) -> str:
        if self.value is None:
            return (self.status or "missing") + self.marker
        number = f"{self.value + 0.0:+.2f}" if self.signed else f"{self.value:.2f}"  # + 0.0: no -0.00
        spread = "" if self.spread is None else f" \u00b1{self.spread:.2f}"
        return number + spread + (f" (n={self.count})" if show_count else "") + self.marker

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
        """Rows for `segbook.cli.output.emit`: formatted cells in text formats, numbers plus counts in csv/json
        (and, where any cell has one, the standard deviation across seeds)."""
        machine = fmt in ("csv", "json")
        cells = [value for row in self.rows for value in row if isinstance(value, Cell)]
        spread = any(cell.spread is not None for cell in cells)
        seeds = any((cell.seeds or 0) > 1 for cell in cells)
        records = [dict(self._record(row, machine, spread, seeds)) for row in self.rows]
        return [{_latex(k): _latex(v) for k, v in r.items()} for r in records] if fmt == "latex" else records

    def _record(self, row: list[Any], machine: bool, spread: bool, seeds: bool) -> Iterable[tuple[str, Any]]:
        for column, value in zip(self.columns, row):
            if isinstance(value, Cell) and machine:
                yield column, value.number()
                yield f"{column} {self.count_label}", value.count
                yield f"{column} {self.detail_label}", value.detail()
                if spread:
                    yield f"{column} seed sd", None if value.spread is None else round(value.spread, 4)
                if seeds:
                    yield f"{column} seeds", value.seeds
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


def metric_label(metric: str) -> str:
    """The metric with its unit, as table titles and axes name it: `Dice (%)`, `HD95 (mm, lower is better)`."""
    unit = "mm, lower is better" if metric in LOWER_IS_BETTER else "%"
    return f"{METRIC_NAMES[metric]} ({unit})"


def metric_factor(metric: str) -> float:
    """Stored scores are fractions, shown in percent; distances are stored and shown in mm."""
    return 1.0 if metric in LOWER_IS_BETTER else 100.0


def metric_sign(metric: str) -> float:
    """+1, or -1 where lower is better: every Delta is multiplied by it, so positive always means better."""
    return -1.0 if metric in LOWER_IS_BETTER else 1.0


def delta_unit(metric: str) -> str:
    return "mm" if metric in LOWER_IS_BETTER else "points"


def delta_convention(metric: str) -> str:
    """How a Delta of `metric` reads, for notes: HD95's is reversed."""
    if metric in LOWER_IS_BETTER:
        return (f"{METRIC_NAMES[metric]}: lower is better, so Delta is scratch - pretrained in mm: positive means "
                "pretraining helps")
    return ""


def whole_split(df: pd.DataFrame) -> pd.DataFrame:
    """The runs trained on the whole train split: what every table but the fractions table shows."""
    return df[df["fraction"] == DEFAULT_FRACTION]


def check_comparable(df: pd.DataFrame) -> None:
    """`TableError` naming the runs when the evaluated local (or bundled) runs of one dataset were trained with
    different plans, or when the evaluated runs of one configuration differ in training fingerprint, or those of one
    cell of a dataset in data or evaluation settings or test split: their scores would be averaged or compared as
    if they measured the same thing. `collect_results` never gives such a frame (`segbook.results.cells` keeps
    them apart); one put together by hand can. Each backbone's own default plans count as the same choice (ResEnc
    trains on nnU-Net's ResEnc plans, STU-Net on nnUNetPlans, as nnU-Net's own comparisons do)."""
    evaluated = df[df["evaluated"]]
    local = evaluated[run_folders(evaluated)]
    local = local.assign(plans_choice=[
        "each backbone's default" if plans == default_plans(model) else plans
        for plans, model in zip(local["plans"], local["model"])])
    named = evaluated["path"].where(evaluated["source"] == LOCAL, evaluated["source"] + " " + evaluated["path"])
    for frame, column, shown, keys, what, fix in (
            (local, "plans_choice", "plans", ["task"], "plans", "tabulate one plans at a time (--plans)"),
            (evaluated, "fingerprint", "fingerprint", CONFIG_KEYS, "training settings",
             "collect them with collect_results, which keeps them apart as variants"),
            (evaluated, "basis", "basis", CELL_KEYS, "data or evaluation settings or test splits",
             "collect them with collect_results, which leaves them out")):
        counts = frame.groupby(keys, sort=False)[column].nunique()
        for key in counts[counts > 1].index:
            key = key if isinstance(key, tuple) else (key,)
            runs = frame[(frame[keys] == pd.Series(key, index=keys)).all(axis=1)]
            listing = "; ".join(f"{value}: {', '.join(named[runs.index[runs[shown] == value]])}"
                                for value in sorted(runs[shown].unique()))
            where = " ".join(str(part) for part in key if part)
            raise TableError(f"{where}: runs with different {what} are never averaged or compared ({listing}); "
                             f"{fix}")


def seed_scores(df: pd.DataFrame, metric: str = "dice", part: str | None = None,
                fraction: float = DEFAULT_FRACTION, checked: bool = False) -> pd.DataFrame:
    """Per (task, model, init, recipe, variant, seed) at one training fraction: the mean over evaluated folds, the
    number of folds averaged (`folds`), the source, and the basis of its runs (`basis`, `basis_settings`).

    Local runs take precedence over imported numbers for the same configuration of a dataset. Runs of one dataset
    with different plans are refused (`check_comparable`; `checked`: the caller did it on `df`).
    """
    if not checked:
        check_comparable(df)
    column = score_column(metric, part)
    scored = df.loc[df["evaluated"] & df[column].notna() & (df["fraction"] == fraction),
                    [*SCORE_KEYS, "seed", "fold", "source", "basis", "basis_settings", column]]
    grouped = counted_runs(scored).groupby([*SCORE_KEYS, "seed"], sort=False)
    return grouped.agg(score=(column, "mean"), folds=("fold", "nunique"), source=("source", "first"),
                       basis=("basis", "first"), basis_settings=("basis_settings", "first")).reset_index()


def counted_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The rows of `runs` (evaluated, of one fraction) that a dataset's score counts: a configuration's local runs
    where it has any, else those of the one imported source that gives it (two are a `TableError`)."""
    local = runs[runs["source"] == LOCAL]
    imported = runs[runs["source"] != LOCAL]
    imported = imported[~imported.set_index(SCORE_KEYS).index.isin(local.set_index(SCORE_KEYS).index)]
    _check_single_import(imported)
    return pd.concat([local, imported])


def dataset_scores(df: pd.DataFrame, metric: str = "dice", part: str | None = None,
                   fraction: float = DEFAULT_FRACTION) -> pd.DataFrame:
    """Per (task, model, init, recipe, variant) at one training fraction: the mean over seeds of each seed's mean
    over folds (`score`), the standard deviation across seeds (`seed_sd`, NaN with one seed), the number of seeds
    and of folds each averages (`folds`), the source and the basis. See `seed_scores` for which runs count."""
    return _over_seeds(seed_scores(df, metric, part, fraction))


def _over_seeds(per_seed: pd.DataFrame) -> pd.DataFrame:
    grouped = per_seed.groupby(SCORE_KEYS, sort=False)
    return grouped.agg(score=("score", "mean"), seed_sd=("score", "std"), seeds=("seed", "size"),
                       folds=("folds", "max"), source=("source", "first"), basis=("basis", "first"),
                       basis_settings=("basis_settings", "first")).reset_index()


def _check_single_import(imported: pd.DataFrame) -> None:
    counts = imported.groupby(SCORE_KEYS)["source"].nunique()
    clashes = counts[counts > 1]
    if len(clashes):
        task, model, init, _, _ = clashes.index[0]
        sources = sorted(set(imported.set_index(SCORE_KEYS).loc[[clashes.index[0]], "source"]))
        raise TableError(f"{task} {model} {init} is given by more than one imported source ({', '.join(sources)}); "
                         "remove one from $SEGBOOK_HOME/results/")


def score_lookups(df: pd.DataFrame, metric: str, parts: Iterable[str | None],
                  fraction: float = DEFAULT_FRACTION) -> tuple[ScoreLookup, SeedLookup | None]:
    """The dataset scores of each part and the whole dataset (None) as a `ScoreLookup`, and (task, *config) ->
    {seed: that seed's score} for the spread of group cells (None when no dataset score averages more than one seed:
    nothing to spread)."""
    check_comparable(df)
    lookup = ScoreLookup()
    seeds: SeedLookup = {}
    for part in [None, *(p for p in dict.fromkeys(parts) if p is not None)]:
        per_seed = seed_scores(df, metric, part, fraction, checked=True)
        scores = _over_seeds(per_seed)
        keys = list(zip(*(scores[key] for key in SCORE_KEYS)))
        lookup[part] = dict(zip(keys, scores["score"]))
        if part is None:
            lookup.basis, lookup.settings = dict(zip(keys, scores["basis"])), dict(zip(keys, scores["basis_settings"]))
        by_key: dict[ScoreKey, dict[int, float]] = {}
        for *key, seed, score in zip(*(per_seed[k] for k in SCORE_KEYS), per_seed["seed"], per_seed["score"]):
            by_key.setdefault(tuple(key), {})[int(seed)] = score
        seeds[part] = by_key
    seeded = any(len(runs) > 1 for runs in seeds[None].values())
    return lookup, seeds if seeded else None


def score_lookup(df: pd.DataFrame, metric: str, parts: Iterable[str | None],
                 fraction: float = DEFAULT_FRACTION) -> ScoreLookup:
    """The dataset scores of each part and the whole dataset (None) as a `ScoreLookup`."""
    return score_lookups(df, metric, parts, fraction)[0]


def group_spread(seeds: SeedLookup | None, members: list[Member], config: Config) -> float | None:
    """The standard deviation across seeds of the group's mean: per seed that every member with the configuration
    ran, the mean over those members; None with fewer than two such seeds."""
    import numpy as np

    if seeds is None:
        return None
    runs = [seeds[part][(task, *config)] for task, part in members if (task, *config) in seeds[part]]
    common = set.intersection(*(set(run) for run in runs)) if runs else set()
    if len(common) < 2:
        return None
    return float(np.std([np.mean([run[seed] for run in runs]) for seed in sorted(common)], ddof=1))


# --- configurations, datasets and groups -----------------------------------------------------------------------


def configurations(df: pd.DataFrame, models: Sequence[str] | None = None, inits: Sequence[str] | None = None,
                   recipes: Sequence[str] | None = None) -> list[Config]:
    """The paper's configurations present in `df`, or those requested, present or not.

    `models` alone asks for both initialisations of each; `inits` alone, that initialisation of the models present.
    A pretrained network shows with each of `recipes` (the pretrained runs' recipes), or when none are given with
    each recipe it has in `df` (the default one if none); a scratch network with each recipe it has (`scratch`).
    Each (model, init, recipe) shows with each of its variants in `df` ("" first), or "" when it has none.
    """
    for value, allowed, what in ((models, backbones.model_names(), "model"), (inits, INITS, "init")):
        unknown = sorted(set(value or ()) - set(allowed))
        if unknown:
            raise TableError(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(allowed)}")
    present = set(zip(*(df[key] for key in CONFIG_KEYS)))
    pairs = {(model, init) for model, init, _, _ in present}
    if models or inits:
        models = models or {model for model, _ in pairs}
        pairs = {(m, i) for m, i in backbones.table_configurations() if m in models and i in (inits or INITS)}
    return [(m, i, r, v) for m, i in backbones.table_configurations() if (m, i) in pairs
            for r in _recipes_of(present, m, i, recipes)
            for v in sorted({v for *c, v in present if tuple(c) == (m, i, r)} or {""}, key=lambda v: (v != "", v))]


def _recipes_of(present: set[Config], model: str, init: str, recipes: Sequence[str] | None) -> list[str]:
    if init == "pretrained" and recipes:
        chosen = set(recipes) - {SCRATCH_RECIPE}
    else:
        chosen = {r for m, i, r, _ in present if (m, i) == (model, init)} or {default_recipe(model, init)}
    return sorted(chosen, key=recipe_order)


def recipe_order(name: str) -> tuple[int, str]:
    """The built-in recipes in `segbook recipes`' order (the paper's first), then the user's by name."""
    return (BUILTIN_ORDER.index(name) if name in BUILTIN_ORDER else len(BUILTIN_ORDER), name)


def shows_recipes(configs: Iterable[Config]) -> bool:
    """Whether a table must name recipes: only when one other than the defaults is shown."""
    return any(recipe != default_recipe(model, init) for model, init, recipe, _ in configs)


def shows_variants(configs: Iterable[Config]) -> bool:
    """Whether a table must name variants: only when a configuration has more than one (or is kept apart)."""
    return any(variant for *_, variant in configs)


def dataset_facts(df: pd.DataFrame, configs: Sequence[Config]) -> pd.DataFrame:
    """One row of registry facts per dataset with any run (evaluated or not) of the shown configurations."""
    shown = df[pd.MultiIndex.from_arrays([df[key] for key in CONFIG_KEYS]).isin(list(configs))]
    return shown.drop_duplicates("task").sort_values("dataset_id").set_index("task")


def variant_profiles(df: pd.DataFrame) -> dict[Config, dict[str, Any]]:
    """Each configuration's training settings (`segbook.fingerprint`, one per configuration: its evaluated runs',
    else any run's) with the source its runs are kept apart by, for pairing configurations (`comparable`)."""
    rows = df.sort_values("evaluated", ascending=False, kind="stable").drop_duplicates(CONFIG_KEYS)
    return {tuple(key): {**settings, "source": apart or "this store"} for *key, settings, apart in
            zip(*(rows[k] for k in CONFIG_KEYS), rows["settings"], rows["apart"])}


def shared_differences(config: Config, versus: Config, profiles: Mapping[Config, dict[str, Any]]) -> list[str]:
    """How two configurations differ in the training settings they must share to be compared (SHARED_KEYS: budget,
    precision, plans, ..., the source they are kept apart by): [] when comparable. Configurations without runs
    compare as their variants do (both "": comparable)."""
    mine, theirs = profiles.get(config), profiles.get(versus)
    if mine is None or theirs is None:
        return [] if config[3] == versus[3] == "" else [f"variant {config[3] or '-'} vs {versus[3] or '-'}"]
    return fingerprint.differences(mine, theirs, SHARED_KEYS)


def comparability_classes(configs: Sequence[Config],
                          profiles: Mapping[Config, dict[str, Any]]) -> dict[str, list[Config]]:
    """The configurations grouped by their settings of COMMON_KEYS (budget, precision, plans, source), each group
    labelled by the settings that tell the groups apart ("" when there is one): the configurations ranked or
    tested against each other. A configuration without runs joins every group."""
    common = {config: {key: profiles[config].get(key, fingerprint.DEFAULTS.get(key, "n/a")) for key in COMMON_KEYS}
              for config in configs if config in profiles}
    keys = {config: fingerprint.digest(values) for config, values in common.items()}
    labels = fingerprint.distinct_labels({key: common[config] for config, key in keys.items()}) \
        if len(set(keys.values())) > 1 else dict.fromkeys(keys.values(), "")
    return {label: [c for c in configs if c not in keys or labels[keys[c]] == label]
            for label in dict.fromkeys(labels[key] for key in keys.values()) or [""]}


def comparable(config: Config, candidates: Iterable[Config], profiles: Mapping[Config, dict[str, Any]]
               ) -> Config | None:
    """The one of `candidates` that `config` is compared with: the one whose shared settings match; None when none
    does, or several do (which would be a guess)."""
    matches = [c for c in candidates if not shared_differences(config, c, profiles)]
    return matches[0] if len(matches) == 1 else None


def unpaired_note(config: Config, candidates: Sequence[Config], profiles: Mapping[Config, dict[str, Any]],
                  what: str, named: bool) -> str | None:
    """Why `config` has no `what` (Delta) against any of `candidates`: each one's differing shared settings, or the
    several that match; None when it has one, or there is no candidate."""
    if not candidates or comparable(config, candidates, profiles) is not None:
        return None
    matching = [c for c in candidates if not shared_differences(config, c, profiles)]
    if matching:
        why = f"several match ({', '.join(config_label(c, named) for c in matching)})"
    else:
        why = "; ".join(f"{config_label(c, named)}: {', '.join(shared_differences(config, c, profiles))}"
                        for c in candidates)
    return f"no {what} for {config_label(config, named)}: {why}"


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
    """The runs left out and why (`cells.left_out_notes`), which folds and plans the local scores come from (the
    paper's protocol: fold all, the authors' v1 plans), and where the runs on part of the train split are shown."""
    left_out = left_out_notes(df)
    local = df[(df["source"] == LOCAL) & df["evaluated"]]
    if local.empty:
        return left_out
    partial = int((local["fraction"] != DEFAULT_FRACTION).sum())
    if len(local) == partial:
        return [*left_out, f"{partial} evaluated run(s), all on part of the train split: see --table fractions"]
    fractions = ([f"{partial} run(s) on part of the train split are not in this table: see --table fractions"]
                 if partial else [])
    local = local[local["fraction"] == DEFAULT_FRACTION]
    folds = sorted(set(local["fold"]), key=lambda fold: (fold != "all", fold))
    fold_text = "fold all (SegBook's protocol)" if folds == ["all"] else f"the mean of folds {', '.join(folds)}"
    splits = "one test split per dataset (its SHA-256: `--table datasets`, column split)"
    return [*left_out, f"local runs: {fold_text}; plans {', '.join(sorted(set(local['plans'])))}; {splits}",
            *fractions]


# --- group tables ----------------------------------------------------------------------------------------------


def group_cell(lookup: ScoreLookup, members: list[Member], config: Config, metric: str = "dice",
               seeds: SeedLookup | None = None) -> Cell:
    factor = metric_factor(metric)
    values, missing = [], []
    for task, part in members:
        value = lookup[part].get((task, *config))
        if value is None:
            missing.append(task)
        else:
            values.append(value)
    mean = factor * sum(values) / len(values) if values else None
    spread = group_spread(seeds, members, config)
    return Cell(mean, len(values), tuple(missing), marker=MISSING_MARK if missing and values else "",
                spread=None if spread is None else factor * spread)


def delta_cell(lookup: ScoreLookup, members: list[Member], config: Config, baseline: Config,
               metric: str = "dice") -> Cell:
    """The paired mean of `config` minus `baseline` over the members that have both (reversed where lower is
    better)."""
    factor = metric_sign(metric) * metric_factor(metric)
    diffs, missing = [], []
    for task, part in members:
        pair = lookup.pair(part, task, config, baseline)
        if pair is None:
            missing.append(task)
        else:
            diffs.append(pair[0] - pair[1])
    mean = factor * sum(diffs) / len(diffs) if diffs else None
    return Cell(mean, len(diffs), tuple(missing), marker=MISSING_MARK if missing and diffs else "", signed=True)


def scratch_candidates(config: Config, configs: Sequence[Config]) -> list[Config]:
    """The shown scratch configurations (each variant) of `config`'s network: what its Delta(PT) may be against."""
    return [c for c in configs if c[:3] == (config[0], "scratch", default_recipe(config[0], "scratch"))]


def delta_pairs(configs: Sequence[Config], profiles: Mapping[Config, dict[str, Any]]) -> list[tuple[Config, Config]]:
    """(pretrained, scratch) of each pretrained configuration (each recipe and variant) whose network is also shown
    from scratch with matching shared settings (`comparable`): the ones with a Delta(PT)."""
    pairs = [(config, comparable(config, scratch_candidates(config, configs), profiles))
             for config in configs if config[1] == "pretrained"]
    return [(config, baseline) for config, baseline in pairs if baseline is not None]


def pairing_notes(configs: Sequence[Config], profiles: Mapping[Config, dict[str, Any]],
                  lookup: ScoreLookup | None = None, named: bool = False) -> list[str]:
    """Why a pretrained configuration has no Delta(PT) (no scratch variant with its shared settings), and, with
    `lookup`, the datasets its Delta(PT) leaves out because the two configurations' runs differ there in data or
    evaluation settings or test split."""
    notes = [note for config in configs if config[1] == "pretrained"
             for note in [unpaired_note(config, scratch_candidates(config, configs), profiles, DELTA, named)] if note]
    notes += [f"{DELTA} of {config_label(config, named)}: against {config_label(baseline, named)}, the scratch "
              "variant with its budget, precision and plans" for config, baseline in delta_pairs(configs, profiles)
              if baseline[3] and len(scratch_candidates(config, configs)) > 1]
    if lookup is not None:
        tasks = sorted({task for task, *_ in lookup.basis})
        differing = [f"  {task} {config_label(config, named)} vs {config_label(baseline, named)}: {how}"
                     for config, baseline in delta_pairs(configs, profiles) for task in tasks
                     for how in [lookup.mismatch(task, config, baseline)] if how]
        if differing:
            notes += [f"{DELTA} leaves out the datasets where the two configurations' runs differ in data or "
                      "evaluation settings or test split:", *differing]
    return notes


def group_table(df: pd.DataFrame, by: Grouping, metric: str = "dice", models: Sequence[str] | None = None,
                inits: Sequence[str] | None = None, recipes: Sequence[str] | None = None) -> ResultTable:
    """Rows per configuration (and a Delta(PT) row per pretrained one), a column per non-empty group; runs on the
    whole train split, seeds averaged."""
    runs, df = df, whole_split(df)
    configs = configurations(df, models, inits, recipes)
    facts = dataset_facts(df, configs)
    members = group_members(facts, by)
    parts = {part for tasks in members.values() for _, part in tasks}
    lookup, seeds = score_lookups(df, metric, parts)
    cost = by.name == "scale"
    named = shows_recipes(configs)
    axes = _axes(configs)
    table = ResultTable(by.name, f"{metric_label(metric)} {by.title}",
                        ["model", "init", *axes, *(["params (M)", "TMACs", "TFLOPs"] if cost else []), *members],
                        display={"model": MODEL_NAMES})
    profiles = variant_profiles(runs)
    baselines = dict(delta_pairs(configs, profiles))
    shown = []
    for config in configs:
        model, init = config[:2]
        cells = [group_cell(lookup, tasks, config, metric, seeds) for tasks in members.values()]
        table.rows.append([model, init, *_axis_values(config, axes), *(_cost(model) if cost else []), *cells])
        shown.append((config, cells))
        if config in baselines:
            table.rows.append([model, DELTA, *_axis_values(config, axes), *([None] * 3 if cost else []),
                               *(delta_cell(lookup, tasks, config, baselines[config], metric)
                                 for tasks in members.values())])
    table.notes = (_group_notes(table, members, by, metric) + _missing_notes(shown, lookup, list(facts.index), named)
                   + pairing_notes(configs, profiles, lookup, named)
                   + seed_notes(df, metric, list(baselines.items()), seeds is not None, named) + protocol_note(runs))
    table.notes += exclusion_notes(df, metric, configs, METRIC_NAMES[metric])
    return table


def _axes(configs: Sequence[Config]) -> list[str]:
    """The columns naming a configuration beyond model and init: `recipe` and `variant`, where one is shown."""
    return [*(["recipe"] if shows_recipes(configs) else []), *(["variant"] if shows_variants(configs) else [])]


def _axis_values(config: Config, axes: Sequence[str]) -> list[str]:
    return [config[2] if axis == "recipe" else config[3] for axis in axes]


def seed_noise(df: pd.DataFrame, metric: str, config: Config, baseline: Config,
               scores: pd.DataFrame | None = None) -> pd.DataFrame:
    """The seed-noise diagnostic of `config` against `baseline`, per dataset with both (whole train split, whole
    dataset): `delta` (points, or mm reversed), `noise` (the larger of the two configurations' standard deviations
    across seeds; NaN where neither ran more than one seed) and `within_noise` (|delta| <= noise; None without a
    noise). `scores`: `dataset_scores` of `df`, when the caller has them."""
    scores = dataset_scores(whole_split(df), metric) if scores is None else scores
    keyed = scores.set_index(CONFIG_KEYS)
    mine, base = (keyed.loc[[c]].set_index("task") if c in keyed.index else keyed.iloc[:0].set_index("task")
                  for c in (config, baseline))
    both = mine[["score", "seed_sd", "basis"]].merge(base[["score", "seed_sd", "basis"]], how="inner",
                                                     left_index=True, right_index=True, suffixes=("", "_base"))
    both = both[both["basis"] == both["basis_base"]]
    factor = metric_factor(metric)
    frame = pd.DataFrame({"task": both.index,
                          "delta": metric_sign(metric) * factor * (both["score"] - both["score_base"]).to_numpy(),
                          "noise": factor * both[["seed_sd", "seed_sd_base"]].max(axis=1).to_numpy()})
    within = frame["delta"].abs() <= frame["noise"]
    frame["within_noise"] = pd.Series([None if pd.isna(n) else bool(w) for n, w in zip(frame["noise"], within)],
                                      dtype=object)
    return frame


def seed_notes(df: pd.DataFrame, metric: str, pairs: Sequence[tuple[Config, Config]], seeded: bool,
               named: bool = False) -> list[str]:
    """How cells average seeds and, per Delta(PT), on how many datasets it is within seed noise."""
    if not seeded:
        return []
    notes = ["seeds: a dataset's score is the mean over its seeds; a cell's \u00b1 is the standard deviation across "
             "seeds of the cell's mean (over the seeds every dataset of the cell ran)"]
    scores = dataset_scores(whole_split(df), metric)
    for config, baseline in pairs:
        noise = seed_noise(df, metric, config, baseline, scores).dropna(subset=["within_noise"])
        if len(noise):
            label = config_label(config, named or config[2] != default_recipe(*config[:2]))
            notes.append(f"{label}: {DELTA} within seed noise on {int(noise['within_noise'].sum())} of "
                         f"{len(noise)} datasets (|{DELTA}| <= the larger seed standard deviation of pretrained and "
                         "scratch; per dataset: --table datasets)")
    return notes


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
    notes = [f"cell: mean {metric_label(metric)} over the n datasets of the group that have the configuration"]
    if "TMACs" in table.columns:
        notes.append("params, TMACs (forward multiply-accumulates; the STU-Net paper's 'TFLOPs') and TFLOPs "
                     "(= 2 x TMACs) for one 128^3 patch; nnU-Net's network depends on each dataset's plans, "
                     "and ResEnc's are its reference architecture's (6 stages), which the plans adapt")
    if any(row[1] == DELTA for row in table.rows):
        per_recipe = ", per recipe (its pretrained runs minus scratch)" if "recipe" in table.columns else ""
        notes.append(f"{DELTA}: mean of (pretrained - scratch) over the datasets that have both, in points"
                     + per_recipe if metric not in LOWER_IS_BETTER else
                     f"{DELTA}: mean of (scratch - pretrained) over the datasets that have both, in mm" + per_recipe)
        notes += [note for note in [delta_convention(metric)] if note]
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


def recipe_rows(df: pd.DataFrame, pretrained: Sequence[Config]) -> list[Config]:
    """The recipes table's rows: per network fine-tuned with a shown recipe, its scratch configurations (each
    variant), then its pretrained ones."""
    networks = list(dict.fromkeys(config[0] for config in pretrained))
    return [config for model in networks
            for config in [*configurations(df, [model], ["scratch"]), *(c for c in pretrained if c[0] == model)]]


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


def recipe_table(df: pd.DataFrame, metric: str = "dice", models: Sequence[str] | None = None,
                 recipes: Sequence[str] | None = None) -> ResultTable:
    """By dataset scale per recipe: per network its scratch row, then each recipe's row with its delta rows."""
    runs, df = df, whole_split(df)
    pretrained = recipe_configs(df, models, recipes)
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
        cells = [group_cell(lookup, tasks, config, metric, seeds) for tasks in members.values()]
        table.rows.append([*config[:2], *_axis_values(config, axes), *cells])
        shown.append((config, cells))
        for label, baseline in recipe_baselines(config, rows, profiles) if config[1] == "pretrained" else []:
            table.rows.append([config[0], label, *_axis_values(config, axes),
                               *(delta_cell(lookup, tasks, config, baseline, metric) for tasks in members.values())])
        notes += [note for label, candidates in (_baseline_candidates(config, rows) if config[1] == "pretrained"
                                                 else [])
                  for note in [unpaired_note(config, candidates, profiles, label, True)] if note]
    pairs = [(c, b) for c in pretrained for label, b in recipe_baselines(c, rows, profiles) if label == VS_SCRATCH]
    table.notes = (_group_notes(table, members, by, metric) + _recipe_notes(table, pretrained) + notes
                   + _missing_notes(shown, lookup, list(facts.index), True)
                   + seed_notes(df, metric, pairs, seeds is not None, True) + protocol_note(runs))
    table.notes += exclusion_notes(df, metric, rows, METRIC_NAMES[metric])
    return table


def _recipe_notes(table: ResultTable, pretrained: Sequence[Config]) -> list[str]:
    if not table.rows:
        return []
    notes = [f"{VS_SCRATCH}: mean of (recipe - scratch of the same network) over the datasets that have both, in "
             "points"]
    if any(row[1] == VS_DEFAULT for row in table.rows):
        notes.append(f"{VS_DEFAULT}: mean of (recipe - the {DEFAULT_RECIPE} recipe of the same network) over the "
                     "datasets that have both, in points")
    elif all(recipe != DEFAULT_RECIPE for _, _, recipe, _ in pretrained):
        notes.append(f"no {VS_DEFAULT} rows: the {DEFAULT_RECIPE} recipe is not shown (add it to --recipes)")
    return notes


# --- per dataset -----------------------------------------------------------------------------------------------


def config_label(config: Config, with_recipe: bool = False) -> str:
    """`large pretrained`, with the recipe `large pretrained llrd` (scratch's recipe goes without saying), and its
    variant where it has one: `large scratch [12x3 it]`. Callers pass `with_recipe` whenever a recipe other than
    the default is shown (`shows_recipes`), so that no two shown configurations read the same."""
    model, init, recipe, variant = config
    return " ".join([model, init, *([recipe] if with_recipe and recipe != SCRATCH_RECIPE else []),
                     *([f"[{variant}]"] if variant else [])])


def delta_label(config: Config, with_recipe: bool = False) -> str:
    model, _, recipe, variant = config
    return " ".join([model, *([recipe] if with_recipe else []), *([f"[{variant}]"] if variant else []), "delta"])


def dataset_table(df: pd.DataFrame, metric: str = "dice", models: Sequence[str] | None = None,
                  inits: Sequence[str] | None = None, recipes: Sequence[str] | None = None) -> ResultTable:
    """A row per dataset, every configuration side by side, a Delta(PT) per pretrained configuration, and the
    sources used; runs on the whole train split, seeds averaged. With more than one seed, a `SIZE seed noise`
    column per Delta(PT) and a NOISE_MARK on each Delta(PT) within it (`seed_noise`)."""
    runs, df = df, whole_split(df)
    configs = configurations(df, models, inits, recipes)
    facts = dataset_facts(df, configs)
    frame = dataset_scores(df, metric)
    keys = list(zip(*(frame[key] for key in SCORE_KEYS)))
    scores = dict(zip(keys, zip(frame["score"], frame["folds"], frame["source"], frame["seed_sd"], frame["seeds"])))
    lookup = ScoreLookup({None: dict(zip(keys, frame["score"]))}, dict(zip(keys, frame["basis"])),
                         dict(zip(keys, frame["basis_settings"])))
    pending = _pending(df, metric)
    profiles = variant_profiles(runs)
    pairs = delta_pairs(configs, profiles)
    named = shows_recipes(configs)
    splits = _splits(df)
    noise = {config: seed_noise(df, metric, config, baseline, frame).set_index("task") for config, baseline in pairs
             } if frame["seeds"].gt(1).any() else {}
    table = ResultTable("datasets", f"{metric_label(metric)} per dataset",
                        ["task", "modality", "target", "scale", *(config_label(c, named) for c in configs),
                         *(delta_label(config, named) for config, _ in pairs),
                         *(f"{delta_label(config, named).removesuffix(' delta')} seed noise" for config in noise),
                         "source", "split"],
                        count_label="folds", detail_label="status", show_count=False,
                        display={"split": {sha: sha[:12] for sha in splits.values()}})
    for task, modality, target, scale in zip(facts.index, facts["modality"], facts["target"], facts["scale"]):
        cells = {config: _dataset_cell(scores, pending, (task, *config), metric) for config in configs}
        sources = sorted({cell.source for cell in cells.values() if cell.source}, key=lambda s: (s != LOCAL, s))
        table.rows.append([task, modality, target, scale, *cells.values(),
                           *(_dataset_delta(cells[config], cells[baseline], metric, noise.get(config), task,
                                            lookup.mismatch(task, config, baseline))
                             for config, baseline in pairs),
                           *(_noise_value(frame, task) for frame in noise.values()),
                           ", ".join(sources) or "-", splits.get(task)])
    table.notes = (_dataset_notes(table, metric) + pairing_notes(configs, profiles, lookup, named)
                   + _noise_notes(noise, named) + protocol_note(runs))
    table.notes += exclusion_notes(df, metric, configs, METRIC_NAMES[metric])
    return table


def _noise_value(noise: pd.DataFrame, task: str) -> float | None:
    value = noise["noise"].get(task)
    return None if value is None or pd.isna(value) else round(float(value), 2)


def _noise_notes(noise: dict[Config, pd.DataFrame], named: bool) -> list[str]:
    if not noise:
        return []
    counts = "; ".join(f"{config_label(config, named)}: {int(frame['within_noise'].dropna().sum())} of "
                       f"{len(frame['within_noise'].dropna())}" for config, frame in noise.items())
    return [f"seed noise: the larger of pretrained's and scratch's standard deviations across seeds; {NOISE_MARK} "
            f"marks a {DELTA} no larger than it (within seed noise: {counts} datasets); cells show the mean over "
            "seeds \u00b1 the standard deviation across seeds"]


def _splits(df: pd.DataFrame) -> dict[str, str]:
    """Each dataset's test split (SHA-256) as its evaluated runs recorded it, those kept apart aside (one:
    `segbook.results.cells`)."""
    local = df[run_folders(df) & df["evaluated"] & df["split"].notna() & (df["apart"] == "")]
    return dict(zip(local["task"], local["split"]))


def _pending(df: pd.DataFrame, metric: str) -> dict[ScoreKey, list[tuple[str, str]]]:
    """(task, *config) -> (which run, why) for each run or imported result without a score."""
    pending: dict[ScoreKey, list[tuple[str, str]]] = {}
    waiting = df[~df["evaluated"] | df[metric].isna()]
    for row in waiting.itertuples():
        which = row.source if row.source != LOCAL else (
            f"fold {row.fold}" if row.seed == DEFAULT_SEED else f"seed {row.seed} fold {row.fold}")
        unevaluated = isinstance(row.unevaluated, dict) and metric in row.unevaluated
        why = (row.unevaluated[metric] if unevaluated else
               f"no {METRIC_NAMES[metric]}") if row.evaluated else row.status
        pending.setdefault((row.task, row.model, row.init, row.recipe, row.variant), []).append((which, why))
    return pending


def _dataset_cell(scores: dict, pending: dict, key: ScoreKey, metric: str = "dice") -> Cell:
    waiting = pending.get(key, [])
    folds = "; ".join(f"{which}: {why}" for which, why in waiting)
    if key not in scores:
        statuses = {status for _, status in waiting}
        return Cell(None, 0, status=statuses.pop() if len(statuses) == 1 else folds or "missing")
    score, count, source, spread, seeds = scores[key]
    factor = metric_factor(metric)
    return Cell(factor * score, int(count), status=folds, marker=PARTIAL_MARK if waiting else "", source=source,
                spread=None if pd.isna(spread) else factor * spread, seeds=int(seeds))


def _dataset_delta(pretrained: Cell, scratch: Cell, metric: str = "dice", noise: pd.DataFrame | None = None,
                   task: str = "", mismatch: str | None = None) -> Cell:
    if pretrained.value is None or scratch.value is None:
        return Cell(None, 0, status="-")
    if mismatch:
        return Cell(None, 0, status=f"- (runs differ: {mismatch})")
    within = noise is not None and noise["within_noise"].get(task) in (True, 1)
    return Cell(metric_sign(metric) * (pretrained.value - scratch.value), 1, signed=True,
                marker=NOISE_MARK if within else "")


def _dataset_notes(table: ResultTable, metric: str) -> list[str]:
    if not table.rows:
        return ["no datasets: no runs of the shown configurations"]
    notes = [f"cell: mean {metric_label(metric)} over the dataset's evaluated folds; 'missing': no run; "
             "otherwise the status of its runs"]
    partial = [f"  {row[0]} {column}: {cell.status}" for row in table.rows
               for column, cell in zip(table.columns, row) if isinstance(cell, Cell) and cell.marker == PARTIAL_MARK]
    if partial:
        notes += [f"{PARTIAL_MARK} averages the seeds evaluated so far; not counted:", *partial]
    if any(IMPORTED_PREFIX in str(row[-2]) for row in table.rows):
        notes.append("source imported:NAME: numbers imported from $SEGBOOK_HOME/results/imported/NAME.csv, "
                     "configurations of their own ([imported:NAME]): published numbers come with their authors' "
                     "settings, plans and split, so they are never averaged or compared with runs")
    return notes


# --- training-data fractions ------------------------------------------------------------------------------------


#: Pretraining "matches" scratch on all the data at a fraction when its score is at most this much worse (points;
#: mm for HD95): below the two-decimal precision that the tables print plus rounding, a tie.
MATCH_TOLERANCE = 0.1
MATCHES = "matches scratch@100%"


def fraction_text(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def run_fractions(df: pd.DataFrame) -> list[float]:
    """The training fractions with evaluated runs, smallest first."""
    return sorted(set(df.loc[df["evaluated"], "fraction"]))


def fraction_scores(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """`dataset_scores` at every training fraction run, with a `fraction` column (scores as stored)."""
    frames = [dataset_scores(df, metric, None, fraction).assign(fraction=fraction) for fraction in run_fractions(df)]
    columns = [*SCORE_KEYS, "score", "seed_sd", "seeds", "folds", "source", "basis", "basis_settings", "fraction"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def smallest_matching_fraction(pretrained: Mapping[float, float], scratch_full: float, metric: str) -> float | None:
    """The smallest fraction at which pretraining matches scratch trained on the whole train split: its score
    (mean over seeds) is no worse than scratch's at fraction 1 by more than MATCH_TOLERANCE, at that fraction and at
    every larger fraction run (so one lucky small run does not claim it). None: it never does."""
    sign, factor = metric_sign(metric), metric_factor(metric)
    found = None
    for fraction in sorted(pretrained, reverse=True):
        if sign * factor * (pretrained[fraction] - scratch_full) < -MATCH_TOLERANCE:
            break
        found = fraction
    return found


def fraction_table(df: pd.DataFrame, metric: str = "dice", models: Sequence[str] | None = None,
                   inits: Sequence[str] | None = None, recipes: Sequence[str] | None = None) -> ResultTable:
    """A row per dataset and configuration, a column per training fraction run (mean over seeds, +- their standard
    deviation), and for each pretrained configuration the smallest fraction that matches scratch on all the data."""
    configs = configurations(df, models, inits, recipes)
    facts = dataset_facts(df, configs)
    fractions = run_fractions(df)
    scores = fraction_scores(df, metric)
    by_key = {(*key, fraction): (score, sd, seeds, basis) for *key, fraction, score, sd, seeds, basis in zip(
        *(scores[k] for k in SCORE_KEYS), scores["fraction"], scores["score"], scores["seed_sd"], scores["seeds"],
        scores["basis"])}
    axes = _axes(configs)
    profiles = variant_profiles(df)
    baselines = dict(delta_pairs(configs, profiles))
    factor = metric_factor(metric)
    table = ResultTable("fractions", f"{metric_label(metric)} per training-data fraction",
                        ["task", "train cases", "model", "init", *axes,
                         *map(fraction_text, fractions), *([MATCHES] if baselines else [])],
                        count_label="seeds", detail_label="status", show_count=False, display={"model": MODEL_NAMES})
    for task, train_cases in zip(facts.index, facts["train_cases"]):
        for config in configs:
            values = {f: by_key[(task, *config, f)] for f in fractions if (task, *config, f) in by_key}
            if not values:
                continue
            cells = [Cell(factor * values[f][0], int(values[f][2]),
                          spread=None if pd.isna(values[f][1]) else factor * values[f][1]) if f in values
                     else Cell(None, status="missing") for f in fractions]
            match = _match_text(values, by_key.get((task, *baselines[config], DEFAULT_FRACTION)), metric) \
                if config in baselines else None
            table.rows.append([task, int(train_cases), *config[:2], *_axis_values(config, axes), *cells,
                               *([match] if baselines else [])])
    table.notes = (_fraction_notes(table, metric, baselines)
                   + pairing_notes(configs, profiles, None, shows_recipes(configs))
                   + protocol_note(df.assign(fraction=DEFAULT_FRACTION)))
    table.notes += exclusion_notes(df, metric, configs, METRIC_NAMES[metric])
    return table


def _match_text(pretrained: dict[float, tuple], scratch_full: tuple | None, metric: str) -> str | None:
    """The smallest matching fraction among those whose runs agree with scratch's in data and evaluation settings
    and test split; None without such a scratch run (or such fractions)."""
    if scratch_full is None:
        return None
    comparable_fractions = {f: value[0] for f, value in pretrained.items() if value[3] == scratch_full[3]}
    if not comparable_fractions:
        return None
    found = smallest_matching_fraction(comparable_fractions, scratch_full[0], metric)
    return "never" if found is None else fraction_text(found)


def _fraction_notes(table: ResultTable, metric: str, baselines: Mapping[Config, Config]) -> list[str]:
    if not table.rows:
        return ["no datasets: no runs of the shown configurations"]
    notes = [f"cell: {metric_label(metric)} of the runs trained on that fraction of the train split (the test split "
             "is always the whole one): mean over seeds, \u00b1 the standard deviation across seeds where more than "
             "one; train cases: the dataset's whole train split"]
    if baselines:
        worse = "above" if metric in LOWER_IS_BETTER else "below"
        notes.append(f"{MATCHES}: the smallest fraction at which the pretrained network's score is at most "
                     f"{MATCH_TOLERANCE:g} {delta_unit(metric)} {worse} the same network's from scratch on the whole "
                     "train split, at that fraction and at every larger one run; never: at no fraction; '-': a "
                     "scratch row, or no scratch run on the whole train split")
    return notes


def build_table(df: pd.DataFrame, name: str, metric: str = "dice", group_datasets: bool = False,
                models: Sequence[str] | None = None, inits: Sequence[str] | None = None,
                recipes: Sequence[str] | None = None) -> ResultTable:
    """Any of TABLES by name: what `segbook results --table NAME` prints."""
    if name == "datasets":
        return dataset_table(df, metric, models, inits, recipes)
    if name == "fractions":
        return fraction_table(df, metric, models, inits, recipes)
    if name == "recipes":
        if inits:
            raise TableError("the recipes table compares each recipe's pretrained runs with scratch: --init does "
                             "not apply to it")
        return recipe_table(df, metric, models, recipes)
    if name not in TABLES:
        raise TableError(f"unknown table {name!r}; choose one of {', '.join(TABLES)}")
    return group_table(df, grouping(name, group_datasets), metric, models, inits, recipes)
