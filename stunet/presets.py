"""One entry point to build the STU-Net sizes (`PRESETS`, from `stunet.checkpoints`), optionally from a pretrained
checkpoint, and the bridge from nnU-Net plans to STU-Net strides.

The layering is checkpoints (the sizes and the official files) <- loading (reading and fitting a checkpoint) <-
presets (building a network, which may load one): nothing below imports what is above it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Sequence

import torch

from stunet.checkpoints import PRESETS, PRETRAINING_STRIDES, Preset, get_preset
from stunet.loading import DEFAULT_TILING, load_pretrained, read_state_dict
from stunet.model import STUNet

__all__ = ["PRESETS", "PRETRAINING_STRIDES", "Preset", "create_stunet", "describe_network", "get_preset",
           "strides_from_plans"]


def create_stunet(preset: str, input_channels: int = 1, num_classes: int = 105,
                  strides: Sequence[Sequence[int]] = PRETRAINING_STRIDES, enable_deep_supervision: bool = True,
                  device: str | torch.device | None = None,
                  pretrained: str | os.PathLike | None = None, tiling: str = DEFAULT_TILING) -> STUNet:
    """Build a preset, optionally initialised for fine-tuning from a checkpoint file.

    `device="meta"` builds it without allocating memory (for counting and schema checks). With `pretrained`, every
    weight but the segmentation heads comes from the checkpoint, its first block tiled across input channels as
    `tiling` says (`stunet.loading.TILINGS`: `repeat`, the official loaders' way, or `mean`).
    """
    spec = get_preset(preset)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        network = STUNet(input_channels, num_classes, spec.dims, spec.depth, strides, enable_deep_supervision)
    if pretrained is not None:
        load_pretrained(network, read_state_dict(pretrained), source=str(pretrained), tiling=tiling)
    return network


def describe_network(preset: str, network: STUNet) -> str:
    """One line that says which STU-Net this is: for logs that would otherwise show nnU-Net's planned network."""
    spec = get_preset(preset)
    parameters = sum(p.numel() for p in network.parameters())
    return (f"STU-Net {preset} (widths {spec.dims[0]}..{spec.dims[-1]}, {spec.blocks_per_stage} block(s) per stage, "
            f"strides {[list(s) for s in network.strides]}, {parameters / 1e6:.2f}M parameters)")


def strides_from_plans(pool_op_kernel_sizes: Sequence[Sequence[int]]) -> list[list[int]]:
    """Turn the strides of an nnU-Net plan into STU-Net's five.

    nnU-Net v2 plans list one stride per stage, the first being [1, 1, 1] (the stem does not downsample); v1 plans
    omit it. STU-Net always has five downsamplings: extra ones are dropped, missing ones become [1, 1, 1].
    """
    strides = [list(map(int, s)) for s in pool_op_kernel_sizes]
    if strides and all(v == 1 for v in strides[0]):
        strides = strides[1:]
    strides = strides[:5]
    dim = len(strides[0]) if strides else 3
    return strides + [[1] * dim for _ in range(5 - len(strides))]
