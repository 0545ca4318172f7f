"""The STU-Net architecture (Huang et al., 2023), with the official module names.

The names matter: the released TotalSegmentator checkpoints are state_dicts keyed `conv_blocks_context.*`,
`upsample_layers.*`, `conv_blocks_localization.*` and `seg_outputs.*`, and they load into this module with
`strict=True`. The network is a residual U-Net with six resolution stages (five strided downsamplings), nearest-
neighbour upsampling followed by a 1x1x1 convolution, and a segmentation head at each of the five decoder stages.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

Stride = Sequence[int]


class ResidualBlock(nn.Module):
    """conv-norm-act-conv-norm, plus the input (through a strided 1x1x1 projection where shapes change), then act."""

    def __init__(self, in_channels: int, out_channels: int, stride: Stride = (1, 1, 1), project: bool = False):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride=tuple(stride), padding=1)
        self.norm1 = nn.InstanceNorm3d(out_channels, affine=True)
        self.act1 = nn.LeakyReLU(inplace=True)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.norm2 = nn.InstanceNorm3d(out_channels, affine=True)
        self.act2 = nn.LeakyReLU(inplace=True)
        self.conv3 = nn.Conv3d(in_channels, out_channels, 1, stride=tuple(stride)) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        shortcut = self.conv3(x) if self.conv3 is not None else x
        return self.act2(y + shortcut)


class NearestUpsample(nn.Module):
    """Nearest-neighbour upsampling by the stage's stride, then a 1x1x1 convolution to the skip's width."""

    def __init__(self, in_channels: int, out_channels: int, scale: Stride):
        super().__init__()
        self.scale = tuple(float(s) for s in scale)
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(nn.functional.interpolate(x, scale_factor=self.scale, mode="nearest"))


class DeepSupervisionSwitch:
    """Stands where nnU-Net expects `network.decoder.deep_supervision`; a plain object, so no state_dict keys."""

    def __init__(self, enabled: bool):
        self.deep_supervision = enabled


def _stage(in_channels: int, out_channels: int, blocks: int, stride: Stride = (1, 1, 1)) -> nn.Sequential:
    first = ResidualBlock(in_channels, out_channels, stride=stride, project=True)
    rest = [ResidualBlock(out_channels, out_channels) for _ in range(blocks - 1)]
    return nn.Sequential(first, *rest)


class STUNet(nn.Module):
    """STU-Net with five downsampling strides and five deep-supervision heads.

    Args:
        input_channels: image channels (1 for the TotalSegmentator checkpoints).
        num_classes: output channels, background included.
        dims: widths of the six resolution stages.
        depth: residual blocks per stage (six numbers; the decoder mirrors stages 0-4).
        strides: the five downsampling strides, e.g. `[[2, 2, 2]] * 4 + [[1, 1, 2]]`.
        enable_deep_supervision: return the five head outputs (full resolution first) instead of one.
    """

    def __init__(self, input_channels: int, num_classes: int, dims: Sequence[int], depth: Sequence[int],
                 strides: Sequence[Stride], enable_deep_supervision: bool = True):
        super().__init__()
        if len(dims) != 6 or len(depth) != 6 or len(strides) != 5:
            raise ValueError(f"STU-Net has 6 stages and 5 strides; got dims={list(dims)}, depth={list(depth)}, "
                             f"strides={[list(s) for s in strides]}")
        self.input_channels = input_channels
        self.num_classes = num_classes
        self.strides = [tuple(int(v) for v in s) for s in strides]
        self.decoder = DeepSupervisionSwitch(enable_deep_supervision)

        self.conv_blocks_context = nn.ModuleList(
            [_stage(input_channels, dims[0], depth[0])]
            + [_stage(dims[d - 1], dims[d], depth[d], self.strides[d - 1]) for d in range(1, 6)])
        # Decoder stage u goes from resolution 5-u to 4-u (deepest first).
        self.upsample_layers = nn.ModuleList(
            [NearestUpsample(dims[5 - u], dims[4 - u], self.strides[4 - u]) for u in range(5)])
        self.conv_blocks_localization = nn.ModuleList(
            [_stage(2 * dims[4 - u], dims[4 - u], depth[4 - u]) for u in range(5)])
        self.seg_outputs = nn.ModuleList([nn.Conv3d(dims[4 - u], num_classes, kernel_size=1) for u in range(5)])
        self.apply(_he_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        skips = []
        for stage in self.conv_blocks_context[:-1]:
            x = stage(x)
            skips.append(x)
        x = self.conv_blocks_context[-1](x)

        outputs = []
        for up, stage, head, skip in zip(self.upsample_layers, self.conv_blocks_localization, self.seg_outputs,
                                         reversed(skips)):
            x = stage(torch.cat((up(x), skip), dim=1))
            outputs.append(head(x))
        if self.decoder.deep_supervision:
            return outputs[::-1]
        return outputs[-1]


def _he_init(module: nn.Module) -> None:
    """nnU-Net's initialisation: Kaiming normal for convolutions (LeakyReLU slope 1e-2), zero biases."""
    if isinstance(module, nn.Conv3d):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
