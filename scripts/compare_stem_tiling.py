"""How much the two stem tilings differ: one single-channel STU-Net loaded into a 4-channel network twice, with the
first block repeated across channels (`repeat`, the official loaders' way) and repeated then divided by 4 (`mean`).

Both networks get the same fresh heads, so every difference comes from the stem. Printed per seed, for an input of
one channel repeated four times and for four correlated channels (each 0.8 x a shared image + 0.6 x its own noise,
unit variance, like z-scored MRI sequences of one patient):
- the first block's output: relative L2 difference ||repeat - mean|| / ||repeat||;
- the whole network (eval mode, full-resolution output): relative L2 difference of the logits and the share of
  voxels whose predicted class differs.

The weights are PyTorch's initialisation, not the TotalSegmentator checkpoints (which need a download): the figures
show that the tilings start from different networks and by how much for an untrained body, not the effect on a
fine-tuned score.

    python scripts/compare_stem_tiling.py                      # STU-Net small, 64^3, seeds 0-2: about 10 s on 2 cores
    python scripts/compare_stem_tiling.py --model tiny --patch 32

(from the repository root, with segbook installed or PYTHONPATH=.)
"""

from __future__ import annotations

import argparse

import torch

from stunet import create_stunet, load_pretrained

CHANNELS = 4
CLASSES = 4


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def inputs(patch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    shared = torch.randn(1, 1, patch, patch, patch, generator=generator)
    own = torch.randn(1, CHANNELS, patch, patch, patch, generator=generator)
    return {"one channel x4": shared.repeat(1, CHANNELS, 1, 1, 1), "4 correlated": 0.8 * shared + 0.6 * own}


def compare(model: str, patch: int, seed: int) -> list[tuple[str, float, float, float]]:
    torch.manual_seed(seed)
    source = create_stunet(model, 1, 105).state_dict()
    networks = {}
    for tiling in ("repeat", "mean"):
        torch.manual_seed(seed + 1000)  # the same fresh heads (and everything else) for both
        network = create_stunet(model, CHANNELS, CLASSES, enable_deep_supervision=False)
        load_pretrained(network, source, tiling=tiling)
        networks[tiling] = network.eval()
    rows = []
    generator = torch.Generator().manual_seed(seed)
    for name, image in inputs(patch, generator).items():
        with torch.no_grad():
            first = {t: n.conv_blocks_context[0](image) for t, n in networks.items()}
            logits = {t: n(image) for t, n in networks.items()}
        changed = float((logits["repeat"].argmax(1) != logits["mean"].argmax(1)).float().mean())
        rows.append((name, relative(first["mean"], first["repeat"]), relative(logits["mean"], logits["repeat"]),
                     changed))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small", choices=("tiny", "small", "base"))
    parser.add_argument("--patch", type=int, default=64, help="cube edge in voxels (a multiple of 32)")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"STU-Net {args.model}, {CHANNELS} input channels, {args.patch}^3, repeat vs mean")
    print(f"{'seed':>4}  {'input':<15} {'first block':>12} {'logits':>8} {'class changed':>14}")
    for seed in range(args.seeds):
        for name, first, logits, changed in compare(args.model, args.patch, seed):
            print(f"{seed:>4}  {name:<15} {first:>12.3f} {logits:>8.3f} {100 * changed:>13.1f}%")


if __name__ == "__main__":
    main()
