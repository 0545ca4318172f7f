"""Configurations: which a selection shows, how tables name them, and which pairs are compared.

A configuration is (model, initialisation, recipe, variant): two recipes of one network are never averaged into one
cell, nor two variants, the runs of one recipe with different training fingerprints (`segbook.results.cells`: a
variant is "" where all share one). Tables name the recipe only when a recipe other than the defaults (segbook,
scratch) is shown, and the variant only when one is, so the paper's tables look as they always did. Two
configurations are compared (Delta(PT), the recipes' deltas, statistics) only where their shared training settings
match (`delta_pairs`, `comparable`).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from segbook import backbones, fingerprint
from segbook.recipes import BUILTIN_ORDER
from segbook.results.scores import CONFIG_KEYS, Config, ScoreLookup
from segbook.results.selection import Selection, TableError
from segbook.runs import INITS, default_recipe


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


#: The name of pretrained minus scratch of one network, in columns, rows and notes.
DELTA = "Delta(PT)"
#: SegBook's recipes (`segbook.backbones.STUDY_RECIPES`), which the recipes table's rows are compared with.
DEFAULT_RECIPE = backbones.STUDY_RECIPES["pretrained"]
SCRATCH_RECIPE = backbones.STUDY_RECIPES["scratch"]
#: The training settings two configurations compared with each other must share (fingerprint.SHARED) and the
#: source their runs are kept apart by.
SHARED_KEYS = (*fingerprint.SHARED, "source")
#: Those every configuration has (not the checkpoint of pretrained ones): configurations ranked or tested against
#: each other share them (`comparability_classes`).
COMMON_KEYS = tuple(key for key in SHARED_KEYS if key not in ("weights", "stem_tiling"))


def configurations(df: pd.DataFrame, selection: Selection = Selection()) -> list[Config]:
    """The paper's configurations present in `df`, or those the selection requests, present or not.

    `models` alone asks for both initialisations of each; `inits` alone, that initialisation of the models present.
    A pretrained network shows with each of `recipes` (the pretrained runs' recipes), or when none are given with
    each recipe it has in `df` (the default one if none); a scratch network with each recipe it has (`scratch`).
    Each (model, init, recipe) shows with each of its variants in `df` ("" first), or "" when it has none.
    """
    models, inits, recipes = selection.models, selection.inits, selection.recipes
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


def config_axes(configs: Sequence[Config]) -> list[str]:
    """The columns naming a configuration beyond model and init: `recipe` and `variant`, where one is shown."""
    return [*(["recipe"] if shows_recipes(configs) else []), *(["variant"] if shows_variants(configs) else [])]


def axis_values(config: Config, axes: Sequence[str]) -> list[str]:
    return [config[2] if axis == "recipe" else config[3] for axis in axes]


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




def scratch_of(df: pd.DataFrame, config: Config) -> Config | None:
    """The scratch configuration a pretrained one is compared with (`comparable`), among those in `df`."""
    present = list(dict.fromkeys(zip(*(df[key] for key in CONFIG_KEYS))))
    return comparable(config, scratch_candidates(config, present), variant_profiles(df))
