"""Checkpoints without pickles: nnU-Net's training checkpoints read safely, and a pretrained file checked against the
network it will be loaded into.

Run folders live on shared file systems and travel between groups, so every checkpoint is untrusted input: nnU-Net
reads its own with `torch.load(weights_only=False)`, which runs whatever code a crafted file holds. segbook reads
them all through `stunet.safe_load` (plain tensors, numbers, strings, lists, dicts and numpy scalars) and hands
nnU-Net the dictionary instead of the file name.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from segbook.errors import SegbookError

if TYPE_CHECKING:
    from segbook.backbones.models import CheckpointFacts

_NNUNET_KEYS = ("network_weights", "optimizer_state", "logging", "current_epoch", "init_args", "trainer_name")


class UnsafeCheckpointError(SegbookError):
    """A checkpoint that cannot be read safely, or is not what it claims to be."""


def read_run_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """An nnU-Net v2 training checkpoint (`checkpoint_*.pth`), read safely and checked for nnU-Net's keys."""
    return _read_with_keys(path, map_location, _NNUNET_KEYS, "an nnU-Net training checkpoint")


def _read_with_keys(path: str | Path, map_location: str | torch.device, keys: tuple[str, ...],
                    what: str) -> dict[str, Any]:
    """A file read safely (`stunet.safe_load`: weights only) that must be a dict holding `keys`."""
    from stunet import CheckpointError, safe_load

    try:
        content = safe_load(path, map_location)
    except CheckpointError as error:
        raise UnsafeCheckpointError(str(error)) from None
    missing = [key for key in keys if not isinstance(content, dict) or key not in content]
    if missing:
        raise UnsafeCheckpointError(f"{path} is not {what} (missing {', '.join(missing)})")
    return content


_SNAPSHOT_KEYS = ("network_weights", "trainer_name", "segbook_snapshot")


def read_snapshot(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A run's snapshot (`segbook.training.trainer_parts.snapshots`), read as safely as any checkpoint and checked
    for its keys: the weights, the trainer that wrote them and the snapshot's record (its epoch a positive integer)."""
    content = _read_with_keys(path, map_location, _SNAPSHOT_KEYS, "a segbook snapshot")
    record, weights = content["segbook_snapshot"], content["network_weights"]
    epoch = record.get("epoch") if isinstance(record, dict) else None
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1 or not isinstance(weights, dict) or \
            not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise UnsafeCheckpointError(f"{path} is not a segbook snapshot (its record or weights are malformed)")
    return content


def check_weights_fit(path: Path, model: str, input_channels: int, num_classes: int,
                      configuration: Any = None) -> "CheckpointFacts":
    """Read the checkpoint safely and check it fits the network a task needs (`configuration`: nnU-Net's
    ConfigurationManager of its plans, None for the backbone's reference architecture), before anything is
    written: a file of another backbone or size, a damaged file or a multi-channel checkpoint fail here with one
    clear line. The file's facts (format, stem rule, pretraining normalisation) otherwise."""
    from segbook import backbones
    from segbook.backbones.models import check_fits
    from stunet import CheckpointError

    try:
        return check_fits(backbones.get(model), path, input_channels, num_classes, configuration)
    except CheckpointError as error:
        raise SegbookError(str(error)) from None

