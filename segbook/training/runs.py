"""The identity of a run: (task, model, initialisation, fold) -> trainer class name and results folder.

Scratch and fine-tuned runs of the same network must never share a folder, and nnU-Net names its folders after the
trainer class, so each (model, initialisation) pair gets its own trainer: `SegbookTrainer_{model}_{init}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STUNET_MODELS = ("tiny", "small", "base", "large", "huge")
MODELS = (*STUNET_MODELS, "nnunet")
INITS = ("pretrained", "scratch")
FOLDS = ("all", "0", "1", "2", "3", "4")
CONFIGURATION = "3d_fullres"
DEFAULT_PLANS = "nnUNetPlans"
TRAINER_PREFIX = "SegbookTrainer"


def trainer_name(model: str, init: str) -> str:
    return f"{TRAINER_PREFIX}_{model}_{init}"


def parse_trainer_name(name: str) -> tuple[str, str] | None:
    """(model, init) for a segbook trainer name, None for any other trainer."""
    parts = name.split("_")
    if len(parts) == 3 and parts[0] == TRAINER_PREFIX and parts[1] in MODELS and parts[2] in INITS:
        return parts[1], parts[2]
    return None


def valid_combinations() -> list[tuple[str, str]]:
    """nnU-Net's default network has no pretrained checkpoint: it is the paper's scratch baseline."""
    return [(m, i) for m in MODELS for i in INITS if not (m == "nnunet" and i == "pretrained")]


@dataclass(frozen=True)
class RunSpec:
    task: str  # registry key, e.g. "Task613_COVID-19-20"
    dataset: str  # nnU-Net dataset folder name, e.g. "Dataset613_COVID-19-20"
    model: str
    init: str
    fold: str = "all"
    plans: str = DEFAULT_PLANS

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.init not in INITS:
            raise ValueError(f"unknown initialisation {self.init!r}; choose one of {', '.join(INITS)}")
        if (self.model, self.init) not in valid_combinations():
            raise ValueError("nnU-Net's default network has no pretrained weights: use --model nnunet with --scratch")
        if str(self.fold) not in FOLDS:
            raise ValueError(f"fold must be 'all' or 0-4, got {self.fold!r}")

    @property
    def trainer(self) -> str:
        return trainer_name(self.model, self.init)

    @property
    def job_id(self) -> str:
        return f"{self.task}__{self.model}__{self.init}__fold_{self.fold}"

    def trainer_folder(self, results: Path) -> Path:
        return Path(results) / self.dataset / f"{self.trainer}__{self.plans}__{CONFIGURATION}"

    def folder(self, results: Path) -> Path:
        return self.trainer_folder(results) / f"fold_{self.fold}"
