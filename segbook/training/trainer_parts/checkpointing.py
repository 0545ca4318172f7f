"""nnU-Net's training checkpoint as segbook writes and restores it.

Written: nnU-Net's keys, and `segbook_position` when a stop saves it mid-epoch (`stopping`), to a temporary file
then renamed, so a kill never leaves a truncated checkpoint. Restored: from a dictionary read safely
(`segbook.training.checkpoints.read_run_checkpoint`); nnU-Net's own loader would unpickle the file, and ignores a
dictionary. Both act on nnU-Net's trainer, whose attributes the checkpoint holds.
"""

from __future__ import annotations

from typing import Any

import torch

from segbook.io import atomic_path
from segbook.training.trainer_parts.distributed import unwrap


def write(trainer: Any, filename: str, position: dict[str, Any] | None) -> None:
    """Save the trainer's checkpoint (mid-epoch at `position`) to `filename`, atomically."""
    with atomic_path(filename) as partial:
        torch.save(content(trainer, position), partial)


def content(trainer: Any, position: dict[str, Any] | None) -> dict[str, Any]:
    """What nnU-Net's `save_checkpoint` writes. Mid-epoch, `current_epoch` is the unfinished epoch (nnU-Net's loop
    starts there) and `segbook_position` says how far into it the checkpoint is."""
    saved = {
        "network_weights": unwrap(trainer.network).state_dict(), "optimizer_state": trainer.optimizer.state_dict(),
        "grad_scaler_state": trainer.grad_scaler.state_dict() if trainer.grad_scaler is not None else None,
        "logging": trainer.logger.get_checkpoint(), "_best_ema": trainer._best_ema,
        "current_epoch": trainer.current_epoch + (0 if position else 1), "init_args": trainer.my_init_kwargs,
        "trainer_name": trainer.__class__.__name__,
        "inference_allowed_mirroring_axes": trainer.inference_allowed_mirroring_axes}
    return {**saved, "segbook_position": position} if position else saved


def restore(trainer: Any, checkpoint: dict[str, Any]) -> None:
    """Weights, optimiser, logs, epoch and best EMA, as nnU-Net's `load_checkpoint` restores them."""
    weights = {key.removeprefix("module."): value for key, value in checkpoint["network_weights"].items()}
    unwrap(trainer.network).load_state_dict(weights)
    trainer.my_init_kwargs = checkpoint["init_args"]
    trainer.current_epoch = checkpoint["current_epoch"]
    trainer.logger.load_checkpoint(checkpoint["logging"])
    trainer._best_ema = checkpoint.get("_best_ema")
    trainer.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                              trainer.inference_allowed_mirroring_axes)
    trainer.optimizer.load_state_dict(checkpoint["optimizer_state"])
    if trainer.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
        trainer.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])
