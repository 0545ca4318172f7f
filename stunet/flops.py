"""Parameter and multiply-accumulate counts, measured by running the network on the meta device.

Counting (rather than tabulating) keeps the figures honest for any patch size, channel count or stride set; the meta
device makes it free even for STU-Net-huge. Only convolutions are counted, the convention of the STU-Net paper,
whose "TFLOPs" column is in fact multiply-accumulates.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_forward_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass on an input of `input_shape` (batch and channels included)."""
    device = next(model.parameters()).device
    x = torch.empty(tuple(input_shape), device=device, dtype=next(model.parameters()).dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


def preset_summary(preset: str, patch_size: Sequence[int] = (128, 128, 128), input_channels: int = 1,
                   num_classes: int = 105) -> dict:
    """Widths, blocks, parameters and forward cost of a preset at one patch (batch 1), counted on the meta device."""
    from stunet.presets import create_stunet, get_preset

    spec = get_preset(preset)
    network = create_stunet(preset, input_channels, num_classes, device="meta")
    macs = count_forward_macs(network, (1, input_channels, *patch_size))
    return {"preset": preset, "widths": spec.dims, "blocks_per_stage": spec.blocks_per_stage,
            "parameters": count_parameters(network), "forward_macs": macs, "forward_flops": 2 * macs}
