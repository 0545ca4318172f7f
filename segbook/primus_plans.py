"""The Primus planner: nnU-Net's default plans with the patch fixed for Primus' patch embedding.

Primus takes one fixed input shape whose every axis is a multiple of its 8^3 patch embedding (dna 0.4.4 primus.py
L78-80; eva.py L171-172: no dynamic size), and nnU-Net has no memory estimate for it (`compute_conv_feature_map_size`
raises, primus.py L203-204). nnU-Net 2.8.1's own Primus trainers train on the task's default plans and "crash if the
patch size is not divisible by 8" (primus_trainers.py L137). segbook instead plans the patch for Primus: nnU-Net's
default planner (spacing, normalisation, batch size, its memory-driven patch), then per axis the smaller of that
patch rounded down to 8 and the task's median shape rounded up to 8, at least two tokens
(`segbook.checkpoint_plans.initial_patch`). A task too small for the patch embedding is refused before planning
(`check_task_fits`, from the training images' headers), naming the task. Rounding down
keeps the patch within the memory nnU-Net planned for its U-Net; the network built from these plans has exactly
this patch as its `input_shape`. Its own plans and data identifiers (`SegbookPrimusPlans`,
`SegbookPrimusPlans_3d_fullres`), so Primus data never mixes with the default plans', and scratch and pretrained
Primus runs share them (a fair pretrained-vs-scratch comparison).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from segbook.backbones import PLANNERS
from segbook.checkpoint_plans import MIN_BOTTLENECK, MIN_FILL, initial_patch
from segbook.errors import SegbookError

if TYPE_CHECKING:
    from segbook.paths import Paths
    from segbook.registry import DatasetEntry

#: Primus' patch embedding (dna primus.py; OpenMind always 8^3): every patch axis is a multiple of it.
PATCH_EMBED = (8, 8, 8)


class PrimusPlanner(ExperimentPlanner):
    """nnU-Net's default planner whose 3d_fullres patch is fixed for Primus (see the module)."""

    def __init__(self, dataset_name: str) -> None:
        super().__init__(dataset_name, plans_name=PLANNERS["primus"].plans)

    def generate_data_identifier(self, configuration_name: str) -> str:
        """Data of its own: the default planner's data would be shared with `nnUNetPlans` at another patch."""
        return f"{self.plans_identifier}_{configuration_name}"

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier, approximate_n_voxels_dataset,
                                    _cache) -> dict[str, Any]:
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        if data_identifier != self.generate_data_identifier("3d_fullres"):
            return plan
        return {**plan, "patch_size": tuple(primus_patch(plan["patch_size"], median_shape))}


def primus_patch(planned: Any, median_shape: Any) -> list[int]:
    """nnU-Net's patch fixed for Primus: per axis a multiple of the patch embedding (see the module)."""
    return initial_patch(median_shape, [int(p) for p in planned], PATCH_EMBED)


def check_task_fits(entry: "DatasetEntry", paths: "Paths", planner: str) -> None:
    """Refuse, before anything is planned or written, a task too short along an axis for Primus' patch embedding
    (the limit `primus_patch` applies): otherwise nnU-Net's fingerprint runs first and the refusal comes from the
    staging folder. Planners other than Primus' (a checkpoint-normalised one included) pass."""
    from segbook.backbones import PLANNERS as planners
    from segbook.data.folders import raw_folder

    if planners[planner].nnunet_class != planners["primus"].nnunet_class:
        return
    shape = median_shape(raw_folder(entry, paths))
    if min(shape) < MIN_FILL * min(PATCH_EMBED):
        raise SegbookError(
            f"{entry.key} is too small for Primus: its training images' median shape is "
            f"{[round(v, 1) for v in shape]} voxels, {min(shape):.3g} along its smallest axis, but Primus embeds "
            f"{PATCH_EMBED[0]}-voxel patches (its smallest patch: {MIN_BOTTLENECK * PATCH_EMBED[0]} voxels per axis), "
            "so nearly all of it would be padding; train a convolutional backbone on it, or resample it finer")


def median_shape(raw: Path) -> list[float]:
    """The training images' median shape at their median spacing, as nnU-Net's planner estimates it, from the
    files' headers alone (no voxels read, nothing written)."""
    import numpy as np

    from segbook.data.validate import read_header
    from segbook.data.split import train_case_ids

    ending = json.loads((raw / "dataset.json").read_text(encoding="utf-8")).get("file_ending", ".nii.gz")
    headers = [read_header(raw / "imagesTr" / f"{case}_0000{ending}") for case in train_case_ids(raw)]
    spacing = np.median([header.spacing for header in headers], axis=0)
    return [float(v) for v in np.median([np.array(h.size) * h.spacing / spacing for h in headers], axis=0)]
