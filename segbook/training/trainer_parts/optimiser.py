"""The recipe on nnU-Net's optimiser: its parameter groups, each at its own rate, and what trains in each phase.

nnU-Net builds one SGD group over the whole network; a recipe (`segbook.recipes`) puts each parameter in a named
group (body, heads, encoder stages, ...) or freezes it, picks SGD or AdamW, and schedules every group's rate by
phase (`segbook.training.schedule`). Which group a parameter belongs to is the trainer's to say (`group_of`: the
network's parts are its backbone's); the rest is here.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn

from segbook.training.schedule import RecipeSchedule

if TYPE_CHECKING:
    from segbook.recipes import Phase, Recipe

#: A parameter's recipe group by its name (None: frozen).
GroupOf = Callable[[str, nn.Parameter], "str | None"]


class OptimiserGroups:
    """The recipe's groups on the optimiser of a budget of `epochs` epochs."""

    def __init__(self, recipe: "Recipe", epochs: int):
        self.recipe = recipe
        self.epochs = epochs
        self.optimizer: torch.optim.Optimizer | None = None

    def build(self, network: nn.Module, group_of: GroupOf) -> tuple[torch.optim.Optimizer, RecipeSchedule]:
        """The optimiser over the plain network's groups, and the schedule nnU-Net steps every epoch."""
        settings = self.recipe.optimizer
        groups = self.param_groups(network, group_of)
        if settings.kind == "adamw":
            optimizer = torch.optim.AdamW(groups, settings.lr, betas=settings.betas,
                                          weight_decay=settings.weight_decay)
        else:
            optimizer = torch.optim.SGD(groups, settings.lr, weight_decay=settings.weight_decay,
                                        momentum=settings.momentum, nesterov=settings.nesterov)
        self.optimizer = optimizer
        return optimizer, RecipeSchedule(optimizer, self.recipe, self.epochs, self.train_only)

    @contextlib.contextmanager
    def clipping(self) -> Iterator[None]:
        """For one training step: the recipe's gradient clipping. nnU-Net 2.8.1's `train_step` clips the total norm
        at 12 by calling `torch.nn.utils.clip_grad_norm_` (nnUNetTrainer.py L1042, L1047), a name it looks up as it
        calls it; during the step that name clips at the recipe's `grad_clip_norm` instead, so nnU-Net's step (its
        loss scaling, its order of unscale, clip and step) stays its own. At nnU-Net's 12 nothing is replaced."""
        from segbook.recipes import NNUNET_GRAD_CLIP_NORM

        max_norm = self.recipe.grad_clip_norm
        if max_norm == NNUNET_GRAD_CLIP_NORM:
            yield
            return
        nnunets = torch.nn.utils.clip_grad_norm_

        def clip_at_the_recipes(parameters, _nnunets_norm, *args, **kwargs):
            return nnunets(parameters, max_norm, *args, **kwargs)

        torch.nn.utils.clip_grad_norm_ = clip_at_the_recipes
        try:
            yield
        finally:
            torch.nn.utils.clip_grad_norm_ = nnunets

    def param_groups(self, network: nn.Module, group_of: GroupOf) -> list[dict[str, Any]]:
        """The recipe's groups in its order; frozen parameters stay out of the optimiser and get no gradient."""
        groups: dict[str, list[nn.Parameter]] = {name: [] for name in self.recipe.group_names()}
        for name, parameter in network.named_parameters():
            group = group_of(name, parameter)
            parameter.requires_grad_(group is not None)
            if group is not None:
                groups[group].append(parameter)
        return [{"name": name, "params": params, "lr": self.recipe.initial_rate(name)}
                for name, params in groups.items() if params]

    def train_only(self, phase: "Phase") -> None:
        """Give gradients to the groups that train in this phase only (the others also have rate 0)."""
        for group in self.optimizer.param_groups:
            trains = self.recipe.trains_in(phase, group["name"])
            for parameter in group["params"]:
                parameter.requires_grad_(trains)

    def parameter_counts(self, network: nn.Module) -> dict[str, int]:
        """The parameters the optimiser trains and those it leaves frozen (`run.json`'s `parameters`)."""
        trainable = sum(p.numel() for group in self.optimizer.param_groups for p in group["params"])
        return {"trainable": trainable, "frozen": sum(p.numel() for p in network.parameters()) - trainable}
