"""A recipe's schedule applied to nnU-Net's optimiser: every group's rate, and what trains, at every epoch.

nnU-Net's `PolyLRScheduler` writes one rate into every group, which silently turns a 10x head back into 1x after the
first epoch. This scheduler sets each group from the recipe (`Recipe.rates`: its own initial rate, shaped by the
phase the epoch falls in) and tells the trainer which parts train in that phase. It is a function of the epoch
alone, so a resumed run follows exactly the schedule of an uninterrupted one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from segbook.recipes import Phase, Recipe


class RecipeSchedule:
    """Has the `step(epoch)` interface nnU-Net's trainer calls at the start of every epoch."""

    def __init__(self, optimizer: torch.optim.Optimizer, recipe: "Recipe", epochs: int,
                 on_phase: Callable[["Phase"], None] | None = None):
        self.optimizer = optimizer
        self.recipe = recipe
        self.epochs = epochs
        self.on_phase = on_phase
        self._epoch = 0

    def step(self, epoch: int | None = None) -> None:
        self._epoch = self._epoch + 1 if epoch is None else epoch
        rates = self.recipe.rates(self._epoch, self.epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = rates[group["name"]]
        if self.on_phase is not None:
            self.on_phase(self.recipe.phase_at(self._epoch, self.epochs))

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]
