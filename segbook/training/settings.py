"""The training settings of a run, their allowed ranges, and how they combine with its recipe.

The recipe (`segbook.recipes`) says what trains at which rates on which schedule and for how long; the settings say
everything else (validation iterations, checkpoints, precision, the weights file) and may replace the
recipe's body rate, head multiplier, weight decay and budget (`--lr`, `--epochs`, ...; None keeps the recipe's).
Both are stored in the run's `run.json` before training starts, the recipe resolved, so every process that trains
the run (a resume, a requeued SLURM job, `nnUNetv2_train`) reads the same values. `validate()` is called wherever
settings enter (the CLI parses with the same bounds), so nnU-Net never sees a value outside its range.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from segbook.options import Bound, OptionError, check_all

if TYPE_CHECKING:
    from segbook.recipes import Recipe

PRECISIONS = ("auto", "bf16", "fp16")
#: How a pretrained single-channel stem is tiled across a task's input channels (`stunet.loading.TILINGS`, spelled
#: out so that parsing options needs no torch): `repeat`, the official loaders' way, or `mean`.
STEM_TILINGS = ("repeat", "mean")
#: What runs recorded before the setting existed did.
LEGACY_STEM_TILING = "mean"
#: The help's word for `stem_tiling` None: the checkpoint's format decides (`segbook.backbones.FORMAT_STEM_TILINGS`),
#: once the file is read; run.json records the rule that was applied.
FORMAT_RULE = "the checkpoint format's rule"

#: Allowed ranges, named after the command-line options that set them.
BOUNDS: dict[str, Bound] = {
    "epochs": Bound("--epochs", int, low=1),
    "iterations_per_epoch": Bound("--iters-per-epoch", int, low=1),
    "val_iterations_per_epoch": Bound("--val-iters-per-epoch", int, low=1),
    "lr": Bound("--lr", float, low=0, low_inclusive=False),
    "head_lr_multiplier": Bound("--head-lr-multiplier", float, low=0, low_inclusive=False),
    "weight_decay": Bound("--weight-decay", float, low=0),
    "checkpoint_every": Bound("--checkpoint-every", int, low=1),
}
#: Settings that replace a value of the recipe (None: the recipe's).
RECIPE_OVERRIDES = ("lr", "head_lr_multiplier", "weight_decay", "epochs", "iterations_per_epoch")
#: Settings that only say where a file lives: two runs from the same checkpoint at two paths are the same run.
LOCATION_ONLY = ("weights",)


@dataclass
class TrainingSettings:
    """What a run needs besides its recipe; None for a recipe's value means "the recipe's"."""

    epochs: int | None = None
    iterations_per_epoch: int | None = None
    val_iterations_per_epoch: int = 50
    lr: float | None = None
    head_lr_multiplier: float | None = None
    weight_decay: float | None = None
    checkpoint_every: int = 50
    mixed_precision: str = "auto"  # auto (bf16 where supported, else fp16 on CUDA), bf16, fp16
    channels_last: bool = False
    weights: str | None = None  # pretrained checkpoint file (pretrained runs)
    weights_sha256: str | None = None
    stem_tiling: str | None = None  # pretrained runs, several input channels: repeat, mean, None the format's rule
    #: Percentages of the budget after which the network is kept (`--snapshots`; `snapshot_epochs`), ascending.
    snapshots: list[int] = field(default_factory=list)

    def validate(self) -> "TrainingSettings":
        """`OptionError` naming every value outside its range; the settings themselves when all are allowed."""
        check_all(asdict(self), BOUNDS)
        if self.mixed_precision not in PRECISIONS:
            raise OptionError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.mixed_precision!r}")
        if self.stem_tiling is not None and self.stem_tiling not in STEM_TILINGS:
            raise OptionError(f"--stem-tiling must be one of {', '.join(STEM_TILINGS)}, got {self.stem_tiling!r}")
        self.snapshots = parse_snapshots(self.snapshots) if self.snapshots else []
        if self.epochs is not None and self.snapshots:
            snapshot_epochs(self.snapshots, self.epochs)
        return self

    def resolve(self, recipe: "Recipe") -> tuple["TrainingSettings", "Recipe"]:
        """The recipe with these settings' values in place of its own, and these settings with the budget filled in
        (so `epochs` always says how long the run trains)."""
        resolved = recipe.with_overrides(lr=self.lr, head_multiplier=self.head_lr_multiplier,
                                         weight_decay=self.weight_decay, epochs=self.epochs,
                                         iterations_per_epoch=self.iterations_per_epoch)
        return replace(self, epochs=resolved.budget.epochs,
                       iterations_per_epoch=resolved.budget.iterations_per_epoch), resolved

    def differences(self, other: "TrainingSettings") -> dict[str, tuple[Any, Any]]:
        """{setting: (mine, other's)} for the settings outside the recipe that change what trains (compare the
        resolved recipes for the rest)."""
        mine, theirs = asdict(self), asdict(other)
        return {name: (mine[name], theirs[name]) for name in mine
                if name not in LOCATION_ONLY + RECIPE_OVERRIDES and mine[name] != theirs[name]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainingSettings":
        """Settings as recorded (`run.json`, a batch's options). A record without `stem_tiling` was written before
        the option existed, when the stem was always tiled with the mean: it reads as such; null is the checkpoint
        format's rule (a batch's options; a run records the rule it resolved to). A `seed` in older records is
        ignored: the seed is now the run's (`segbook.runs.Identity.rng_seed`)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        return cls(**{"stem_tiling": LEGACY_STEM_TILING, **values})


def parse_snapshots(values: Any, option: str = "--snapshots") -> list[int]:
    """Snapshot points as given (`["25", "50"]`, `["25,50"]` or ints): whole percentages of the budget in [1, 99]
    (100 is the run's final checkpoint), none twice; ascending. `OptionError` naming the option otherwise."""
    items = [part.strip() if isinstance(part, str) else part
             for value in ([values] if isinstance(values, (str, int)) else values)
             for part in (value.split(",") if isinstance(value, str) else [value]) if str(part).strip()]
    percents = []
    for item in items:
        text = str(item)
        if isinstance(item, bool) or not text.isdigit() or not 1 <= int(text) <= 99 or text != str(int(text)):
            raise OptionError(f"{option}: a snapshot is a whole percentage of the budget in [1, 99] (100 is the "
                              f"final checkpoint), got {item!r}")
        percents.append(int(text))
    if not percents:
        raise OptionError(f"{option}: no value given")
    repeated = sorted({p for p in percents if percents.count(p) > 1})
    if repeated:
        raise OptionError(f"{option}: {', '.join(map(str, repeated))} given more than once")
    return sorted(percents)


def snapshot_epochs(percents: list[int], epochs: int) -> dict[int, int]:
    """{percent: the epochs trained when it is kept}: the first whole epoch at or past the percentage of the
    budget (ceil(P x E / 100)). `OptionError` when one falls on the budget's last epoch (that is the final
    checkpoint) or two on the same epoch: a budget too short for the points asked for."""
    at = {percent: math.ceil(percent * epochs / 100) for percent in percents}
    last = [p for p, epoch in at.items() if epoch >= epochs]
    if last:
        raise OptionError(f"--snapshots {', '.join(map(str, last))}: falls on the last epoch of a budget of {epochs} "
                          "epochs, which is the run's final checkpoint; choose smaller percentages or a longer budget")
    shared = {epoch: [p for p in at if at[p] == epoch] for epoch in at.values()}
    clash = next((points for points in shared.values() if len(points) > 1), None)
    if clash:
        raise OptionError(f"--snapshots {', '.join(map(str, clash))}: all fall on epoch {at[clash[0]]} of a budget of "
                          f"{epochs} epochs; choose fewer points or a longer budget")
    return at


def recipe_differences(mine: "Recipe", other: "Recipe") -> dict[str, tuple[Any, Any]]:
    """{field: (mine, other's)} between two resolved recipes, fields spelled as in the recipe files
    (`optimizer.lr`, `budget.epochs`, ...)."""
    flat_mine, flat_other = _flatten(mine.model_dump(mode="json")), _flatten(other.model_dump(mode="json"))
    return {key: (flat_mine.get(key), flat_other.get(key)) for key in sorted(set(flat_mine) | set(flat_other))
            if key not in ("description", "source") and flat_mine.get(key) != flat_other.get(key)}


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
