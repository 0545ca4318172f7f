"""A test-only Primus size (embed 48, depth 2, 2 heads): Primus' code at a size CPUs train in seconds."""

from segbook.backbones import primus_backbone

BACKBONES = [primus_backbone("primus-tiny", 48, 2, 2, cost=None)]
