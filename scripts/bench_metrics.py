"""Time segbook's case_metrics against MONAI's metrics on one synthetic CT-sized case, and check they agree.

Both sides score the same 13-organ label map (organ-like blobs of realistic volumes) against a perturbed copy
(boundary errors, a shift, a few false-positive specks), in one run, so the ratio compares like with like:
- segbook: ``case_metrics`` (Dice, NSD, HD95, counts for every label);
- MONAI: per label, binary one-hot masks, ``compute_dice``, ``compute_surface_dice(use_subvoxels=True)`` and
  ``compute_hausdorff_distance(percentile=95)``. One label at a time is how MONAI loops anyway, and it spares the
  baseline a 13-channel float copy of the volume.

    python scripts/bench_metrics.py            # 512x512x200, 13 labels, spacing 0.8 x 0.8 x 2.5 mm: about 1.5 min
    python scripts/bench_metrics.py --quick    # 256x256x100 at twice the spacing: a few seconds

(from the repository root, with segbook installed or PYTHONPATH=.)
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
from scipy import ndimage

from segbook.evaluation.metrics import case_metrics

# (name, volume in ml, relative semi-axes along the three axes): abdominal organs of an adult, roughly.
ORGANS = [
    ("spleen", 200, (1.0, 0.6, 1.1)),
    ("kidney_right", 150, (0.6, 0.55, 1.0)),
    ("kidney_left", 150, (0.6, 0.55, 1.0)),
    ("gallbladder", 40, (0.5, 0.5, 1.0)),
    ("esophagus", 30, (0.25, 0.25, 2.5)),
    ("liver", 1600, (1.3, 1.0, 0.9)),
    ("stomach", 400, (1.0, 0.7, 0.9)),
    ("aorta", 110, (0.18, 0.18, 3.0)),
    ("inferior_vena_cava", 70, (0.18, 0.15, 2.4)),
    ("portal_vein", 20, (0.6, 0.12, 0.12)),
    ("pancreas", 80, (1.6, 0.35, 0.35)),
    ("adrenal_right", 6, (0.35, 0.2, 0.6)),
    ("adrenal_left", 6, (0.35, 0.2, 0.6)),
]


def main() -> None:
    args = _parse_args()
    import monai.metrics  # noqa: F401  (both sides use torch and MONAI: import them before any clock starts)

    shape, spacing = tuple(args.shape), tuple(args.spacing)
    labels = list(range(1, args.labels + 1))
    print(f"volume {shape}, spacing {spacing} mm, {len(labels)} labels, NSD tolerance {args.tolerance} mm")
    reference, prediction = synthetic_case(shape, spacing, len(labels), seed=args.seed)
    print("voxels per label:", [int(n) for n in np.bincount(reference.ravel(), minlength=len(labels) + 1)[1:]])

    arguments = (reference, prediction, labels, spacing, args.tolerance)
    ours_time, ours = _timed(lambda: case_metrics(*arguments), args.repeats)
    print(f"segbook case_metrics: {ours_time:.2f} s")
    monai_time, theirs = _timed(lambda: monai_metrics(*arguments), args.repeats)
    print(f"MONAI:                {monai_time:.2f} s")
    print(f"speed-up: {monai_time / ours_time:.1f}x (median of {args.repeats} run(s) each)")

    for metric in ("dice", "nsd", "hd95"):
        diffs = [_difference(row[metric], other[metric]) for row, other in zip(ours, theirs)]
        print(f"max |segbook - MONAI| {metric}: {max(diffs):.3g}")
    print(f"{'label':>5} {'dice':>7} {'nsd':>7} {'hd95':>7}")
    for row in ours:
        print(f"{row['label']:>5} {row['dice']:7.4f} {row['nsd']:7.4f} {row['hd95']:7.2f}")


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 200])
    parser.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 2.5], help="mm along the three axes")
    parser.add_argument("--labels", type=int, default=len(ORGANS), choices=range(1, len(ORGANS) + 1))
    parser.add_argument("--tolerance", type=float, default=2.0, help="NSD tolerance in mm")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="256x256x100 at 1.6 x 1.6 x 5 mm")
    args = parser.parse_args()
    if args.quick:
        args.shape, args.spacing = [256, 256, 100], [1.6, 1.6, 5.0]
    return args


def synthetic_case(
    shape: tuple[int, ...], spacing: tuple[float, ...], n_labels: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A label map of irregular organ-sized blobs, and a prediction that gets their boundaries partly wrong."""
    rng = np.random.default_rng(seed)
    reference = np.zeros(shape, dtype=np.uint8)
    for label, (_, volume_ml, axes) in enumerate(ORGANS[:n_labels], start=1):
        _draw_organ(reference, label, volume_ml, axes, spacing, rng)
    prediction = reference.copy()
    for label, found in enumerate(ndimage.find_objects(reference), start=1):
        if found is not None:
            _perturb(prediction, reference, label, found, rng)
    return reference, prediction


def _draw_organ(
    volume: np.ndarray,
    label: int,
    volume_ml: float,
    axes: tuple[float, ...],
    spacing: tuple[float, ...],
    rng: np.random.Generator,
) -> None:
    """An ellipsoid of the given volume whose radius varies smoothly by up to ±25 %, somewhere in the middle."""
    scale = (volume_ml * 1000 / (4 / 3 * math.pi * math.prod(axes))) ** (1 / 3)
    radii = np.array([a * scale / s for a, s in zip(axes, spacing)])  # semi-axes in voxels
    half = np.minimum(np.ceil(radii * 1.3).astype(int) + 1, np.array(volume.shape) // 2 - 1)
    centre = [rng.integers(h, n - h) if n > 2 * h else n // 2 for h, n in zip(half, volume.shape)]
    box = tuple(slice(c - h, c + h + 1) for c, h in zip(centre, half))
    grid = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    radius = np.sqrt(sum((g / r) ** 2 for g, r in zip(grid, radii)))
    volume[box][radius < 1 + 0.25 * _smooth_noise(radius.shape, rng)] = label


def _smooth_noise(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid interpolated up to ``shape``."""
    coarse = rng.uniform(-1, 1, size=(5, 5, 5))
    return ndimage.zoom(coarse, [n / 5 for n in shape], order=3, grid_mode=True, mode="nearest").clip(-1, 1)


def _perturb(
    prediction: np.ndarray, reference: np.ndarray, label: int, found: tuple[slice, ...], rng: np.random.Generator
) -> None:
    """Grow the label by a voxel in some places, shrink it in others, shift it by up to a voxel in-plane, and add
    a few false-positive specks: errors of a decent model (Dice about 0.9)."""
    box = tuple(slice(max(s.start - 4, 0), s.stop + 4) for s in found)
    mask = reference[box] == label
    noise = _smooth_noise(mask.shape, rng)
    grown, shrunk = ndimage.binary_dilation(mask), ndimage.binary_erosion(mask)
    new = np.where(noise > 0.3, grown, np.where(noise < -0.3, shrunk, mask))
    new = np.roll(new, rng.integers(-1, 2, size=2), axis=(0, 1))
    new |= (rng.random(mask.shape) < 2e-5) & ~grown
    crop = prediction[box]
    crop[mask & ~new] = 0
    crop[new] = label


def monai_metrics(
    reference: np.ndarray, prediction: np.ndarray, labels: list[int], spacing: tuple[float, ...], tolerance: float
) -> list[dict]:
    """Dice, NSD and HD95 per label with MONAI's functions, on binary one-hot masks of one label at a time."""
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    rows = []
    for label in labels:
        ref = torch.from_numpy(reference == label)[None, None]
        pred = torch.from_numpy(prediction == label)[None, None]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # empty-mask warnings; every label is present here
            nsd = compute_surface_dice(pred, ref, [tolerance], True, spacing=list(spacing), use_subvoxels=True)
            hd95 = compute_hausdorff_distance(pred, ref, True, percentile=95, spacing=list(spacing))
            dice = compute_dice(pred, ref, include_background=True)
        rows.append({"label": label, "dice": dice.item(), "nsd": nsd.item(), "hd95": hd95.item()})
    return rows


def _difference(ours: float, theirs: float) -> float:
    """|ours - theirs|; NaN and inf agree with each other (segbook reports MONAI's inf for an empty mask as NaN)."""
    if math.isfinite(ours) and math.isfinite(theirs):
        return abs(ours - theirs)
    return math.inf if math.isfinite(ours) or math.isfinite(theirs) else 0.0


def _timed(function: Callable[[], list[dict]], repeats: int) -> tuple[float, list[dict]]:
    times, result = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


if __name__ == "__main__":
    main()
