"""STU-Net: scalable and transferable 3D segmentation networks, and their TotalSegmentator checkpoints.

    from stunet import create_stunet
    net = create_stunet("large", input_channels=2, num_classes=4, pretrained="large_ep4k.model")
"""

from importlib import import_module

from stunet.checkpoints import (CATALOGUE, PRESETS, PRETRAINING_STRIDES, PretrainedCfg, WeightCache, WeightsError,
                                get_cfg, get_preset, write_official_checkpoint)

#: Names whose modules import torch, imported on first use: the catalogue and the weight cache (what `segbook batch
#: status` asks about a matrix's checkpoints) need no torch, which takes seconds to import.
_LAZY = {
    "count_forward_macs": "stunet.flops", "count_parameters": "stunet.flops", "preset_summary": "stunet.flops",
    "TILINGS": "stunet.loading", "CheckpointError": "stunet.loading", "adapt_state_dict": "stunet.loading",
    "load_pretrained": "stunet.loading", "read_state_dict": "stunet.loading", "safe_load": "stunet.loading",
    "STUNet": "stunet.model", "create_stunet": "stunet.presets", "describe_network": "stunet.presets",
    "strides_from_plans": "stunet.presets",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stunet' has no attribute {name!r}")


__all__ = [
    "CATALOGUE", "CheckpointError", "PRESETS", "PRETRAINING_STRIDES", "PretrainedCfg", "STUNet", "TILINGS",
    "WeightCache", "WeightsError", "adapt_state_dict", "count_forward_macs", "count_parameters", "create_stunet",
    "describe_network", "get_cfg", "get_preset", "load_pretrained", "preset_summary", "read_state_dict",
    "safe_load", "strides_from_plans", "write_official_checkpoint",
]
