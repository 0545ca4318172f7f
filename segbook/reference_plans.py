"""The SegBook authors' plans beside segbook's, and nnU-Net v2 plans made with the authors' patch size and spacing.

The authors trained with nnU-Net v1 plans. The registry holds their 3d_fullres patch size and target spacing for
every dataset (`reference_patch_size`, `reference_spacing`), in the plans' axis order (the lowest-resolution axis
first, as nnU-Net's plans store them). `compare_plans` sets a v2 plan beside them: patch size, spacing and the
number of resolution stages (for the authors' plans derived from their patch and spacing by nnU-Net's own
`get_pool_and_conv_props`, as their v1 planner derived it).

The `paper` plans are nnU-Net v2's own planning (`ExperimentPlanner`) with two inputs fixed: the target spacing and
the patch size are the authors'. The network topology (strides, kernels, number of stages), batch size,
normalisation, resampling and preprocessing are what nnU-Net derives for them. `paper-zscore` also normalises CT
channels per image (z-score), as the TotalSegmentator pretraining did, instead of nnU-Net's CT normalisation.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

from segbook.backbones import PLANNERS

if TYPE_CHECKING:
    from segbook.registry import DatasetEntry

#: nnU-Net's ExperimentPlanner.UNet_featuremap_min_edge_length (v1's planner used the same 4): it decides how
#: often an axis is downsampled.
MIN_FEATURE_MAP_EDGE = 4
#: Pooling is limited by the patch alone (nnU-Net passes 999999 as the maximum number of poolings).
UNLIMITED_POOLINGS = 999999
#: Compared fields, as printed.
FIELDS = {"patch_size": "patch size", "spacing": "spacing", "stages": "stages"}


def has_reference(entry: DatasetEntry) -> bool:
    return entry.reference_patch_size is not None and entry.reference_spacing is not None


def authors_plan(entry: DatasetEntry) -> dict[str, Any] | None:
    """The authors' 3d_fullres patch size and spacing from the registry, with the stages nnU-Net derives for them;
    None when the registry does not hold them."""
    if not has_reference(entry):
        return None
    return {"patch_size": list(entry.reference_patch_size), "spacing": list(entry.reference_spacing),
            "stages": stages_for(entry.reference_spacing, entry.reference_patch_size)}


def stages_for(spacing: Sequence[float], patch_size: Sequence[int]) -> int:
    """nnU-Net's number of resolution stages for a patch at a spacing."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    _, strides, _, _, _ = get_pool_and_conv_props(list(spacing), list(patch_size), MIN_FEATURE_MAP_EDGE,
                                                  UNLIMITED_POOLINGS)
    return len(strides)


def compare_plans(entry: DatasetEntry, identifier: str, configuration: dict[str, Any]) -> dict[str, Any]:
    """A 3d_fullres configuration of nnU-Net plans (`identifier`) beside the authors' plans; `differs` names the
    fields that differ (spacings within 0.1%, the registry rounds them)."""
    ours = {"patch_size": [int(v) for v in configuration["patch_size"]],
            "spacing": [round(float(v), 6) for v in configuration["spacing"]],
            "stages": len(configuration["architecture"]["arch_kwargs"]["strides"])}
    authors = authors_plan(entry)
    differs = [] if authors is None else [name for name in FIELDS if not _same(ours[name], authors[name])]
    return {"plans": identifier, "segbook": ours, "authors": authors, "differs": differs}


def _same(mine: Any, theirs: Any) -> bool:
    if isinstance(mine, list):
        return len(mine) == len(theirs) and all(math.isclose(a, b, rel_tol=1e-3) for a, b in zip(mine, theirs))
    return mine == theirs


def describe_comparison(comparison: dict[str, Any], indent: str = "  ") -> list[str]:
    """Lines that set segbook's plan beside the authors' (for `segbook plan` and `segbook tasks show`)."""
    authors = comparison.get("authors")
    if authors is None:
        return [f"{indent}the authors' plans: not in the registry (reference_patch_size, reference_spacing)"]
    mine = comparison["segbook"]
    header = f"segbook ({comparison['plans']})"
    width = max(len(header), *(len(str(mine[name])) for name in FIELDS)) + 2
    lines = [f"{indent}compared with the SegBook authors' nnU-Net v1 plans:",
             f"{indent}  {'':<12} {header:<{width}} authors"]
    for name, label in FIELDS.items():
        derived = " (derived)" if name == "stages" else ""
        lines.append(f"{indent}  {label:<12} {str(mine[name]):<{width}} {authors[name]}{derived}")
    differs = ", ".join(FIELDS[name] for name in comparison["differs"])
    paper = comparison["plans"] in {p.plans for p in PLANNERS.values() if p.is_reference}
    advice = "nnU-Net changed the authors' patch to fit its GPU memory target or pooling" if paper else \
        "`--plans paper` plans with the authors' patch size and spacing"
    lines.append(f"{indent}  differs: {differs}; {advice}" if differs else f"{indent}  the same as the authors'")
    return lines


def reference_planner(entry: DatasetEntry, dataset_name: str, identifier: str, zscore: bool):
    """nnU-Net's ExperimentPlanner for `dataset_name` at the authors' spacing and patch size (see the module)."""
    import numpy as np
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    class ReferencePlanner(ExperimentPlanner):
        def __init__(self) -> None:
            super().__init__(dataset_name, plans_name=identifier)
            # The dataset's own axis order, decided before the target spacing is replaced: the authors' spacing
            # (lowest resolution first) is then put back on the data's axes.
            self._transpose = super().determine_transpose()
            forward = [int(axis) for axis in self._transpose[0]]
            spacing = [0.0] * len(forward)
            for position, axis in enumerate(forward):
                spacing[axis] = float(entry.reference_spacing[position])
            self.overwrite_target_spacing = spacing

        def determine_transpose(self):
            return self._transpose

        def determine_normalization_scheme_and_whether_mask_is_used_for_norm(self):
            schemes, masks = super().determine_normalization_scheme_and_whether_mask_is_used_for_norm()
            if zscore:
                schemes = ["ZScoreNormalization" if name == "CTNormalization" else name for name in schemes]
            return schemes, masks

        def get_plans_for_configuration(self, spacing, median_shape, data_identifier, approximate_n_voxels_dataset,
                                        _cache):
            """nnU-Net starts its patch search from the median image, clipped to it: from the authors' patch, it
            derives that patch's topology and batch size (and shrinks it only if it exceeds the GPU target)."""
            if data_identifier != self.generate_data_identifier("3d_fullres"):
                return super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                           approximate_n_voxels_dataset, _cache)
            plan = super().get_plans_for_configuration(spacing, np.array(entry.reference_patch_size),
                                                       data_identifier, approximate_n_voxels_dataset, _cache)
            plan["median_image_size_in_voxels"] = median_shape
            return plan

    return ReferencePlanner()
