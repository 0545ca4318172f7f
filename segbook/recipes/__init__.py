"""Fine-tuning recipes: what trains, at which rates, on which schedule; declarative YAML validated on load.

A recipe is data, like a dataset of the registry: the built-in ones ship in `segbook/recipes/builtin/*.yaml`
(`docs/recipes.md` says where each comes from), a user adds theirs with `--recipe-file FILE` or `SEGBOOK_RECIPES`
(os.pathsep-separated files). A file holds one recipe or a list of them under `recipes:`. Code exists here only for
what data cannot say: the rate of every parameter group at every epoch (`Recipe.rates`) and which parts train in
each phase (`Recipe.phase_at`); the trainer applies both.

Rates: the body's rate `optimizer.lr`; the heads' `lr x groups.head_multiplier`; with `groups.layer_decay` d, encoder
stage s of S gets `lr x d^(S-1-s)` (the deepest stage keeps the body's rate, the stem the smallest). Each group follows
the phases over the budget: `constant`, `linear-warmup` (rising to the full rate at the phase's last epoch) or `poly`
(nnU-Net's `(1 - t)^exponent` over the phase), and a part that does not train in a phase has rate 0 and no gradient.
"""

from __future__ import annotations

import os
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from segbook import backbones
from segbook.errors import SegbookError
from segbook.runs import RECIPE_NAME

RECIPES_ENV = "SEGBOOK_RECIPES"
Part = Literal["encoder", "decoder", "heads"]
#: What a phase trains: everything, the heads only, or the decoder and the heads.
TRAINS: dict[str, tuple[str, ...]] = {"all": ("encoder", "decoder", "heads"), "heads": ("heads",),
                                      "decoder+heads": ("decoder", "heads")}
#: Layer-wise decay's encoder groups, `encoder.0` (the stem's resolution) to `encoder.5` (the deepest): a recipe
#: with `layer_decay` fits a backbone whose parts have this many encoder stages (`Parts.encoder_stages`), and each
#: parameter trains in the group of the stage its backbone gives it (`Parts.part_of`).
LAYER_DECAY_STAGES = 6
#: The gradient norm nnU-Net 2.8.1 clips at in every training step (`nnUNetTrainer.train_step`, nnUNetTrainer.py
#: L1042, L1047): a recipe's `grad_clip_norm` unless it names another.
NNUNET_GRAD_CLIP_NORM = 12.0
#: The built-in recipes in the order they are listed: the paper's, the official code's, scratch, then the others.
BUILTIN_ORDER = ("segbook", "stunet-official", "scratch", "heads-only", "frozen-encoder", "llrd", "warmup", "lora",
                 "primus", "primus-scratch")


class RecipeError(SegbookError):
    """An unknown recipe, a malformed recipe file, or a recipe that does not fit the run."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Optimizer(_Model):
    """SGD as nnU-Net (momentum 0.99, Nesterov) or AdamW; `lr` is the body's initial rate."""

    kind: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(gt=0, allow_inf_nan=False)
    weight_decay: float = Field(default=3e-5, ge=0, allow_inf_nan=False)
    momentum: float = Field(default=0.99, ge=0, lt=1)
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.999)


class Groups(_Model):
    head_multiplier: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    layer_decay: float | None = Field(default=None, gt=0, le=1)


class Phase(_Model):
    """The budget up to `until` (a fraction of the epochs), training `train` at a rate shaped `rate`."""

    until: float = Field(gt=0, le=1)
    train: Literal["all", "heads", "decoder+heads"] = "all"
    rate: Literal["constant", "linear-warmup", "poly"] = "poly"


class Lora(_Model):
    """LoRA adapters (through PEFT) on the body's spatial convolutions; the body itself stays frozen."""

    rank: int = Field(ge=1)
    alpha: float = Field(gt=0, allow_inf_nan=False)
    dropout: float = Field(default=0.0, ge=0, lt=1)


class Budget(_Model):
    epochs: int = Field(default=1000, ge=1)
    iterations_per_epoch: int = Field(default=250, ge=1)


class Recipe(_Model):
    name: str
    description: str = Field(min_length=1)
    source: str = Field(min_length=1)
    init: Literal["pretrained", "scratch"]
    optimizer: Optimizer
    groups: Groups = Groups()
    frozen: tuple[Part, ...] = ()
    phases: tuple[Phase, ...] = (Phase(until=1.0),)
    poly_exponent: float = Field(default=0.9, gt=0, allow_inf_nan=False)
    lora: Lora | None = None
    budget: Budget = Budget()
    #: The total gradient norm every training step clips to (`torch.nn.utils.clip_grad_norm_`); nnU-Net's 12 unless
    #: given (nnU-Net's and OpenMind's Primus trainers clip at 1).
    grad_clip_norm: float = Field(default=NNUNET_GRAD_CLIP_NORM, gt=0, strict=True, allow_inf_nan=False)
    #: Stochastic depth: the largest drop-path rate of the network's blocks (dna's Primus rises linearly to it over
    #: its EVA blocks), for backbones whose builder takes one (`Backbone.drop_path`); None: the backbone's own (0).
    drop_path_rate: float | None = Field(default=None, ge=0, lt=1, strict=True, allow_inf_nan=False)

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not RECIPE_NAME.match(name):
            raise ValueError("use lower-case letters, digits and hyphens, starting with a letter")
        return name

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        ends = [phase.until for phase in self.phases]
        if not self.phases or ends != sorted(set(ends)) or ends[-1] != 1.0:
            raise ValueError(f"phases must end at increasing fractions of the budget, the last at 1.0 (got {ends})")
        if "heads" in self.frozen:
            raise ValueError("the heads are new for every task: they cannot be frozen")
        if self.init == "scratch" and (self.frozen or self.lora or any(p.train != "all" for p in self.phases)):
            raise ValueError("a scratch recipe trains every part from the first epoch (no frozen parts, LoRA or "
                             "partial phases: there is nothing pretrained to keep)")
        if self.lora and (self.frozen or self.groups.layer_decay):
            raise ValueError("lora freezes the body itself; it cannot be combined with frozen parts or layer_decay")
        return self

    # --- what trains, and how fast ------------------------------------------------------------------------------
    @property
    def parts_trained(self) -> tuple[str, ...]:
        """The parts that train in some phase (with LoRA: the adapters stand for encoder and decoder)."""
        trained = {part for phase in self.phases for part in TRAINS[phase.train]}
        return tuple(part for part in ("encoder", "decoder", "heads") if part in trained - set(self.frozen))

    @property
    def single_group(self) -> bool:
        """One rate for every parameter (nnU-Net's own setting), or groups of their own."""
        return self.groups.head_multiplier == 1.0 and self.groups.layer_decay is None

    @property
    def needs_parts(self) -> bool:
        """Whether the recipe must tell a network's encoder, decoder and heads apart (a backbone that names no
        parts can only train with one rate for all, everything training throughout)."""
        return not self.single_group or bool(self.frozen) or self.lora is not None or \
            any(phase.train != "all" for phase in self.phases)

    @property
    def trainable_parts(self) -> tuple[str, ...]:
        return tuple(part for part in ("encoder", "decoder", "heads") if part not in self.frozen)

    def group_names(self) -> list[str]:
        """The optimiser's groups, in order, over the parts that are not frozen: `all` (one rate); or the body
        (`body`, or `encoder`/`decoder` when the other is frozen) and `head`; or, with layer-wise decay,
        `encoder.0`..`encoder.5`, `decoder` and `head`."""
        if self.single_group:
            return ["all"]
        body = [part for part in ("encoder", "decoder") if part in self.trainable_parts]
        if self.groups.layer_decay is not None:
            stages = [f"encoder.{s}" for s in range(LAYER_DECAY_STAGES)] if "encoder" in body else []
            return stages + (["decoder"] if "decoder" in body else []) + ["head"]
        return ([("body" if len(body) == 2 else body[0])] if body else []) + ["head"]

    def group_of(self, part: str, stage: int | None) -> str | None:
        """The group a parameter of `part` (and encoder `stage`) trains in; None when its part is frozen."""
        if part not in self.trainable_parts:
            return None
        if self.single_group:
            return "all"
        if part == "heads":
            return "head"
        if self.groups.layer_decay is not None:
            return f"encoder.{stage}" if part == "encoder" else "decoder"
        return next(g for g in self.group_names() if g in ("body", part))

    def initial_rate(self, group: str) -> float:
        lr = self.optimizer.lr
        if group == "head":
            return lr * self.groups.head_multiplier
        if group.startswith("encoder."):
            return lr * self.groups.layer_decay ** (LAYER_DECAY_STAGES - 1 - int(group.split(".")[1]))
        return lr

    def group_parts(self, group: str) -> tuple[str, ...]:
        parts = {"all": ("encoder", "decoder", "heads"), "body": ("encoder", "decoder"), "head": ("heads",)}
        return tuple(p for p in parts.get(group, (group.split(".")[0],)) if p in self.trainable_parts)

    # --- the schedule -------------------------------------------------------------------------------------------
    def phase_spans(self, epochs: int) -> list[tuple[Phase, int, int]]:
        """Each phase with its first epoch and the epoch after its last (empty phases of a short budget left out)."""
        spans, start = [], 0
        for phase in self.phases:
            end = epochs if phase.until == 1.0 else min(epochs, round(phase.until * epochs))
            if end > start:
                spans.append((phase, start, end))
            start = max(start, end)
        return spans

    def phase_at(self, epoch: int, epochs: int) -> Phase:
        for phase, start, end in self.phase_spans(epochs):
            if start <= epoch < end:
                return phase
        return self.phase_spans(epochs)[-1][0]

    def trains_in(self, phase: Phase, group: str) -> bool:
        return any(part in TRAINS[phase.train] for part in self.group_parts(group))

    def rates(self, epoch: int, epochs: int) -> dict[str, float]:
        """Every group's learning rate at the start of `epoch` of a budget of `epochs` (0 where it does not train)."""
        for phase, start, end in self.phase_spans(epochs):
            if start <= epoch < end:
                break
        else:
            phase, start, end = self.phase_spans(epochs)[-1]
        factor = _shape(phase.rate, epoch - start, end - start, self.poly_exponent)
        return {group: self.initial_rate(group) * factor if self.trains_in(phase, group) else 0.0
                for group in self.group_names()}

    # --- fitting a run ------------------------------------------------------------------------------------------
    def check_fits(self, model: str, init: str, num_gpus: int = 1) -> None:
        """`RecipeError` when this recipe cannot train this run (before anything is planned or written)."""
        backbone = backbones.get(model)
        if init != self.init:
            other = backbone.default_recipe(init)
            raise RecipeError(f"recipe {self.name!r} is for {self.init} runs, and this run is {init} (its recipe "
                              f"is {other!r}{', the only one for scratch runs' if init == 'scratch' else ''})")
        parts = backbone.parts
        if self.needs_parts and parts is None:
            raise RecipeError(f"recipe {self.name!r} addresses a network's parts (encoder, decoder, heads), which "
                              f"{backbone.label} does not name: it trains only with one rate for all")
        if self.groups.layer_decay is not None and parts is not None and parts.encoder_stages != LAYER_DECAY_STAGES:
            stages = "a number of encoder stages its plans decide" if parts.encoder_stages is None else \
                f"{parts.encoder_stages} encoder stages"
            raise RecipeError(f"recipe {self.name!r} decays the rate over {LAYER_DECAY_STAGES} encoder stages, and "
                              f"{backbone.label} has {stages}")
        if self.drop_path_rate is not None and not backbone.drop_path:
            raise RecipeError(f"recipe {self.name!r} sets drop_path_rate {self.drop_path_rate:g}, and "
                              f"{backbone.label} ({backbone.name}) takes no drop-path rate: leave drop_path_rate out "
                              "of recipes for it")
        if num_gpus > 1 and len({phase.train for phase in self.phases}) > 1:
            raise RecipeError(f"recipe {self.name!r} changes what trains between phases, which nnU-Net's DDP "
                              "(--num-gpus > 1) cannot follow; train it on one GPU")

    def with_overrides(self, *, lr: float | None = None, head_multiplier: float | None = None,
                       weight_decay: float | None = None, epochs: int | None = None,
                       iterations_per_epoch: int | None = None) -> "Recipe":
        """The recipe as one run uses it: command-line values replace the recipe's."""
        optimizer = self.optimizer.model_copy(update={k: v for k, v in (("lr", lr), ("weight_decay", weight_decay))
                                                      if v is not None})
        groups = self.groups if head_multiplier is None else self.groups.model_copy(
            update={"head_multiplier": head_multiplier})
        budget = self.budget.model_copy(update={k: v for k, v in (("epochs", epochs),
                                                                  ("iterations_per_epoch", iterations_per_epoch))
                                                if v is not None})
        return Recipe.model_validate({**self.model_dump(), "optimizer": optimizer.model_dump(),
                                      "groups": groups.model_dump(), "budget": budget.model_dump()})

    def summary(self) -> dict[str, Any]:
        """One row of `segbook recipes`."""
        trains = "LoRA adapters + heads" if self.lora else ", ".join(self.parts_trained)
        rates = f"{self.optimizer.kind} {self.optimizer.lr:g}"
        if self.groups.head_multiplier != 1:
            rates += f", heads x{self.groups.head_multiplier:g}"
        if self.groups.layer_decay:
            rates += f", stage decay {self.groups.layer_decay:g}"
        schedule = " -> ".join(f"{p.rate}({p.train}) to {p.until:g}" for p in self.phases)
        return {"name": self.name, "init": self.init, "trains": trains, "rates": rates, "schedule": schedule,
                "source": self.source}


def _shape(rate: str, step: int, length: int, exponent: float) -> float:
    if rate == "constant":
        return 1.0
    if rate == "linear-warmup":
        return (step + 1) / length
    return (1 - step / length) ** exponent


# --- loading --------------------------------------------------------------------------------------------------


def builtin_folder() -> Path:
    return Path(str(resources.files("segbook.recipes").joinpath("builtin")))


@cache
def _builtin() -> tuple[Recipe, ...]:
    recipes = [recipe for file in builtin_folder().glob("*.yaml") for recipe in read_recipe_file(file)]
    return tuple(sorted(recipes, key=lambda r: (BUILTIN_ORDER + (r.name,)).index(r.name)))


def read_recipe_file(path: str | os.PathLike) -> list[Recipe]:
    """The recipes in one YAML file (one recipe, or a list under `recipes:`); one error listing every problem."""
    from segbook.yamlfile import YamlFileError, read_yaml

    path = Path(path).expanduser()
    try:
        data = read_yaml(path)
    except (OSError, YamlFileError) as error:
        raise RecipeError(f"cannot read recipe file {path}: {error}") from None
    items = data.get("recipes") if isinstance(data, dict) and set(data) == {"recipes"} else [data]
    if not isinstance(items, list) or not items:
        raise RecipeError(f"{path}: expected one recipe (a mapping with name, description, source, init, "
                          "optimizer, ...) or a list of them under 'recipes:'")
    recipes, problems = [], []
    for number, item in enumerate(items, start=1):
        try:
            recipes.append(Recipe.model_validate(item))
        except ValidationError as error:
            name = item.get("name") if isinstance(item, dict) else None
            problems += [f"{path}: recipe {name or f'#{number}'!r}, field '{'.'.join(map(str, e['loc'])) or '-'}': "
                         f"{e['msg']}" for e in error.errors()]
    if problems:
        raise RecipeError("invalid recipe file:\n  " + "\n  ".join(problems))
    return recipes


def recipe_files(extra: Iterable[str | os.PathLike] | None = None) -> list[Path]:
    """The user's recipe files: `SEGBOOK_RECIPES` (os.pathsep-separated), then `extra`."""
    from_env = [p for p in os.environ.get(RECIPES_ENV, "").split(os.pathsep) if p.strip()]
    return [Path(p).expanduser() for p in (*from_env, *(extra or ()))]


def load_recipes(files: Iterable[str | os.PathLike] | None = None) -> dict[str, Recipe]:
    """Built-in recipes, then those of `files` (and `SEGBOOK_RECIPES`), by name; a name given twice with different
    content is an error."""
    recipes: dict[str, Recipe] = {}
    origin: dict[str, str] = {}
    sources = [("built-in", r) for r in _builtin()]
    sources += [(str(file), r) for file in recipe_files(files) for r in read_recipe_file(file)]
    for where, recipe in sources:
        if recipe.name in recipes and recipes[recipe.name] != recipe:
            raise RecipeError(f"recipe {recipe.name!r} in {where} differs from the one in {origin[recipe.name]}; "
                              "give your recipe another name")
        recipes.setdefault(recipe.name, recipe)
        origin.setdefault(recipe.name, where)
    return recipes


def get_recipe(name: str | None, init: str, files: Sequence[str | os.PathLike] | None = None) -> Recipe:
    """The recipe `name` (None: the SegBook study's for `init`, `segbook.backbones.STUDY_RECIPES`), or a `RecipeError`
    listing the known ones."""
    recipes = load_recipes(files)
    name = name or backbones.STUDY_RECIPES[init]
    if name not in recipes:
        raise RecipeError(f"unknown recipe {name!r}; known: {', '.join(recipes)} (add yours with --recipe-file "
                          f"FILE or {RECIPES_ENV})")
    return recipes[name]


def resolved_recipe(data: dict[str, Any]) -> Recipe:
    """A recipe as a run recorded it in its `run.json` (untrusted: validated like a file)."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(f"the recipe recorded in run.json is not valid: {error.errors()[0]['msg']}") from None
