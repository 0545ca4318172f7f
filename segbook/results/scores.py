"""Dataset-level scores, the one way every table and statistic scores a configuration, and how metrics read.

Definitions (docs/results.md): a run's score is the mean over labels of the per-label mean over test cases; a
dataset's score for a configuration (model, initialisation, recipe, variant) is the mean over its seeds of each
seed's mean over its evaluated folds, at one training fraction. Local runs take precedence over imported numbers of
the same configuration of a dataset. Two configurations of a dataset are compared only where their runs' data and
evaluation settings and test split agree (`ScoreLookup.pair`). For HD95 (a distance in mm) lower is better: scores
are in mm, and every Delta is scratch minus pretrained, so that a positive Delta always means pretraining helps.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import pandas as pd

from segbook import fingerprint
from segbook.results.cells import CELL_KEYS, left_out_notes
from segbook.results.collect import LOCAL, LOWER_IS_BETTER, METRICS, default_plans, run_folders
from segbook.results.selection import MEAN, TableError
from segbook.runs import DEFAULT_FRACTION

METRIC_NAMES = {"dice": "Dice", "nsd": "NSD", "iou": "IoU", "precision": "Precision", "recall": "Recall",
                "hd95": "HD95"}
Config = tuple[str, str, str, str]  # (model, init, recipe, variant)
Member = tuple[str, str | None]  # (task, part): part None scores the whole dataset
ScoreKey = tuple[str, str, str, str, str]  # (task, *Config)
#: What identifies a configuration, and a dataset score: the dataset and the configuration.
CONFIG_KEYS = ["model", "init", "recipe", "variant"]
SCORE_KEYS = ["task", *CONFIG_KEYS]
#: (task, *config) -> {seed: that seed's dataset score}, per part as in ScoreLookup.
SeedLookup = dict[str | None, dict[ScoreKey, dict[int, float]]]


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



def summarised(values: Sequence[float], summary: str = MEAN) -> tuple[float | None, tuple[float, float] | None]:
    """What a cell shows of `values` (a group's dataset scores, a dataset's case scores, their differences): the
    mean, or with `summary` median the median and its first and third quartiles (numpy's `percentile`, linear
    interpolation); (None, None) without values."""
    import numpy as np

    if len(values) == 0:
        return None, None
    if summary == MEAN:
        return sum(values) / len(values), None
    low, middle, high = np.percentile(np.asarray(values, float), [25, 50, 75])
    return float(middle), (float(low), float(high))


def summary_text(summary: str) -> str:
    """How notes name a cell's summary: `mean`, or `median (Q1, Q3)`."""
    return "mean" if summary == MEAN else "median (Q1, Q3)"


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


