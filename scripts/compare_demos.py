"""Compare two `segbook demo` output folders stage by stage, to the bit: where two runs part, and how far.

    python scripts/compare_demos.py /tmp/demo-a /tmp/demo-b

The README promises that the same seed gives the same tables; the tables are rounded, so this checks everything
they come from, in pipeline order: the synthetic sources, the imported raw datasets, nnU-Net's fingerprints and
plans, the preprocessed cases, pretraining (each epoch's losses and pseudo-Dice, the final weights), the exported
checkpoint, and every target run (its epochs, final weights and per-case test metrics). The first stage that
differs is where to look; the stages after it differ because it does. Files that hold paths or times (import
records, logs, `run.json`, progress plots) are left out: they differ between any two runs.

Exit status 0 when every stage is identical, 1 when one differs, 2 when a folder is not a finished demo.
(From the repository root, with segbook installed or PYTHONPATH=.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

#: (stage, glob under the demo folder, how to compare), in pipeline order.
STAGES = (
    ("synthetic sources", "sources/**/*", "bytes"),
    ("raw datasets", "home/nnUNet_raw/**/*", "bytes"),
    ("fingerprints", "home/nnUNet_preprocessed/*/dataset_fingerprint.json", "bytes"),
    ("plans", "home/nnUNet_preprocessed/*/nnUNetPlans.json", "bytes"),
    ("preprocessed cases", "home/nnUNet_preprocessed/*/nnUNetPlans_3d_fullres/*", "bytes"),
    ("pretraining epochs", "pretraining/*/*/fold_all/epochs.jsonl", "epochs"),
    ("pretraining final weights", "pretraining/*/*/fold_all/checkpoint_final.pth", "weights"),
    ("exported checkpoint", "weights/*.model", "weights"),
    ("target runs' epochs", "home/nnUNet_results/*/*/fold_all/epochs.jsonl", "epochs"),
    ("target runs' final weights", "home/nnUNet_results/*/*/fold_all/checkpoint_final.pth", "weights"),
    ("target runs' test metrics", "home/nnUNet_results/*/*/fold_all/evaluation/metrics.csv", "bytes"),
)
EPOCH_FIELDS = ("train_loss", "val_loss", "pseudo_dice")
#: Files that record paths or times.
SKIPPED = {"segbook_import.json"}


def compare(first: Path, second: Path) -> list[tuple[str, int, list[str]]]:
    """(stage, files compared, differences) for every stage; a file found in one folder only is a difference."""
    return [(stage, *_compare_stage(first, second, pattern, kind)) for stage, pattern, kind in STAGES]


def _compare_stage(first: Path, second: Path, pattern: str, kind: str) -> tuple[int, list[str]]:
    names = {path.relative_to(root) for root in (first, second) for path in root.glob(pattern)
             if path.is_file() and path.name not in SKIPPED}
    differences = []
    for name in sorted(names):
        a, b = first / name, second / name
        if not (a.is_file() and b.is_file()):
            differences.append(f"{name}: only in {first if a.is_file() else second}")
            continue
        difference = {"bytes": _bytes, "epochs": _epochs, "weights": _weights}[kind](a, b)
        if difference:
            differences.append(f"{name}: {difference}")
    return len(names), differences


def _bytes(a: Path, b: Path) -> str | None:
    digests = [hashlib.sha256(path.read_bytes()).hexdigest()[:12] for path in (a, b)]
    return None if digests[0] == digests[1] else f"SHA-256 {digests[0]}... vs {digests[1]}..."


def _epochs(a: Path, b: Path) -> str | None:
    """The first epoch whose losses or pseudo-Dice differ (times differ always, and are not compared)."""
    epochs = [[json.loads(line) for line in path.read_text().splitlines() if line.strip()] for path in (a, b)]
    if len(epochs[0]) != len(epochs[1]):
        return f"{len(epochs[0])} vs {len(epochs[1])} epochs"
    for one, other in zip(*epochs):
        changed = [field for field in EPOCH_FIELDS if one.get(field) != other.get(field)]
        if changed:
            field = changed[0]
            return f"epoch {one.get('epoch')}: {field} {one.get(field)!r} vs {other.get(field)!r}"
    return None


def _weights(a: Path, b: Path) -> str | None:
    """The largest difference over all tensors, and where (checkpoints are read safely: no pickled code runs)."""
    from stunet import read_state_dict

    one, other = read_state_dict(a), read_state_dict(b)
    if one.keys() != other.keys():
        return f"different tensors: {sorted(one.keys() ^ other.keys())[:3]}"
    worst, where = 0.0, ""
    for key, tensor in one.items():
        if tensor.shape != other[key].shape:
            return f"{key}: shape {tuple(tensor.shape)} vs {tuple(other[key].shape)}"
        difference = (tensor.double() - other[key].double()).abs().max().item() if tensor.numel() else 0.0
        if difference > worst:
            worst, where = difference, key
    return f"max |difference| {worst:.3g} ({where})" if worst else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare two `segbook demo` output folders stage by stage.")
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    args = parser.parse_args(argv)
    for folder in (args.first, args.second):
        if not (folder / "report.html").is_file():
            print(f"compare_demos: error: {folder} is not a finished demo folder (no report.html)", file=sys.stderr)
            return 2
    torch.set_num_threads(1)
    differing = 0
    for stage, count, differences in compare(args.first, args.second):
        print(f"{'DIFFERS  ' if differences else 'identical'}  {stage} ({count} files)")
        for line in differences[:5]:
            print(f"           {line}")
        if len(differences) > 5:
            print(f"           ... and {len(differences) - 5} more")
        differing += bool(differences)
    print(f"{differing} of {len(STAGES)} stages differ" if differing else "every stage is identical")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
