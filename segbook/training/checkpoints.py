"""Checkpoints of a run: which pretrained file it starts from, and reading nnU-Net's checkpoints without pickles.

Run folders live on shared file systems and travel between groups, so every checkpoint is untrusted input: nnU-Net
reads its own with `torch.load(weights_only=False)`, which runs whatever code a crafted file holds. segbook reads
them all through `stunet.safe_load` (plain tensors, numbers, strings, lists, dicts and numpy scalars) and hands
nnU-Net the dictionary instead of the file name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from segbook.errors import SegbookError
from segbook.paths import Paths

#: nnU-Net's checkpoints a run resumes from (never from checkpoint_best: that would skip the epochs after it).
RESUMABLE_CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth")
_NNUNET_KEYS = ("network_weights", "optimizer_state", "logging", "current_epoch", "init_args", "trainer_name")


class UnsafeCheckpointError(SegbookError):
    """A checkpoint that cannot be read safely, or is not what it claims to be."""


def has_resumable_checkpoint(folder: Path) -> bool:
    return any((Path(folder) / name).is_file() for name in RESUMABLE_CHECKPOINTS)


def read_run_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """An nnU-Net v2 training checkpoint (`checkpoint_*.pth`), read safely and checked for nnU-Net's keys."""
    from stunet import CheckpointError, safe_load

    try:
        content = safe_load(path, map_location)
    except CheckpointError as error:
        raise UnsafeCheckpointError(str(error)) from None
    missing = [key for key in _NNUNET_KEYS if not isinstance(content, dict) or key not in content]
    if missing:
        raise UnsafeCheckpointError(f"{path} is not an nnU-Net training checkpoint (missing {', '.join(missing)})")
    return content


def resolve_weights(model: str, given: str | Path | None, paths: Paths,
                    say: Callable[[str], None] = print) -> tuple[Path, str]:
    """The pretrained file a run of `model` starts from, and its SHA-256 (recorded in `run.json`).

    A given file wins; otherwise the cached official checkpoint, checked against the SHA-256 recorded when it was
    downloaded (a file put into the cache by hand has none: that is said, not hidden).
    """
    from stunet import CATALOGUE, WeightCache, WeightsError
    from stunet.checkpoints import file_sha256

    cache = WeightCache(paths.weights)
    if given is None and model not in CATALOGUE:
        raise SegbookError(f"STU-Net {model} has no official pretrained checkpoint: pass the file to fine-tune from "
                           "with --weights PATH")
    try:
        path = cache.resolve(None if given is not None else CATALOGUE[model], given)
    except WeightsError as error:
        raise SegbookError(str(error)) from None
    if given is not None:
        return path.resolve(), file_sha256(path)
    cfg = CATALOGUE[model]
    digest = file_sha256(path)
    expected = cfg.sha256 or cache.recorded_sha256(cfg)
    if expected is None:
        say(f"segbook: warning: {path} has no recorded SHA-256 (it was not downloaded by `segbook weights "
            f"download`), so it cannot be verified; using it as it is (SHA-256 {digest}, recorded in run.json)")
    elif digest != expected:
        raise SegbookError(f"{path} is corrupted: SHA-256 {digest} differs from the recorded {expected}; delete it "
                           f"and run `segbook weights download {model}` again")
    return path.resolve(), digest


def check_weights_fit(path: Path, model: str, input_channels: int, num_classes: int) -> None:
    """Read the checkpoint safely and check it fits the network a task needs, before anything is planned or
    written: a file of another size, a damaged file or a multi-channel checkpoint fail here with one clear line."""
    from stunet import CheckpointError, adapt_state_dict, create_stunet, read_state_dict

    try:
        network = create_stunet(model, input_channels, num_classes, device="meta")
        adapt_state_dict(network.state_dict(), read_state_dict(path), source=str(path))
    except CheckpointError as error:
        raise SegbookError(str(error)) from None

