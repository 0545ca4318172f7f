"""`segbook models`: every backbone (built in, entry points, --backbone-file) with its size and cost, its plans and
checkpoint formats, and whether its catalogued checkpoint is cached."""

from __future__ import annotations

import argparse

from segbook.cli.common import add_backbone_file_option, at_least, load_backbone_files
from segbook.cli.output import FORMATS, emit


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models", help="list the backbones with parameters, FLOPs, plans and checkpoint status",
        description="Every backbone a run can train: STU-Net's sizes, nnU-Net's default network, nnU-Net's ResEnc "
                    "M/L and yours (entry points of group segbook.backbones, --backbone-file). Parameters and "
                    "forward multiply-accumulates (MACs) are counted on the meta device (nothing is allocated) for "
                    "one patch of the given size (batch 1) of each backbone's reference architecture (for ResEnc "
                    "and nnU-Net the task's plans decide the real one); FLOPs = 2 x MACs. A training step costs "
                    "about 3x the forward pass.")
    parser.add_argument("--patch", type=at_least(1), nargs=3, default=[128, 128, 128], metavar=("Z", "Y", "X"),
                        help="patch size in voxels (default: 128 128 128, the pretraining patch)")
    parser.add_argument("--input-channels", type=at_least(1), default=1, help="input channels (default: 1)")
    parser.add_argument("--classes", type=at_least(2), default=105,
                        help="output classes incl. background (default: 105, the TotalSegmentator checkpoints)")
    add_backbone_file_option(parser)
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    load_backbone_files(args)
    emit(model_rows(tuple(args.patch), args.input_channels, args.classes, numbers_as_text=args.format == "table"),
         args.format)
    return 0


def model_rows(patch: tuple[int, int, int], input_channels: int, classes: int,
               numbers_as_text: bool = False) -> list[dict]:
    """One row per backbone (the Python side of `segbook models`)."""
    from segbook.backbones import all_backbones
    from segbook.backbones.models import count_cost
    from segbook.paths import Paths
    from stunet.checkpoints import WeightCache

    cache = WeightCache(Paths.from_env().weights)
    rows = []
    for backbone in all_backbones():
        cfg = backbone.pretrained
        parameters = macs = None
        if backbone.build is not None:  # nnU-Net's own network exists only for a task's plans
            parameters, macs = count_cost(backbone, patch, input_channels, classes)
        rows.append({
            "model": backbone.name,
            "family": backbone.family,
            "plans": backbone.plans,
            "parameters": (f"{parameters:,}" if numbers_as_text else parameters) if parameters is not None else "-",
            "forward TMACs": round(macs / 1e12, 3) if macs is not None else "-",
            "forward TFLOPs": round(2 * macs / 1e12, 3) if macs is not None else "-",
            "checkpoint formats": ",".join(backbone.checkpoint_formats) or "- (scratch only)",
            "checkpoint": cfg.filename if cfg else "-",
            "cached": ("yes" if cache.is_cached(cfg) else "no") if cfg else "-",
            "source": backbone.source,
        })
    return rows
