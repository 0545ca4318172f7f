"""An example user backbone for segbook (docs/backbones.md): a small two-level 3-D U-Net.

Benchmark it with `segbook finetune --backbone-file docs/examples/my_backbone.py --model my-unet ...`, or make
it installable through the entry-point group `segbook.backbones`. segbook runs this file: it is your code.
"""

import torch
from torch import nn

from segbook.backbones import Backbone, Parts


class MyUNet(nn.Module):
    """Stem, one downsampling stage, one upsampling stage and a 1x1x1 head: nnU-Net's patches are divisible by 2."""

    def __init__(self, input_channels: int, num_classes: int, width: int = 8):
        super().__init__()
        self.stem = nn.Conv3d(input_channels, width, 3, padding=1)
        self.down = nn.Sequential(nn.Conv3d(width, 2 * width, 3, stride=2, padding=1),
                                  nn.InstanceNorm3d(2 * width, affine=True), nn.LeakyReLU(inplace=True))
        self.up = nn.ConvTranspose3d(2 * width, width, 2, stride=2)
        self.fuse = nn.Sequential(nn.Conv3d(2 * width, width, 3, padding=1), nn.InstanceNorm3d(width, affine=True),
                                  nn.LeakyReLU(inplace=True))
        self.head = nn.Conv3d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = nn.functional.leaky_relu(self.stem(x))
        return self.head(self.fuse(torch.cat([self.up(self.down(skip)), skip], dim=1)))


def build(model: str, configuration, input_channels: int, num_classes: int, deep_supervision: bool) -> nn.Module:
    """segbook calls this with nnU-Net's plans of the task (`configuration`: patch_size, pool_op_kernel_sizes, ...;
    None outside a task); this network fits any patch nnU-Net plans, so it ignores them."""
    return MyUNet(input_channels, num_classes)


BACKBONES = [
    Backbone(
        name="my-unet", family="My lab", title="My U-Net", build=build,
        deep_supervision=False,  # one output: nnU-Net trains it without deep supervision
        parts=Parts(encoder=("stem.", "down."), decoder=("up.", "fuse."), heads=("head.",)),
        first_conv=("stem.weight",), classifier="head",  # what fine-tuning adapts to the channels / replaces
        checkpoint_formats=("state_dict",),  # torch.save(network.state_dict(), path), or an nnU-Net checkpoint
        description="a two-level 3-D U-Net (docs/examples/my_backbone.py)"),
]
