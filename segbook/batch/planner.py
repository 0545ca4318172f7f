"""`segbook batch plan --gpu-hours N`: the sub-study of a matrix that fits N GPU-hours, and how precisely it will
measure Delta(PT).

The unit of choice is a dataset with every job the selection gives it (each model, initialisation, recipe, seed,
fraction, budget and fold the user asked for), so a pretrained job never goes without the scratch job of its network
that its Delta(PT) needs, and the planner never trades away a model or budget the user asked for: to spend less per
dataset, narrow --models or --budgets. A dataset costs the GPU-hours its jobs have left (`segbook.batch.forecast`:
nothing for a done job). Datasets are stratified by the registry's scale x modality x target (the facts
`segbook.registry.DatasetEntry` owns and the group tables group by). The choice is greedy and deterministic:

1. every stratum gets its cheapest dataset, the cheapest strata first, while they fit (taking the cheapest strata
   first covers as many strata as any choice could);
2. then, a dataset at a time, the stratum with the fewest datasets chosen so far gets its next cheapest one, as long
   as one fits.

Expected precision: per scale group and pretrained configuration, the half-width of the 95% bootstrap confidence
interval of the mean Delta(PT) over the n datasets chosen in that group, with the per-dataset Delta(PT) values the
store holds (`segbook results`: the user's runs and imported published numbers, paired as the tables pair them) as
the population: `REPLICATES` resamples of n of the observed values with replacement (numpy, seeded with
`PRECISION_SEED`), the half-width being half the distance between the 2.5th and 97.5th percentiles of their means.
Where the store has fewer than two Delta(PT) values of a group, the precision is unknown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from segbook.batch.forecast import Forecast, JobCost
from segbook.batch.jobs import Job
from segbook.errors import SegbookError
from segbook.registry import SCALES

if TYPE_CHECKING:
    from segbook.paths import Paths
    from segbook.registry import DatasetEntry, Registry

#: Bootstrap resamples, their random seed and the confidence level of the expected precision.
REPLICATES = 10_000
PRECISION_SEED = 12345
LEVEL = 0.95


class PlanError(SegbookError):
    """A GPU-hour budget the planner cannot fit any stratum into."""


Stratum = tuple[str, str, str]  # (scale, modality, target)


def stratum_of(entry: "DatasetEntry") -> Stratum:
    return entry.scale, entry.modality, entry.target


@dataclass(frozen=True)
class Candidate:
    """A dataset of the matrix and the GPU-hours its jobs have left (None: some job has no estimate, so the
    dataset cannot be costed and is never chosen)."""

    entry: "DatasetEntry"
    gpu_hours: float | None


@dataclass(frozen=True)
class StratumChoice:
    """One stratum: its datasets, those chosen (cheapest first) and what they cost."""

    stratum: Stratum
    available: tuple[Candidate, ...]
    chosen: tuple[Candidate, ...]

    @property
    def gpu_hours(self) -> float:
        return math.fsum(c.gpu_hours for c in self.chosen)

    def row(self) -> dict[str, Any]:
        scale, modality, target = self.stratum
        cheapest = min((c.gpu_hours for c in self.available if c.gpu_hours is not None), default=None)
        uncosted = sum(c.gpu_hours is None for c in self.available)
        return {"scale": scale, "modality": modality, "target": target,
                "datasets": f"{len(self.chosen)} of {len(self.available)}", "gpu_hours": round(self.gpu_hours, 2),
                "chosen": ", ".join(c.entry.key for c in self.chosen)
                or ("-" if cheapest is None else f"none (cheapest: {cheapest:.2f} GPU-hours)")
                + (f"; {uncosted} without an estimate" if uncosted else "")}


@dataclass(frozen=True)
class Precision:
    """The expected 95% CI half-width (Dice points) of a configuration's mean Delta(PT) over the `datasets` chosen
    in a scale group, from `observed` per-dataset Delta(PT) values in the store; None with `why` when unknown."""

    scale: str
    configuration: str
    datasets: int
    observed: int
    half_width: float | None
    why: str = ""

    def row(self) -> dict[str, Any]:
        return {"scale": self.scale, "configuration": self.configuration, "datasets": self.datasets,
                "observed": self.observed,
                "ci95_half_width": None if self.half_width is None else round(self.half_width, 2),
                "note": self.why}


@dataclass(frozen=True)
class StudyPlan:
    """The chosen sub-study: per stratum what was chosen, its jobs in matrix order, and its expected precision."""

    budget: float
    strata: tuple[StratumChoice, ...]
    jobs: tuple[Job, ...]
    precision: tuple[Precision, ...] = ()

    @property
    def gpu_hours(self) -> float:
        return math.fsum(c.gpu_hours for s in self.strata for c in s.chosen)

    def chosen_per_scale(self) -> dict[str, int]:
        return {scale: sum(len(s.chosen) for s in self.strata if s.stratum[0] == scale) for scale in SCALES
                if any(s.stratum[0] == scale for s in self.strata)}

    def summary(self) -> list[str]:
        """Plain sentences: what was chosen, and why."""
        datasets = sum(len(s.chosen) for s in self.strata)
        available = sum(len(s.available) for s in self.strata)
        covered = [s for s in self.strata if s.chosen]
        lines = [f"chose {datasets} of {available} datasets ({len(self.jobs)} jobs, {self.gpu_hours:.2f} of "
                 f"{self.budget:.2f} GPU-hours left to train), covering {len(covered)} of {len(self.strata)} strata "
                 "(scale x modality x target)",
                 "why: a dataset comes with all its jobs of the selection (every model, init, recipe, seed, budget: "
                 "pretrained and scratch stay paired); every stratum gets its cheapest dataset, cheapest strata "
                 "first, then the stratum with the fewest datasets its next cheapest, while they fit"]
        missed = [" x ".join(s.stratum) for s in self.strata if not s.chosen]
        if missed:
            lines.append(f"not covered (their cheapest dataset no longer fits): {', '.join(missed)}")
        return lines


def candidates(costs: Iterable[JobCost]) -> dict[Stratum, list[Candidate]]:
    """Each stratum's datasets (those of the matrix), cheapest first (registry order among equals; uncosted
    last)."""
    by_dataset: dict[str, list[JobCost]] = {}
    for cost in costs:
        by_dataset.setdefault(cost.status.job.entry.key, []).append(cost)
    strata: dict[Stratum, list[Candidate]] = {}
    for members in by_dataset.values():
        entry = members[0].status.job.entry
        hours = [c.left_gpu_hours for c in members]
        total = None if any(h is None for h in hours) else math.fsum(hours)
        strata.setdefault(stratum_of(entry), []).append(Candidate(entry, total))
    return {stratum: sorted(found, key=lambda c: (c.gpu_hours is None, c.gpu_hours or 0.0))
            for stratum, found in strata.items()}


def choose(plan: Forecast, gpu_hours: float) -> StudyPlan:
    """The sub-study of `plan`'s jobs that fits `gpu_hours` (the module docstring says how); a PlanError naming
    the cheapest feasible figure when not even one stratum's cheapest dataset fits."""
    found = candidates(plan.jobs)
    costed = {stratum: [c for c in options if c.gpu_hours is not None] for stratum, options in found.items()}
    cheapest = sorted((options[0].gpu_hours, stratum) for stratum, options in costed.items() if options)
    if not cheapest:
        raise PlanError("no dataset of the selection has a GPU-hour estimate (no plans nor reference patch); "
                        "prepare its tasks first (`segbook batch prepare`)")
    if gpu_hours < cheapest[0][0]:
        hours, stratum = cheapest[0]
        raise PlanError(f"--gpu-hours {gpu_hours:g} fits no stratum: the cheapest feasible figure is "
                        f"{_round_up(hours)} GPU-hours (one {' x '.join(stratum)} dataset with all its jobs); "
                        "narrow --models, --budgets or --seeds to spend less per dataset")
    chosen: dict[Stratum, list[Candidate]] = {stratum: [] for stratum in found}

    def fits(hours: float) -> bool:  # summed afresh each time: no rounding drift from repeated subtraction
        return math.fsum([c.gpu_hours for members in chosen.values() for c in members] + [hours]) <= gpu_hours

    for hours, stratum in cheapest:
        if fits(hours):
            chosen[stratum].append(costed[stratum][0])
    while True:
        fitting = [(len(chosen[s]), options[len(chosen[s])].gpu_hours, s) for s, options in costed.items()
                   if len(chosen[s]) < len(options) and fits(options[len(chosen[s])].gpu_hours)]
        if not fitting:
            break
        stratum = min(fitting)[2]
        chosen[stratum].append(costed[stratum][len(chosen[stratum])])
    picked = {c.entry.key for members in chosen.values() for c in members}
    order = sorted(found, key=lambda s: (SCALES.index(s[0]), s))
    return StudyPlan(gpu_hours, tuple(StratumChoice(s, tuple(found[s]), tuple(chosen[s])) for s in order),
                     tuple(c.status.job for c in plan.jobs if c.status.job.entry.key in picked))


def _round_up(hours: float) -> str:
    """GPU-hours shown with two decimals, rounded up so the figure named does fit."""
    return f"{math.ceil(hours * 100) / 100:.2f}"


def bootstrap_half_width(values: Sequence[float], datasets: int, replicates: int = REPLICATES,
                         seed: int = PRECISION_SEED, level: float = LEVEL) -> float:
    """Half the width of the percentile bootstrap interval at `level` of the mean of `datasets` values drawn with
    replacement from `values` (`replicates` draws, numpy's generator seeded with `seed`)."""
    import numpy as np

    population = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = population[rng.integers(0, len(population), size=(replicates, datasets))].mean(axis=1)
    low, high = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(high - low) / 2


def observed_deltas(paths: "Paths", registry: "Registry", models: Sequence[str]) -> dict[str, dict[str, list[float]]]:
    """Scale group -> configuration label -> the per-dataset Delta(PT) (pretrained minus scratch, Dice points) of
    `models` in the store, paired as the results tables pair them (`segbook.results.configs.delta_pairs`,
    `ScoreLookup.pair`: runs on the whole train split, seeds averaged). Runs the results leave out are left out
    here too (their warnings are `segbook results`' to give)."""
    import warnings

    from segbook.results.collect import ResultsWarning, collect_results
    from segbook.results.configs import config_label, configurations, delta_pairs, variant_profiles
    from segbook.results.scores import score_lookup, whole_split
    from segbook.results.selection import Selection

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResultsWarning)
        df = collect_results(paths, registry)
    if df.empty:
        return {}
    df = whole_split(df)
    if df.empty:
        return {}
    configs = configurations(df, Selection(models=tuple(models)))
    lookup = score_lookup(df, "dice", [None])
    deltas: dict[str, dict[str, list[float]]] = {}
    for config, baseline in delta_pairs(configs, variant_profiles(df)):
        for task in dict.fromkeys(df["task"]):
            pair = lookup.pair(None, task, config, baseline)
            if pair is not None:
                label = config_label(config, True)
                deltas.setdefault(registry.get(task).scale, {}).setdefault(label, []).append(
                    100 * (pair[0] - pair[1]))
    return deltas


def expected_precision(study: StudyPlan, deltas: dict[str, dict[str, list[float]]]) -> tuple[Precision, ...]:
    """Per scale group of the study (and configuration with observed Delta(PT)), the expected CI half-width at the
    number of datasets chosen there; unknown where the store has fewer than two values or none is chosen."""
    rows = []
    for scale, chosen in study.chosen_per_scale().items():
        observed = deltas.get(scale, {})
        if not observed:
            rows.append(Precision(scale, "-", chosen, 0, None, "unknown: the store holds no Delta(PT) of these "
                                                                 f"models on {scale} datasets"))
        for label, values in observed.items():
            if chosen == 0:
                rows.append(Precision(scale, label, 0, len(values), None, "no dataset of the group chosen"))
            elif len(values) < 2:
                rows.append(Precision(scale, label, chosen, len(values), None,
                                      "unknown: one observed Delta(PT) has no spread"))
            else:
                rows.append(Precision(scale, label, chosen, len(values), bootstrap_half_width(values, chosen),
                                      f"+/- Dice points: {REPLICATES} resamples of {chosen} of the "
                                      f"{len(values)} observed values"))
    return tuple(rows)


def plan_study(plan: Forecast, gpu_hours: float, paths: "Paths", registry: "Registry") -> StudyPlan:
    """`choose`, with the expected precision from the store's Delta(PT) of the study's pretrained models."""
    from dataclasses import replace

    study = choose(plan, gpu_hours)
    models = list(dict.fromkeys(job.spec.model for job in study.jobs if job.spec.init == "pretrained"))
    if not models:
        return replace(study, precision=tuple(Precision(scale, "-", n, 0, None, "no Delta(PT): no pretrained job")
                                              for scale, n in study.chosen_per_scale().items()))
    return replace(study, precision=expected_precision(study, observed_deltas(paths, registry, models)))
