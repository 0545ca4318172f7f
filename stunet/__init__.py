"""STU-Net: scalable and transferable 3D segmentation networks, and their TotalSegmentator checkpoints.

    from stunet import create_stunet
    net = create_stunet("large", input_channels=2, num_classes=4, pretrained="large_ep4k.model")
"""

from stunet.checkpoints import (CATALOGUE, PRESETS, PRETRAINING_STRIDES, PretrainedCfg, WeightCache, WeightsError,
                                get_cfg, get_preset, write_official_checkpoint)
from stunet.flops import count_forward_macs, count_parameters, preset_summary
from stunet.loading import CheckpointError, adapt_state_dict, load_pretrained, read_state_dict, safe_load
from stunet.model import STUNet
from stunet.presets import create_stunet, describe_network, strides_from_plans

__all__ = [
    "CATALOGUE", "CheckpointError", "PRESETS", "PRETRAINING_STRIDES", "PretrainedCfg", "STUNet", "WeightCache",
    "WeightsError", "adapt_state_dict", "count_forward_macs", "count_parameters", "create_stunet",
    "describe_network", "get_cfg", "get_preset", "load_pretrained", "preset_summary", "read_state_dict",
    "safe_load", "strides_from_plans", "write_official_checkpoint",
]
