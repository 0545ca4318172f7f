"""The training settings of a run: SegBook's defaults, their allowed ranges, and how two runs' settings differ.

The settings are stored in the run's `run.json` before training starts, so every process that trains the run reads
the same values. `validate()` is called wherever settings enter (the CLI parses with the same bounds, `finetune`,
the batch launchers and the trainer reading `run.json`), so nnU-Net never sees a value outside its range.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from segbook.options import Bound, OptionError, check_all

#: SegBook's learning rates: STU-Net's fine-tuning rate for pretrained bodies, nnU-Net's for scratch.
PRETRAINED_LR = 1e-3
SCRATCH_LR = 1e-2
PRECISIONS = ("auto", "bf16", "fp16")

#: Allowed ranges, named after the command-line options that set them.
BOUNDS: dict[str, Bound] = {
    "epochs": Bound("--epochs", int, low=1),
    "iterations_per_epoch": Bound("--iters-per-epoch", int, low=1),
    "val_iterations_per_epoch": Bound("--val-iters-per-epoch", int, low=1),
    "lr": Bound("--lr", float, low=0, low_inclusive=False),
    "head_lr_multiplier": Bound("--head-lr-multiplier", float, low=0, low_inclusive=False),
    "weight_decay": Bound("--weight-decay", float, low=0),
    "momentum": Bound("momentum", float, low=0, high=1, high_inclusive=False),
    "poly_exponent": Bound("poly_exponent", float, low=0, low_inclusive=False),
    "checkpoint_every": Bound("--checkpoint-every", int, low=1),
    "seed": Bound("--seed", int, low=0, high=2**32 - 1),
}
#: Settings that only say where a file lives: two runs from the same checkpoint at two paths are the same run.
LOCATION_ONLY = ("weights",)


@dataclass
class TrainingSettings:
    """Hyperparameters of one run; the defaults are SegBook's (nnU-Net's schedule, STU-Net's fine-tuning rates)."""

    epochs: int = 1000
    iterations_per_epoch: int = 250
    val_iterations_per_epoch: int = 50
    lr: float | None = None  # None: 1e-3 for pretrained bodies, 1e-2 from scratch
    head_lr_multiplier: float = 10.0
    weight_decay: float = 3e-5
    momentum: float = 0.99
    poly_exponent: float = 0.9
    checkpoint_every: int = 50
    seed: int = 12345
    mixed_precision: str = "auto"  # auto (bf16 where supported, else fp16 on CUDA), bf16, fp16
    channels_last: bool = False
    weights: str | None = None  # pretrained checkpoint file (pretrained runs)
    weights_sha256: str | None = None

    def validate(self) -> "TrainingSettings":
        """`OptionError` naming every value outside its range; the settings themselves when all are allowed."""
        check_all(asdict(self), BOUNDS)
        if self.mixed_precision not in PRECISIONS:
            raise OptionError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.mixed_precision!r}")
        return self

    def resolved_lr(self, init: str) -> float:
        if self.lr is not None:
            return self.lr
        return PRETRAINED_LR if init == "pretrained" else SCRATCH_LR

    def differences(self, other: "TrainingSettings", init: str) -> dict[str, tuple[Any, Any]]:
        """{setting: (mine, other's)} for every setting that changes what trains (rates compared resolved)."""
        mine, theirs = asdict(self), asdict(other)
        mine["lr"], theirs["lr"] = self.resolved_lr(init), other.resolved_lr(init)
        return {name: (mine[name], theirs[name]) for name in mine
                if name not in LOCATION_ONLY and mine[name] != theirs[name]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainingSettings":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
