"""The identity of a run, and everything that follows from it: its trainer, folder, job id and files.

A run is (task, model, initialisation, recipe, seed, training fraction, budget, fold). Every other module asks this one:
how a run folder and a job id are spelled and parsed back, where `run.json` and the evaluation files are, which
checkpoint a run resumes from and which pretrained file a run starts from (its record, `run.json`, and how a status
or failure is written into it: `segbook.training.manifest`).

Folders stay nnU-Net's, `Dataset{id}_{Name}/{Trainer}__{Plans}__3d_fullres/fold_{fold}`, so `nnUNetv2_predict` works
on segbook's runs. nnU-Net names the folder after the trainer class, so the trainer's name carries the identity:
`SegbookTrainer_{model}_{init}`, then, only where they differ from the defaults, the recipe, `seed{N}`,
`frac{P}` (the training fraction in percent) and `ep{E}` (the budget in epochs, where it is not the recipe's),
joined by `_`: `SegbookTrainer_large_pretrained_llrd_seed1_frac25_ep150`. Runs with the default recipe, seed 0, the
whole train split and the recipe's budget keep the names they always had.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from segbook import backbones
from segbook.errors import SegbookError

if TYPE_CHECKING:
    from segbook.paths import Paths
    from segbook.registry import DatasetEntry, Registry

#: The built-in models (`segbook.backbones`); users' backbones add theirs (`backbones.model_names()`).
MODELS = backbones.builtin_names()
INITS = ("pretrained", "scratch")
FOLDS = ("all", "0", "1", "2", "3", "4")
CONFIGURATION = "3d_fullres"
DEFAULT_PLANS = backbones.PLANNERS["default"].plans  # nnUNetPlans
TRAINER_PREFIX = "SegbookTrainer"
DEFAULT_SEED = 0
DEFAULT_FRACTION = 1.0
#: The random-number seed of a run with seed 0. Before seeds were part of a run's identity every run seeded Python,
#: numpy and torch with a setting whose default was 12345; a run with seed N seeds them with 12345 + N, so the runs
#: made before (seed 0, the default setting) train exactly as they did.
BASE_RNG_SEED = 12345
#: numpy takes seeds below 2**32.
MAX_SEED = 2**32 - 1 - BASE_RNG_SEED
#: Recipe names: lower case, digits and hyphens (no `_`, which separates the parts of a trainer name).
RECIPE_NAME = re.compile(r"^[a-z][a-z0-9-]*$")
_SEED = re.compile(r"^seed(\d+)$")
_FRACTION = re.compile(r"^frac(\d+(?:p\d+)?)$")
_BUDGET = re.compile(r"^ep(\d+)$")
#: The largest budget a run may name, in epochs (a hundred times nnU-Net's 1000: anything above is a typing mistake).
MAX_BUDGET = 100_000
JOB_SEPARATOR = "__"

MANIFEST = "run.json"
EVALUATION = "evaluation"
SUMMARY = "summary.json"
METRICS = "metrics.csv"
FINAL_CHECKPOINT = "checkpoint_final.pth"
#: External evaluations (a run scored on another dataset) lie in their own folders under the evaluation folder,
#: `evaluation/external/<tested task key>[__all-cases]/`, which nothing reading a run's own scores looks into.
EXTERNAL = "external"
ALL_CASES_SUFFIX = "__all-cases"
#: nnU-Net's checkpoints a run resumes from (never from checkpoint_best: that would skip the epochs after it).
RESUMABLE_CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth")


class RunIdentityError(SegbookError):
    """A run that cannot exist (an unknown model, a pretrained nnU-Net network), or a name that does not parse."""


def valid_combinations() -> list[tuple[str, str]]:
    """Every model from scratch, and pretrained where its backbone reads checkpoints (nnU-Net's default network
    has none: it is the paper's scratch baseline)."""
    return [(b.name, i) for b in backbones.all_backbones() for i in INITS if i == "scratch" or b.pretrainable]


def default_recipe(model: str, init: str) -> str:
    """The recipe a run of `model` gets when it names none: its backbone's (`Backbone.default_recipes`; the study's,
    `backbones.STUDY_RECIPES`, for every built-in one, and for a model no longer registered, whose runs the results
    may still hold)."""
    return backbones.get(model).default_recipe(init) if backbones.is_known(model) else backbones.STUDY_RECIPES[init]


@dataclass(frozen=True)
class Identity:
    """What a trainer's name says: the network, how it starts and how it trains (not which task or fold)."""

    model: str
    init: str
    recipe: str = ""  # "" means the default for `init`
    seed: int = DEFAULT_SEED
    fraction: float = DEFAULT_FRACTION
    #: Epochs of training where they are not the recipe's (None: the recipe's budget, the run's name unchanged);
    #: `named_budget` turns a budget into this, knowing the recipe.
    budget: int | None = None

    def __post_init__(self) -> None:
        if not backbones.is_known(self.model):
            raise RunIdentityError(f"unknown model {self.model!r}; choose one of "
                                   f"{', '.join(backbones.model_names())}")
        if self.init not in INITS:
            raise RunIdentityError(f"unknown initialisation {self.init!r}; choose one of {', '.join(INITS)}")
        if self.init == "pretrained" and not backbones.get(self.model).pretrainable:
            raise RunIdentityError(f"{backbones.get(self.model).label} has no pretrained weights: use --model "
                                   f"{self.model} with --scratch")
        object.__setattr__(self, "recipe", self.recipe or default_recipe(self.model, self.init))
        if not RECIPE_NAME.match(self.recipe) or any(p.match(self.recipe) for p in (_SEED, _FRACTION, _BUDGET)):
            raise RunIdentityError(f"recipe name {self.recipe!r}: use lower-case letters, digits and hyphens, "
                                   "starting with a letter (not seedN, fracN or epN)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise RunIdentityError(f"seed must be an integer in [0, {MAX_SEED}], got {self.seed!r}")
        if not 0 < self.fraction <= 1 or _percent_text(self.fraction) is None:
            raise RunIdentityError(f"training fraction must be in (0, 1] with at most 2 decimals in percent, "
                                   f"got {self.fraction!r}")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, int)
                                        or not 1 <= self.budget <= MAX_BUDGET):
            raise RunIdentityError(f"budget must be an integer number of epochs in [1, {MAX_BUDGET}], "
                                   f"got {self.budget!r}")

    @property
    def is_default(self) -> bool:
        """The default recipe, seed, whole train split and budget: the run SegBook's tables are about."""
        return (self.recipe, self.seed, self.fraction, self.budget) == (default_recipe(self.model, self.init),
                                                                        DEFAULT_SEED, DEFAULT_FRACTION, None)

    @property
    def rng_seed(self) -> int:
        """What Python, numpy and torch are seeded with (`BASE_RNG_SEED` + seed; recorded in run.json)."""
        return BASE_RNG_SEED + self.seed

    @property
    def trainer(self) -> str:
        parts = [TRAINER_PREFIX, self.model, self.init]
        if self.recipe != default_recipe(self.model, self.init):
            parts.append(self.recipe)
        if self.seed != DEFAULT_SEED:
            parts.append(f"seed{self.seed}")
        if self.fraction != DEFAULT_FRACTION:
            parts.append(f"frac{_percent_text(self.fraction)}")
        if self.budget is not None:
            parts.append(f"ep{self.budget}")
        return "_".join(parts)

    @classmethod
    def from_record(cls, run: dict[str, Any]) -> "Identity":
        """The identity a `run` record (`run.json`, `summary.json`) names; records written before recipes, seeds,
        fractions and budgets existed name the defaults. `RunIdentityError`, KeyError, TypeError or ValueError for a
        malformed one."""
        return cls(run["model"], run["init"], run.get("recipe") or "", int(run.get("seed", DEFAULT_SEED)),
                   float(run.get("fraction", DEFAULT_FRACTION)), run.get("budget"))

    @classmethod
    def from_trainer(cls, name: str) -> "Identity | None":
        """The identity a segbook trainer name spells; None for any other name (nnU-Net's own trainers)."""
        parts = name.split("_")
        if len(parts) < 3 or parts[0] != TRAINER_PREFIX or JOB_SEPARATOR in name:
            return None
        recipe, seed, fraction, budget = "", DEFAULT_SEED, DEFAULT_FRACTION, None
        rest = parts[3:]
        if rest and not any(p.match(rest[0]) for p in (_SEED, _FRACTION, _BUDGET)):
            recipe = rest.pop(0)
        if rest and (match := _SEED.match(rest[0])):
            seed = int(match[1])
            rest.pop(0)
        if rest and (match := _FRACTION.match(rest[0])):
            fraction = float(match[1].replace("p", ".")) / 100
            rest.pop(0)
        if rest and (match := _BUDGET.match(rest[0])):
            budget = int(match[1])
            rest.pop(0)
        try:
            identity = cls(parts[1], parts[2], recipe, seed, fraction, budget)
        except RunIdentityError:
            return None
        return identity if not rest and identity.trainer == name else None

    def describe(self) -> str:
        extras = [f"recipe {self.recipe}"]
        if self.seed != DEFAULT_SEED:
            extras.append(f"seed {self.seed}")
        if self.fraction != DEFAULT_FRACTION:
            extras.append(f"{_percent_text(self.fraction).replace('p', '.')}% of the train split")
        if self.budget is not None:
            extras.append(f"{self.budget} epochs")
        return f"{self.model} {self.init} ({', '.join(extras)})"


def _percent_text(fraction: float) -> str | None:
    """25% -> "25", 12.5% -> "12p5" (no dots in names); None when the percentage has more than 2 decimals."""
    percent = round(fraction * 100, 6)
    if abs(percent * 100 - round(percent * 100)) > 1e-6:
        return None
    text = f"{percent:.2f}".rstrip("0").rstrip(".")
    return text.replace(".", "p")


def parse_seeds(values: Iterable[str | int], option: str = "--seeds") -> list[int]:
    """Seeds as given (`["0", "1"]`, `["0,1"]` or ints), each an integer in [0, MAX_SEED], none twice;
    `RunIdentityError` naming the option otherwise. Checked before anything is written."""
    seeds = []
    for item in _listed(values, option):
        try:
            seed = int(item) if not isinstance(item, bool) else None
        except ValueError:
            seed = None
        if seed is None or str(item).strip() != str(seed) or not 0 <= seed <= MAX_SEED:
            raise RunIdentityError(f"{option}: a seed is an integer in [0, {MAX_SEED}], got {item!r}")
        seeds.append(seed)
    return _once(seeds, option)


def parse_fractions(values: Iterable[str | float], option: str = "--fractions") -> list[float]:
    """Training fractions as given (`["0.1", "0.25"]`, `["0.1,1"]` or numbers), each in (0, 1] with at most two
    decimals in percent (12.5% is 0.125), none twice; `RunIdentityError` naming the option otherwise."""
    fractions = []
    for item in _listed(values, option):
        try:
            fraction = float(item)
        except (TypeError, ValueError):
            fraction = math.nan
        if not 0 < fraction <= 1 or _percent_text(fraction) is None:
            raise RunIdentityError(f"{option}: a training fraction is a number in (0, 1] with at most two decimals "
                                   f"in percent (0.1, 0.25, 0.125, 1), got {item!r}")
        fractions.append(round(fraction, 6))
    return _once(fractions, option)


def parse_budgets(values: Iterable[str | int], option: str = "--budgets") -> list[int]:
    """Budgets in epochs as given (`["50", "150"]`, `["50,150"]` or ints), each an integer in [1, MAX_BUDGET],
    none twice; `RunIdentityError` naming the option otherwise. Checked before anything is written; which of them is
    the recipe's own budget (no suffix) is `named_budget`'s to say."""
    budgets = []
    for item in _listed(values, option):
        try:
            budget = int(item) if not isinstance(item, (bool, float)) else None
        except ValueError:
            budget = None
        if budget is None or str(item).strip() != str(budget) or not 1 <= budget <= MAX_BUDGET:
            raise RunIdentityError(f"{option}: a budget is a whole number of epochs in [1, {MAX_BUDGET}], "
                                   f"got {item!r}")
        budgets.append(budget)
    return _once(budgets, option)


def named_budget(epochs: int | None, recipe_epochs: int) -> int | None:
    """What a run's identity says of a budget of `epochs` under a recipe of `recipe_epochs`: None (the recipe's own:
    the run keeps its name) when they agree or no budget was asked for, the epochs otherwise (`_ep{E}`)."""
    return None if epochs is None or epochs == recipe_epochs else epochs


def _listed(values: Iterable[str | int | float], option: str) -> list[str | int | float]:
    items = [part.strip() if isinstance(value, str) else value
             for value in ([values] if isinstance(values, (str, int, float)) else values)
             for part in (value.split(",") if isinstance(value, str) else [value])
             if not isinstance(part, str) or part.strip()]
    if not items:
        raise RunIdentityError(f"{option}: no value given")
    return items


def _once(values: list, option: str) -> list:
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise RunIdentityError(f"{option}: {', '.join(map(str, repeated))} given more than once")
    return values


@dataclass(frozen=True)
class RunSpec:
    """One run of one registered task: its identity, its task and dataset folder, its fold and plans."""

    task: str  # registry key, e.g. "Task613_COVID-19-20"
    dataset: str  # nnU-Net dataset folder name, e.g. "Dataset613_COVID-19-20"
    identity: Identity
    fold: str = "all"
    plans: str = ""  # "" means the model's default plans (`backbones.default_plans`)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fold", str(self.fold))
        object.__setattr__(self, "plans", self.plans or backbones.default_plans(self.identity.model))
        if self.fold not in FOLDS:
            raise RunIdentityError(f"fold must be 'all' or 0-4, got {self.fold!r}")
        if JOB_SEPARATOR in self.task:
            raise RunIdentityError(f"task key {self.task!r} contains {JOB_SEPARATOR!r}, which separates the parts of "
                                   "a job id")

    @classmethod
    def of(cls, entry: "DatasetEntry", model: str, init: str | bool, fold: str | int = "all", *,
           recipe: str | None = None, seed: int = DEFAULT_SEED, fraction: float = DEFAULT_FRACTION,
           budget: int | None = None, plans: str = "") -> "RunSpec":
        """The run of `entry`; `init` is "pretrained"/"scratch" or a bool (pretrained); `budget` as `named_budget`
        gives it (None: the recipe's)."""
        if isinstance(init, bool):
            init = "pretrained" if init else "scratch"
        return cls(entry.key, entry.nnunet_name, Identity(model, init, recipe or "", seed, fraction, budget),
                   str(fold), plans)

    # the identity's parts, for callers that think in them
    model = property(lambda self: self.identity.model)
    init = property(lambda self: self.identity.init)
    recipe = property(lambda self: self.identity.recipe)
    seed = property(lambda self: self.identity.seed)
    fraction = property(lambda self: self.identity.fraction)
    budget = property(lambda self: self.identity.budget)
    trainer = property(lambda self: self.identity.trainer)

    @property
    def job_id(self) -> str:
        """`{task}__{model}__{init}[__{recipe}][__seed{N}][__frac{P}][__ep{E}]__fold_{fold}` (defaults left
        out)."""
        parts = self.trainer.split("_")[1:]
        return JOB_SEPARATOR.join([self.task, *parts, f"fold_{self.fold}"])

    @classmethod
    def from_job_id(cls, job_id: str, registry: "Registry") -> "RunSpec":
        parts = job_id.split(JOB_SEPARATOR)
        if len(parts) < 4 or not parts[-1].startswith("fold_"):
            raise RunIdentityError(f"not a job id: {job_id!r} (expected TASK__MODEL__INIT__fold_FOLD)")
        identity = Identity.from_trainer("_".join([TRAINER_PREFIX, *parts[1:-1]]))
        if identity is None:
            raise RunIdentityError(f"not a job id: {job_id!r} (its model, initialisation, recipe, seed, fraction "
                                   "or budget do not parse)")
        entry = registry.get(parts[0])
        return cls(entry.key, entry.nnunet_name, identity, parts[-1].removeprefix("fold_"))

    @classmethod
    def from_folder(cls, folder: str | Path, registry: "Registry") -> "RunSpec":
        """The run a folder `.../Dataset{id}_{Name}/{Trainer}__{Plans}__3d_fullres/fold_{fold}` holds."""
        folder = Path(folder)
        parts = folder.parent.name.split(JOB_SEPARATOR)
        match = re.match(r"^Dataset(\d+)_", folder.parent.parent.name)
        identity = Identity.from_trainer(parts[0]) if len(parts) == 3 else None
        if identity is None or match is None or parts[2] != CONFIGURATION or not folder.name.startswith("fold_"):
            raise RunIdentityError(f"{folder} is not a segbook run folder (expected Dataset{{id}}_{{Name}}/"
                                   f"{TRAINER_PREFIX}_...__{{plans}}__{CONFIGURATION}/fold_{{fold}})")
        entry = registry.get(f"Dataset{int(match[1])}")
        return cls(entry.key, folder.parent.parent.name, identity, folder.name.removeprefix("fold_"), parts[1])

    @classmethod
    def from_record(cls, run: dict[str, Any]) -> "RunSpec":
        """The run a `run.json` (or `summary.json`) `run` record names (`Identity.from_record`)."""
        return cls(run["task"], run["dataset"], Identity.from_record(run), str(run["fold"]),
                   run.get("plans", DEFAULT_PLANS))

    def trainer_folder(self, results: Path) -> Path:
        return Path(results) / self.dataset / JOB_SEPARATOR.join([self.trainer, self.plans, CONFIGURATION])

    def folder(self, results: Path) -> Path:
        return self.trainer_folder(results) / f"fold_{self.fold}"

    def describe(self) -> str:
        return f"{self.task} {self.identity.describe()}, fold {self.fold}"


@dataclass(frozen=True)
class FolderParts:
    """A run folder's parts as nnU-Net lays them out, without the registry (for collecting many runs fast)."""

    dataset_id: int
    identity: Identity
    plans: str
    fold: str

    @classmethod
    def parse(cls, folder: Path) -> "FolderParts | None":
        parts = folder.parent.name.split(JOB_SEPARATOR)
        match = re.match(r"^Dataset(\d+)_", folder.parent.parent.name)
        identity = Identity.from_trainer(parts[0]) if len(parts) == 3 else None
        if identity is None or match is None or not folder.name.startswith("fold_"):
            return None
        return cls(int(match[1]), identity, parts[1], folder.name.removeprefix("fold_"))


#: `glob` pattern of every segbook run folder under a results folder.
RUN_GLOB = f"Dataset*/{TRAINER_PREFIX}_*{JOB_SEPARATOR}*{JOB_SEPARATOR}{CONFIGURATION}/fold_*"


# --- a run folder's files -------------------------------------------------------------------------------------


def manifest_path(folder: Path) -> Path:
    return Path(folder) / MANIFEST


def evaluation_folder(folder: Path) -> Path:
    return Path(folder) / EVALUATION


def external_root(folder: Path) -> Path:
    """Where a run's external evaluations lie (one folder each)."""
    return evaluation_folder(folder) / EXTERNAL


def external_folder(folder: Path, tested_key: str, all_cases: bool = False) -> Path:
    """The folder of a run's evaluation on another dataset: its test split, or all its labelled cases."""
    return external_root(folder) / f"{tested_key}{ALL_CASES_SUFFIX if all_cases else ''}"


def summary_path(folder: Path) -> Path:
    return evaluation_folder(folder) / SUMMARY


#: A run's snapshots (`--snapshots`): the network at chosen points of its budget, and their evaluations, beside it.
SNAPSHOTS = "snapshots"
_SNAPSHOT_FILE = re.compile(r"^snapshot_ep(\d+)\.pth$")


def snapshots_folder(folder: Path) -> Path:
    return Path(folder) / SNAPSHOTS


def snapshot_path(folder: Path, epoch: int) -> Path:
    """The snapshot of a run after `epoch` epochs: `snapshots/snapshot_ep{epoch}.pth`."""
    return snapshots_folder(folder) / f"snapshot_ep{epoch}.pth"


def snapshot_epoch(path: Path) -> int | None:
    """The epoch a snapshot file's name says; None for any other file (or a name that is not the canonical one)."""
    match = _SNAPSHOT_FILE.match(Path(path).name)
    return int(match[1]) if match and Path(path).name == snapshot_path(Path(), int(match[1])).name else None


def snapshot_evaluation_folder(folder: Path, epoch: int) -> Path:
    """Where `segbook evaluate --snapshots` scores the snapshot after `epoch` epochs: `snapshots/evaluation_ep{E}/`
    (summary.json and metrics.csv as the run's own `evaluation/`), never read as the run's own scores."""
    return snapshots_folder(folder) / f"{EVALUATION}_ep{epoch}"


def is_evaluated(folder: Path) -> bool:
    return summary_path(folder).is_file()


def has_resumable_checkpoint(folder: Path) -> bool:
    return any((Path(folder) / name).is_file() for name in RESUMABLE_CHECKPOINTS)


# --- the pretrained file a run starts from --------------------------------------------------------------------


@dataclass(frozen=True)
class Weights:
    """The checkpoint a pretrained run starts from, and its SHA-256 (recorded in `run.json`)."""

    path: Path
    sha256: str


#: The key of `parse_weights`' file for every pretrained job (`--weights FILE`, as opposed to `MODEL=FILE`).
ANY_MODEL = "*"


def parse_weights(given: "str | Path | Iterable[str | Path] | dict[str, str] | None") -> dict[str, str]:
    """A batch's `--weights` as {model: absolute path}, `ANY_MODEL` for the file of every pretrained job: `FILE`
    (every pretrained job), `MODEL=FILE` (that model's jobs: a batch mixing backbones starts each from its own),
    repeatable. `RunIdentityError` for an unknown model or one given twice, before anything is written."""
    if given is None:
        return {}
    if isinstance(given, dict):  # parsed already (a batch's options as its workers read them back)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in given.items()):
            raise RunIdentityError(f"weights must map model names to files, got {given!r}")
        return dict(given)
    values = [given] if isinstance(given, (str, Path)) else list(given)
    items = [_weights_item(str(value)) for value in values]
    chosen: dict[str, str] = {}
    for model, file in items:
        if model != ANY_MODEL and model not in backbones.model_names():
            raise RunIdentityError(f"--weights {model}={file}: unknown model {model!r}; choose one of "
                                   f"{', '.join(backbones.model_names())}")
        if model in chosen:
            what = "a file for every model" if model == ANY_MODEL else f"model {model}"
            raise RunIdentityError(f"--weights: {what} given more than once")
        chosen[model] = str(Path(file).expanduser().resolve())
    return chosen


def _weights_item(value: str) -> tuple[str, str]:
    """`MODEL=FILE` -> (MODEL, FILE) when the part before `=` could be a model name; a plain file otherwise."""
    model, separator, file = value.partition("=")
    if separator and file and backbones.MODEL_NAME.fullmatch(model):
        return model, file
    return ANY_MODEL, value


def weights_given(weights: "dict[str, str]", model: str) -> str | None:
    """The file `parse_weights` gives a pretrained run of `model`: its own, else the one for every model (None:
    the backbone's catalogued checkpoint)."""
    return weights.get(model) or weights.get(ANY_MODEL)


def resolve_weights(model: str, given: str | Path | None, paths: "Paths",
                    say: Callable[[str], None] = print) -> Weights:
    """A given file wins; otherwise the cached official checkpoint, checked against the SHA-256 recorded when it
    was downloaded (a file put into the cache by hand has none: that is said, not hidden)."""
    from stunet import WeightCache, WeightsError
    from stunet.checkpoints import checksum_origin, file_sha256

    cache = WeightCache(paths.weights)
    cfg = backbones.get(model).pretrained
    if given is None and cfg is None:
        raise SegbookError(f"{backbones.get(model).label} has no official pretrained checkpoint: pass the file to "
                           "fine-tune from with --weights PATH")
    try:
        path = cache.resolve(None if given is not None else cfg, given)
    except WeightsError as error:
        raise SegbookError(str(error)) from None
    digest = file_sha256(path)
    if given is not None:
        return Weights(path.resolve(), digest)
    expected = cfg.sha256 or cache.recorded_sha256(cfg)
    if expected is None:
        say(f"segbook: warning: {path} has no recorded SHA-256 (it was not downloaded by `segbook weights "
            f"download`), so it cannot be verified; using it as it is (SHA-256 {digest}, recorded in run.json)")
    elif digest != expected:
        raise SegbookError(f"{path} is corrupted: SHA-256 {digest} differs from the {checksum_origin(cfg)} "
                           f"{expected}; delete it and run `segbook weights download {model}` again")
    return Weights(path.resolve(), digest)


def identity_fields(spec: RunSpec) -> dict[str, Any]:
    """The `run` record of `run.json` and `summary.json`: who the run is."""
    return {"task": spec.task, "dataset": spec.dataset, "model": spec.model, "init": spec.init,
            "recipe": spec.recipe, "seed": spec.seed, "fraction": spec.fraction, "budget": spec.budget,
            "fold": spec.fold,
            "trainer": spec.trainer, "plans": spec.plans, "configuration": CONFIGURATION}


# --- the user's backbone a run recorded -----------------------------------------------------------------------

#: Largest `run.json` read for its backbone record (it keeps its epoch history apart, so it stays small).
MAX_MANIFEST_BYTES = 8 * 1024 * 1024


def recorded_backbone(folder: Path, run_code: bool = True) -> str | None:
    """Make the user's backbone a run folder's `run.json` records known again (`segbook.backbones.recorded.adopt`:
    running only the file it recorded, unchanged, and no code at all unless `run_code`), so its runs are found
    without --backbone-file. Returns why it is not the recorded one (file gone, changed); `RecordError` for a
    malformed record. Reads only: many processes may do this at once. A built-in model's run.json is not read."""
    from segbook.backbones import recorded

    record = _backbone_record(folder)
    return None if record is None else recorded.adopt(record, run_code)


def require_recorded_backbone(folder: Path) -> None:
    """`BackboneError` unless the backbone a run recorded is the one that would now be built (evaluation)."""
    from segbook.backbones import recorded

    record = _backbone_record(folder)
    if record is not None:
        try:
            recorded.require(record)
        except backbones.BackboneError as error:
            raise backbones.BackboneError(f"{manifest_path(folder)}: {error}") from None


def _backbone_record(folder: Path) -> Any:
    """The `backbone` record of a run of a user's model; None for a built-in model, or no readable record."""
    import json

    from segbook.backbones.recorded import KEY

    trainer = Path(folder).parent.name.split(JOB_SEPARATOR)[0].split("_")
    path = manifest_path(folder)
    if len(trainer) > 1 and trainer[1] in MODELS:
        return None
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a missing or damaged run.json is reported where the run's record is read
    return data.get(KEY) if isinstance(data, dict) else None
