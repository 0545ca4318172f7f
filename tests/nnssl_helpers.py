"""Tiny nnssl-style ResEnc networks, built as nnU-Net builds a planned one: shared by the nnssl tests."""

from __future__ import annotations

from pathlib import Path

import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

RESENC_CLASS = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


def resenc_kwargs(widths=(4, 8, 8), blocks=(1, 2, 1), kernels=None) -> dict:
    """nnssl's ResEnc-L construction (conv bias, affine instance norm, leaky ReLU, one decoder conv per stage),
    at any widths; tiny by default."""
    stages = len(widths)
    return dict(n_stages=stages, features_per_stage=list(widths), conv_op="torch.nn.modules.conv.Conv3d",
                kernel_sizes=kernels or [[3, 3, 3]] * stages, strides=[[1, 1, 1]] + [[2, 2, 2]] * (stages - 1),
                n_blocks_per_stage=list(blocks), n_conv_per_stage_decoder=[1] * (stages - 1), conv_bias=True,
                norm_op="torch.nn.modules.instancenorm.InstanceNorm3d", norm_op_kwargs={"eps": 1e-5, "affine": True},
                dropout_op=None, dropout_op_kwargs=None, nonlin="torch.nn.LeakyReLU",
                nonlin_kwargs={"inplace": True})


def resenc(input_channels=1, num_classes=3, seed=0, allow_init=True, **kwargs) -> ResidualEncoderUNet:
    """Built the way nnU-Net builds a planned ResEnc network (get_network_from_plans), deep supervision on."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    torch.manual_seed(seed)
    return get_network_from_plans(RESENC_CLASS, resenc_kwargs(**kwargs), ["conv_op", "norm_op", "nonlin"],
                                  input_channels, num_classes, allow_init=allow_init, deep_supervision=True)


#: The test-only Primus size's backbone file (`--backbone-file`), and its sizes.
TINY_PRIMUS_FILE = Path(__file__).resolve().parent / "data" / "backbones" / "tiny_primus.py"


def tiny_primus(patch=(32, 32, 32), input_channels=1, num_classes=1, seed=0) -> torch.nn.Module:
    """The test-only Primus (registered from `TINY_PRIMUS_FILE`) at a patch, as its builder makes it."""
    from segbook.backbones import load_backbone_file
    from segbook.backbones.models import primus_network

    load_backbone_file(TINY_PRIMUS_FILE)
    torch.manual_seed(seed)
    return primus_network("primus-tiny", patch, input_channels, num_classes)
