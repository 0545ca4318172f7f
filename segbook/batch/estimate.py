"""GPU-hours of a job, from the network's FLOPs, the task's plans and the training budget.

    training    3 x forward FLOPs(patch) x batch size x iterations per epoch x epochs
                (the backward pass costs about twice the forward one)
    validation  forward FLOPs(patch) x batch size x validation iterations per epoch x epochs
    prediction  forward FLOPs(patch) x sliding windows x 8 mirrorings, for every test case (and, for folds 0-4,
                nnU-Net's final validation of the fold's validation cases)
    GPU-hours   all of it / (assumed sustained TFLOP/s x 3600)

The forward FLOPs are counted on the meta device (stunet.count_forward_macs, 2 FLOPs per multiply-accumulate) of
each job's backbone (`segbook.backbones`) for the task's own input channels and classes, at the patch and strides of
the nnU-Net plans that backbone trains on (nnUNetPlans, or nnUNetResEncUNet{M,L}Plans for ResEnc), or, before they
are planned, at the SegBook authors' reference patch (`reference_patch_size` in the registry) with nnU-Net's default
strides and batch size 2. Sliding windows per case come from the plans' median image size (step 0.5, nnU-Net's
rule); without plans a case is assumed to need 8 windows.

`DEFAULT_ASSUMED_TFLOPS` (40) is a sustained rate, not a peak (3-D convolutions with instance norm, mixed precision
and nnU-Net's data pipeline use a small fraction of an A100's 312 dense bf16 TFLOP/s). It is calibrated on nnU-Net's
own network: "nnU-Net Revisited" (Isensee et al., 2024) reports about 9 hours per 1000-epoch training of it on an
A100, and at 40 TFLOP/s this estimate gives about 10 hours for it at a 128^3 patch and batch 2 (0.47 TMACs per
patch). Measure your GPU with `scripts/bench_train.py` (its TFLOP/s column) and pass --assumed-tflops.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from segbook.batch.jobs import Job
from segbook.io import atomic_write_json
from segbook.paths import Paths
from segbook.training.settings import TrainingSettings

if TYPE_CHECKING:
    import torch

DEFAULT_ASSUMED_TFLOPS = 40.0
DEFAULT_BATCH_SIZE = 2  # nnU-Net's 3d_fullres batch size for almost every dataset
UNPLANNED_WINDOWS = 8
MIRRORINGS = 8
STEP_SIZE = 0.5
CV_FOLDS = 5


def nnunet_default_strides(patch: Sequence[int]) -> list[list[int]]:
    """nnU-Net's rule, simplified: halve each axis while it stays >= 8 voxels, at most 5 times."""
    strides, size = [[1, 1, 1]], list(patch)
    while len(strides) < 6 and any(s >= 16 for s in size):
        step = [2 if s >= 16 else 1 for s in size]
        size = [s // k for s, k in zip(size, step)]
        strides.append(step)
    return strides


def build_network(model: str, patch: Sequence[int], channels: int, classes: int,
                  strides: Sequence[Sequence[int]] | None = None) -> "torch.nn.Module":
    """The network whose FLOPs estimate `model`'s jobs, at the patch and the plans' strides (default: nnU-Net's rule
    for the patch), as its backbone says (`segbook.backbones.models.cost_network`). Build it under
    `torch.device("meta")` to count."""
    from segbook import backbones
    from segbook.backbones.models import cost_network

    return cost_network(backbones.get(model), patch, strides or nnunet_default_strides(patch), channels, classes)


@dataclass(frozen=True)
class Geometry:
    """What the estimate needs from a task's plans (or, unplanned, from its registry entry)."""

    patch: tuple[int, ...]
    batch_size: int
    strides: tuple[tuple[int, ...], ...]
    median_shape: tuple[int, ...] | None
    source: str  # "plans" or "reference"
    plans_file: str | None = None  # the plans it comes from: backbones whose shapes follow the plans build from them

    def windows(self) -> int:
        """Sliding windows per case (nnU-Net's steps at step size 0.5)."""
        if self.median_shape is None:
            return UNPLANNED_WINDOWS
        return math.prod(1 if size <= tile else math.ceil((size - tile) / (tile * STEP_SIZE)) + 1
                         for size, tile in zip(self.median_shape, self.patch))


def task_geometry(entry, paths: Paths, planner: str = "default") -> Geometry | None:
    """From the task's 3d_fullres plans of `planner` when they are current, else its reference patch; None
    without either."""
    from segbook.plan import load_plan, plan_states

    if plan_states(entry, paths).get(planner) == "preprocessed":
        plan = load_plan(entry, paths, planner)
        config = json.loads(plan.plans_file.read_text())["configurations"]["3d_fullres"]
        median = config.get("median_image_size_in_voxels")
        return Geometry(tuple(plan.patch_size), plan.batch_size, tuple(map(tuple, plan.nnunet_strides)),
                        tuple(int(round(v)) for v in median) if median else None, "plans", str(plan.plans_file))
    if entry.reference_patch_size is None:
        return None
    patch = tuple(entry.reference_patch_size)
    return Geometry(patch, DEFAULT_BATCH_SIZE, tuple(map(tuple, nnunet_default_strides(patch))), None, "reference")


class ForwardFlops:
    """Forward FLOPs per (model, patch, strides, channels, classes), counted once and kept in a JSON file:
    counting takes 0.1-0.3 s per network, the whole registry has a few hundred."""

    def __init__(self, cache_file: Path | None = None):
        self.cache_file = cache_file
        self.known: dict[str, int] = {}
        if cache_file is not None and cache_file.is_file():
            self.known = json.loads(cache_file.read_text())
        self.changed = False

    def __call__(self, model: str, geometry: Geometry, channels: int, classes: int) -> int:
        from segbook import backbones

        planned = [geometry.source] if backbones.get(model).shapes_from_plans else []  # built from the plans, or not
        key = json.dumps([model, geometry.patch, geometry.strides, channels, classes, *planned])
        if key not in self.known:
            self.known[key] = _count(model, geometry, channels, classes)
            self.changed = True
        return self.known[key]

    def save(self) -> None:
        if self.cache_file is not None and self.changed:
            atomic_write_json(self.cache_file, self.known)


def _count(model: str, geometry: Geometry, channels: int, classes: int) -> int:
    """Forward FLOPs of the job's network: built from the task's plans where the backbone's shapes follow them
    (ResEnc, as nnU-Net builds it), else from the patch and strides (`build_network`)."""
    import torch

    from segbook import backbones
    from segbook.backbones.models import build
    from stunet import count_forward_macs

    backbone = backbones.get(model)
    with torch.device("meta"):
        if geometry.plans_file is not None and backbone.shapes_from_plans:
            from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

            configuration = PlansManager(geometry.plans_file).get_configuration("3d_fullres")
            network = build(backbone, configuration, channels, classes)
        else:
            network = build_network(model, geometry.patch, channels, classes, geometry.strides)
    return 2 * count_forward_macs(network, (1, channels, *geometry.patch))


@dataclass(frozen=True)
class Estimate:
    job: str
    geometry: Geometry
    forward_flops: int  # one patch
    training_flops: float
    validation_flops: float
    prediction_flops: float
    epochs: int
    assumed_tflops: float

    def hours(self, flops: float) -> float:
        return flops / (self.assumed_tflops * 1e12) / 3600

    @property
    def gpu_hours(self) -> float:
        return self.hours(self.training_flops + self.validation_flops + self.prediction_flops)

    def remaining_gpu_hours(self, epochs_done: int, evaluated: bool = False) -> float:
        """What is left of it: the epochs not trained yet, and the prediction unless evaluated."""
        left = max(0.0, 1 - epochs_done / self.epochs) if self.epochs else 0.0
        return self.hours(left * (self.training_flops + self.validation_flops)
                          + (0.0 if evaluated else self.prediction_flops))


def estimate_job(job: Job, settings: TrainingSettings, geometry: Geometry, flops: ForwardFlops,
                 assumed_tflops: float = DEFAULT_ASSUMED_TFLOPS) -> Estimate:
    """The job's FLOPs from its budget (epochs x iterations per epoch x batch) and its prediction. The training
    fraction does not enter: nnU-Net draws a fixed number of batches per epoch whatever the number of training cases,
    so a run on 10% of them trains as long as one on all of them, and every run predicts the whole test split."""
    from segbook.recipes import get_recipe

    if settings.epochs is None or settings.iterations_per_epoch is None:  # the recipe's budget
        settings = settings.resolve(get_recipe(job.spec.recipe, job.spec.init))[0]
    entry = job.entry
    forward = flops(job.spec.model, geometry, len(entry.channels), len(entry.labels))
    per_epoch = geometry.batch_size * forward
    predicted = entry.test_cases + (math.ceil(entry.train_cases / CV_FOLDS) if job.spec.fold != "all" else 0)
    return Estimate(job.id, geometry, forward,
                    training_flops=3.0 * per_epoch * settings.iterations_per_epoch * settings.epochs,
                    validation_flops=per_epoch * settings.val_iterations_per_epoch * settings.epochs,
                    prediction_flops=float(forward) * geometry.windows() * MIRRORINGS * predicted,
                    epochs=settings.epochs, assumed_tflops=assumed_tflops)


def estimate_jobs(jobs: Sequence[Job], settings_for, paths: Paths,
                  assumed_tflops: float = DEFAULT_ASSUMED_TFLOPS) -> dict[str, Estimate | None]:
    """Estimates by job id (None for a task without plans or reference patch); `settings_for(job)` gives each
    job's budget. Forward FLOPs are cached in `$SEGBOOK_HOME/batch/flops.json`."""
    from segbook.backbones import planner_for

    flops = ForwardFlops(paths.batch / "flops.json")
    geometries: dict[tuple[str, str], Geometry | None] = {}
    estimates = {}
    try:
        for job in _progress(jobs, flops):
            planner = planner_for(job.spec.model)
            key = (job.entry.key, planner)
            if key not in geometries:
                geometries[key] = task_geometry(job.entry, paths, planner)
            geometry = geometries[key]
            estimates[job.id] = None if geometry is None else estimate_job(job, settings_for(job), geometry, flops,
                                                                           assumed_tflops)
    finally:
        flops.save()
    return estimates


def _progress(jobs: Sequence[Job], flops: ForwardFlops):
    """A progress bar when FLOPs have to be counted for many networks (the first estimate of a big matrix)."""
    from tqdm import tqdm

    return tqdm(jobs, desc="estimating", unit="job", disable=len(jobs) < 20 or bool(flops.known), leave=False)
