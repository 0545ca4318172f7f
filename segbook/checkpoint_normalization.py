"""`--normalization checkpoint`: preprocess a task as its pretrained checkpoint's images were normalised.

By default (`task`) a task is normalised as nnU-Net plans it (a CT channel: `CTNormalization`, the dataset's clipped
foreground statistics), even where the checkpoint was pretrained on per-image z-score (nnssl's OpenMind, STU-Net's
TotalSegmentator: docs/backbones.md, "Pretraining normalisation"). With `checkpoint`, whichever planner the run
uses (nnU-Net's default, a ResEnc preset, `paper`, `--plans checkpoint`, Primus') is wrapped in a subclass that
overrides nnU-Net 2.8.1's `ExperimentPlanner.determine_normalization_scheme_and_whether_mask_is_used_for_norm` to
return the checkpoint's scheme and mask flag for each of the task's channels (a one-entry pretraining scheme is
repeated over them, as its stem is tiled), everything else of the planner unchanged.

The wrapped planner writes plans of its own (`<plans>_<Scheme>Norm`, e.g. `nnUNetPlans_ZScoreNorm`; a digest where
the checkpoint has several schemes) and preprocessed data of its own (`<plans>_3d_fullres`), so its runs (whose
folder names the plans) never mix with task-normalised ones.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from segbook.backbones import PLANNERS
from segbook.errors import SegbookError

#: The `--normalization` choices: the task's own plans (nnU-Net's per-channel schemes), or the checkpoint's.
NORMALIZATIONS = ("task", "checkpoint")
CHECKPOINT_NORMALIZATION = "checkpoint"


def pretraining_schemes(pretraining: dict[str, Any] | None, weights: str | Path | None) -> tuple[tuple[str, ...],
                                                                                               tuple[bool, ...]]:
    """The checkpoint's schemes and mask flags (`CheckpointFacts.pretraining`); SegbookError when it records none."""
    schemes = (pretraining or {}).get("schemes")
    masks = (pretraining or {}).get("use_mask_for_norm") or [False] * len(schemes or ())
    if not schemes:
        raise SegbookError(f"--normalization {CHECKPOINT_NORMALIZATION}: {weights} records no pretraining "
                           "normalisation (docs/backbones.md, \"Pretraining normalisation\"); leave the option out to "
                           "normalise the task per its own plans")
    if len(masks) != len(schemes):
        masks = [bool(masks[0])] * len(schemes)
    return tuple(str(s) for s in schemes), tuple(bool(m) for m in masks)


def suffix(schemes: Sequence[str], masks: Sequence[bool]) -> str:
    """The plans identifier's suffix: `ZScoreNorm` (`ZScoreMaskedNorm`), or `Norm<sha8>` for several schemes."""
    if len(set(schemes)) == 1 and len(set(masks)) == 1:
        return f"{schemes[0].removesuffix('Normalization')}{'Masked' if masks[0] else ''}Norm"
    return "Norm" + hashlib.sha256(json.dumps([list(schemes), list(masks)]).encode()).hexdigest()[:8]


def register(base: str, schemes: Sequence[str], masks: Sequence[bool]) -> str:
    """The planner name (a `PLANNERS` key) of planner `base` normalising as the checkpoint did, registered for this
    process."""
    tag = suffix(schemes, masks)
    name = f"{base}+{tag}"
    PLANNERS.setdefault(name, replace(PLANNERS[base], plans=f"{PLANNERS[base].plans}_{tag}",
                                      normalization=(tuple(schemes), tuple(masks))))
    return name


def per_channel(schemes: Sequence[str], masks: Sequence[bool], channels: int) -> tuple[list[str], list[bool]]:
    """The checkpoint's scheme and mask flag for each of `channels` (its last one repeated)."""
    return ([schemes[min(i, len(schemes) - 1)] for i in range(channels)],
            [masks[min(i, len(masks) - 1)] for i in range(channels)])


def normalised_like_checkpoint(planner: Any, identifier: str, schemes: Sequence[str], masks: Sequence[bool]) -> Any:
    """`planner` (an nnU-Net ExperimentPlanner, whichever class) as a subclass of its own class that normalises every
    channel as the checkpoint did and saves plans `identifier` with data of their own (see the module)."""
    base = type(planner)

    class CheckpointNormalization(base):
        def determine_normalization_scheme_and_whether_mask_is_used_for_norm(self):
            channels = len(self.dataset_json.get("channel_names") or self.dataset_json["modality"])
            return per_channel(schemes, masks, channels)

        def generate_data_identifier(self, configuration_name: str) -> str:
            """Data of its own: other planners' data is normalised otherwise."""
            return f"{self.plans_identifier}_{configuration_name}"

    CheckpointNormalization.__name__ = CheckpointNormalization.__qualname__ = f"{base.__name__}CheckpointNormalization"
    planner.__class__ = CheckpointNormalization  # built by its own factory; only these two methods change
    planner.plans_identifier = identifier
    return planner
