"""`--plans checkpoint`: nnU-Net plans of a task around a pretrained checkpoint's own network.

A task's own ResEnc plans choose the network from the task (a small task gets 4 stages, an anisotropic one [1,3,3]
kernels), and an nnssl ResEnc-L checkpoint (6 stages, 3x3x3 kernels) then fits no network nnU-Net plans for it. nnU-Net
HEAD (unreleased after 2.8.1, `documentation/finetuning_from_nnssl_checkpoints.md` L47-60) calls adapting the
architecture to the checkpoint "the recommended default"; its `preprocess_like_nnssl` edits a copied plans file and
takes the checkpoint's recommended patch without a memory check (`experiment_planning/like_nnssl.py` L86-198).

segbook instead subclasses nnU-Net 2.8.1's `nnUNetPlannerResEncL`, as `segbook.reference_plans` subclasses its
default planner, and changes only the 3d_fullres configuration: the architecture is the checkpoint's
(`segbook.backbones.nnssl.checkpoint_architecture`); the patch starts per axis at the smaller of the checkpoint's
recommended patch and the task's median shape rounded up to the network's total stride, and shrinks by nnU-Net's own
rule (`ExperimentPlanner.get_plans_for_configuration`, default_experiment_planner.py L321-368: the axis with the
largest patch/median ratio, while the feature-map estimate exceeds ResEnc-L's reference, 2.1e9 at 24 GB) one stride at
a time, so every axis stays a multiple of the total stride, at least two (a 1-voxel bottleneck cannot train
its InstanceNorm); the batch size is nnU-Net's formula (L372-378),
floored at 2. Spacing, normalisation and resampling stay the task's (nnU-Net HEAD's CLI default, `default_nnunet`).

The plans identifier carries a digest of the architecture (`SegbookCheckpointResEncL_<sha8>Plans`), and the data
identifier derives from it, so two networks never share plans or preprocessed data with each other or with the
default plans (nnU-Net's ResEnc planners would otherwise reuse `nnUNetPlans_3d_fullres`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from segbook.backbones import PLANNERS, Planner
from segbook.errors import SegbookError

if TYPE_CHECKING:
    from segbook.backbones.nnssl import CheckpointArchitecture

#: The `--plans` choice that plans a task around the checkpoint given with --weights.
CHECKPOINT_PLANS = "checkpoint"
#: The smallest batch nnU-Net plans (`ExperimentPlanner.UNet_min_batch_size`).
MIN_BATCH = 2
#: nnU-Net's reference batch for its memory estimate (`ref_bs`, L318): the estimate is per two samples.
REFERENCE_BATCH = 2
#: Bottleneck voxels per axis at least: at 1 voxel (a patch of one stride everywhere) the bottleneck's
#: InstanceNorm refuses to train ("Expected more than 1 spatial element"), found by the done-when test.
MIN_BOTTLENECK = 2
#: A task axis shorter than this fraction of the network's total stride is refused: nearly every patch voxel along
#: it would be padding (nnU-Net's loader pads; the network still runs, but learns from almost nothing).
MIN_FILL = 0.25


class CheckpointPlanError(SegbookError):
    """A task the checkpoint's network cannot be planned for (too small, or no patch fits the memory target)."""


def register(architecture: CheckpointArchitecture) -> str:
    """The planner name (a `PLANNERS` key) for plans around `architecture`, registered for this process."""
    name = f"{CHECKPOINT_PLANS}-{architecture.digest()}"
    identifier = f"SegbookCheckpoint{architecture.name}_{architecture.digest()}Plans"
    PLANNERS.setdefault(name, Planner(identifier, architecture=architecture))
    return name


def planner_for_weights(model: str, weights: str | Path | None) -> str:
    """The checkpoint planner of `model`'s nnssl checkpoint `weights`; SegbookError before anything is planned when
    the model reads no nnssl checkpoints, no file is given, or the file's network cannot be built or planned."""
    from segbook import backbones

    backbone = backbones.get(model)
    if "nnssl" not in backbone.checkpoint_formats:
        raise SegbookError(f"--plans {CHECKPOINT_PLANS} plans a task around an nnssl checkpoint's network; "
                           f"{backbone.label} reads no nnssl checkpoints")
    if weights is None:
        raise SegbookError(f"--plans {CHECKPOINT_PLANS} needs the checkpoint: pass --weights FILE")
    from segbook.backbones.nnssl import checkpoint_architecture, read_nnssl_checkpoint
    from stunet import CheckpointError

    try:
        return register(checkpoint_architecture(read_nnssl_checkpoint(weights)))
    except CheckpointError as error:
        raise SegbookError(f"--plans {CHECKPOINT_PLANS}: {error}") from None


def initial_patch(median_shape: Sequence[float], recommended: Sequence[int], stride: Sequence[int]) -> list[int]:
    """Per axis: the recommended patch (rounded down to the stride) or the median shape rounded up to the stride,
    whichever is smaller; refused when an axis is too short for the network (`MIN_FILL`)."""
    short = [axis for axis in range(3) if median_shape[axis] < MIN_FILL * stride[axis]]
    if short:
        raise CheckpointPlanError(
            "the task is too small for the network planned: median shape "
            f"{[round(float(v)) for v in median_shape]} voxels, but the network downsamples axes {short} "
            f"{[stride[a] for a in short]}-fold; plan it for a network that downsamples less, or resample it to a "
            "finer spacing")
    return [max(MIN_BOTTLENECK * stride[a], min(int(recommended[a]) // stride[a] * stride[a],
                                math.ceil(float(median_shape[a]) / stride[a]) * stride[a])) for a in range(3)]


def fit_patch(patch: Sequence[int], median_shape: Sequence[float], stride: Sequence[int],
              estimate: Callable[[tuple[int, ...]], float], reference: float) -> tuple[list[int], float]:
    """nnU-Net's shrink loop on a fixed network: while the estimate exceeds the reference, shrink the axis whose
    patch is largest relative to the task's median shape by one stride. Returns the patch and its estimate;
    CheckpointPlanError when even the smallest patch (`MIN_BOTTLENECK` strides per axis) does not fit."""
    patch = list(patch)
    used = estimate(tuple(patch))
    while used > reference:
        shrinkable = [axis for axis in range(3) if patch[axis] > MIN_BOTTLENECK * stride[axis]]
        if not shrinkable:
            raise CheckpointPlanError(f"no patch fits the memory target: even {patch} needs an estimated "
                                      f"{used:.3g} feature-map voxels, over the reference {reference:.3g}")
        axis = max(shrinkable, key=lambda a: patch[a] / median_shape[a])
        patch[axis] -= stride[axis]
        used = estimate(tuple(patch))
    return patch, used


def batch_size(reference: float, used: float, patch: Sequence[int], dataset_voxels: float,
               covered: float) -> int:
    """nnU-Net's batch size for a patch: as many as the reference allows, at most `covered` of the dataset's voxels
    per batch, at least `MIN_BATCH`."""
    batch = round(reference / used * REFERENCE_BATCH)
    capped = round(dataset_voxels * covered / math.prod(patch))
    return max(min(batch, capped), MIN_BATCH)


def checkpoint_planner(dataset_name: str, identifier: str, architecture: CheckpointArchitecture):
    """nnU-Net's ResEnc-L planner for `dataset_name` whose 3d_fullres network is `architecture` (see the module)."""
    from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import \
        nnUNetPlannerResEncL

    class CheckpointPlanner(nnUNetPlannerResEncL):
        def __init__(self) -> None:
            super().__init__(dataset_name, plans_name=identifier)

        def generate_data_identifier(self, configuration_name: str) -> str:
            """Data of its own: the ResEnc planners reuse `nnUNetPlans_3d_fullres`, the default plans' data."""
            return f"{self.plans_identifier}_{configuration_name}"

        def get_plans_for_configuration(self, spacing, median_shape, data_identifier, approximate_n_voxels_dataset,
                                        _cache):
            """nnU-Net's plan (spacing, normalisation, resampling), with the checkpoint's network, a patch for it
            and the batch that patch allows in 3d_fullres."""
            plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                       approximate_n_voxels_dataset, _cache)
            if data_identifier != self.generate_data_identifier("3d_fullres"):
                return plan
            return {**plan, **self.fit_checkpoint(median_shape, approximate_n_voxels_dataset)}

        def fit_checkpoint(self, median_shape, dataset_voxels: float) -> dict[str, Any]:
            stride = architecture.total_stride
            reference = self.UNet_reference_val_3d * self.UNet_vram_target_GB / self.UNet_reference_val_corresp_GB
            patch = initial_patch(median_shape, architecture.recommended_patch, stride)
            patch, used = fit_patch(patch, median_shape, stride, self.estimate, reference)
            return {"patch_size": tuple(patch), "architecture": architecture.plans_entry(),
                    "batch_size": batch_size(reference, used, patch, dataset_voxels, self.max_dataset_covered)}

        def estimate(self, patch: tuple[int, ...]) -> float:
            """nnU-Net's feature-map estimate of the checkpoint's network, built on the meta device (no memory)."""
            import torch

            channels = len(self.dataset_json.get("channel_names") or self.dataset_json["modality"])
            with torch.device("meta"):
                return float(self.static_estimate_VRAM_usage(
                    patch, channels, len(self.dataset_json["labels"]), architecture.class_name, architecture.kwargs,
                    architecture.requires_import))

    return CheckpointPlanner()
