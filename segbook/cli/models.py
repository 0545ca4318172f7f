"""`segbook models`: the STU-Net presets, their size and cost, and whether their checkpoints are cached."""

from __future__ import annotations

import argparse

from segbook.cli.common import at_least
from segbook.cli.output import FORMATS, emit


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models", help="list the STU-Net presets with parameters, FLOPs and checkpoint status",
        description="The STU-Net presets. Parameters and forward multiply-accumulates (MACs) are counted on the "
                    "meta device for one patch of the given size (batch 1); FLOPs = 2 x MACs. A training step costs "
                    "about 3x the forward pass.")
    parser.add_argument("--patch", type=at_least(1), nargs=3, default=[128, 128, 128], metavar=("Z", "Y", "X"),
                        help="patch size in voxels (default: 128 128 128, the pretraining patch)")
    parser.add_argument("--input-channels", type=at_least(1), default=1, help="input channels (default: 1)")
    parser.add_argument("--classes", type=at_least(2), default=105,
                        help="output classes incl. background (default: 105, the TotalSegmentator checkpoints)")
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from segbook.paths import Paths
    from stunet import CATALOGUE, PRESETS, WeightCache, preset_summary

    cache = WeightCache(Paths.from_env().weights)
    rows = []
    for name in PRESETS:
        summary = preset_summary(name, args.patch, args.input_channels, args.classes)
        cfg = CATALOGUE.get(name)
        rows.append({
            "model": name,
            "widths": ",".join(map(str, summary["widths"])),
            "blocks/stage": summary["blocks_per_stage"],
            "parameters": f"{summary['parameters']:,}" if args.format == "table" else summary["parameters"],
            "forward TMACs": round(summary["forward_macs"] / 1e12, 3),
            "forward TFLOPs": round(summary["forward_flops"] / 1e12, 3),
            "checkpoint": cfg.filename if cfg else "-",
            "cached": ("yes" if cache.is_cached(cfg) else "no") if cfg else "-",
        })
    emit(rows, args.format)
    return 0
