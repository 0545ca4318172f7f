"""Poly learning-rate decay applied to each parameter group from its own initial rate.

nnU-Net's `PolyLRScheduler` writes one rate into every group, which silently turns a 10x head back into 1x after the
first epoch. This scheduler keeps each group's ratio to the others fixed for the whole run.
"""

from __future__ import annotations

import torch


class PerGroupPolyLR:
    """lr_g(epoch) = initial_lr_g * (1 - epoch / max_epochs) ** exponent, for each group g.

    Has the `step(epoch)` interface nnU-Net's trainer calls at the start of every epoch.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_epochs: int, exponent: float = 0.9):
        self.optimizer = optimizer
        self.max_epochs = max_epochs
        self.exponent = exponent
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self._epoch = 0

    def factor(self, epoch: int) -> float:
        return (1 - epoch / self.max_epochs) ** self.exponent

    def step(self, epoch: int | None = None) -> None:
        self._epoch = self._epoch + 1 if epoch is None else epoch
        factor = self.factor(self._epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]
