"""How a run is evaluated: sliding-window prediction and metric settings, with their allowed ranges."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from segbook.options import Bound, OptionError, check_all
from segbook.runs import FINAL_CHECKPOINT

EMPTY_DICE = ("nan", "one")
STEP_SIZE = Bound("--step-size", float, low=0, low_inclusive=False, high=1)
BOUNDS = {"step_size": STEP_SIZE, "nsd_tolerance_mm": Bound("--nsd-tolerance", float, low=0, low_inclusive=False)}


@dataclass(frozen=True)
class EvaluationSettings:
    step_size: float = 0.5
    gaussian: bool = True
    mirroring: bool = True
    nsd_tolerance_mm: float | None = None  # None: the registry's per-dataset value (default 2 mm)
    empty_dice: str = "nan"
    checkpoint: str = FINAL_CHECKPOINT

    def __post_init__(self) -> None:
        check_all(asdict(self), BOUNDS)
        if self.empty_dice not in EMPTY_DICE:
            raise OptionError(f"--empty-dice must be one of {', '.join(EMPTY_DICE)}, got {self.empty_dice!r}")
