"""Per-case, per-label segmentation metrics: Dice, IoU, precision, recall, normalised surface Dice (NSD), HD95,
the confusion counts and, for lesion labels, lesion-wise detection counts (`segbook.evaluation.lesions`).

The definitions are the ones published results are computed with, so our numbers compare with theirs:
- Dice is nnU-Net's, 2TP / (2TP + FP + FN); IoU is TP / (TP + FP + FN), precision TP / (TP + FP), recall
  TP / (TP + FN), all from the same confusion counts (MedSegBench's set).
- NSD is MONAI's ``compute_surface_dice(..., use_subvoxels=True)``: DeepMind's surface elements ("surfels"), one per
  2x2x2 neighbourhood that straddles the boundary, weighted by the area of its marching-cubes patch; the score is
  the surfel area of both surfaces lying within the tolerance of the other surface, over the total surfel area.
- HD95 is MONAI's ``compute_hausdorff_distance(..., percentile=95)``: the larger of the two directed 95th
  percentiles of the distances between the boundary voxels (voxels with a 6-neighbour outside) of each mask.
Distances are in millimetres and rounded to float32 as MONAI does, so values agree to float32 precision.

Speed comes from never touching the whole volume per label: one ``find_objects`` pass per volume gives every
label's bounding box, and masks, surfaces and nearest-surface searches stay inside it. Searches use k-d trees over
surface points (as MONAI does on CPU), which beat dense distance transforms of the box because surfaces are a small
fraction of it, and skip the points that lie on both surfaces.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
from scipy import ndimage
from scipy.spatial import KDTree

from segbook.evaluation.lesions import NOT_A_LESION, lesion_counts

EmptyDice = Literal["nan", "one"]
Box = tuple[slice, ...]

HD_PERCENTILE = 95.0
# A 2x2x2 neighbourhood whose 8 voxels are all outside (code 0) or all inside (255) holds no surface.
_OUTSIDE, _INSIDE = 0, 255


def case_metrics(
    reference: np.ndarray,
    prediction: np.ndarray,
    labels: Sequence[int],
    spacing: Sequence[float],
    nsd_tolerance_mm: float = 2.0,
    empty_dice: EmptyDice = "nan",
    lesion_labels: Collection[int] = (),
) -> list[dict]:
    """Metrics of one case, one dict per label (in the order of ``labels``).

    Keys: label, dice, iou, precision, recall, nsd, hd95, tp, fp, fn, tn, reference_voxels, prediction_voxels,
    reference_volume_mm3, prediction_volume_mm3, lesions_reference, lesions_detected, lesions_false_positive (the
    lesion counts only for ``lesion_labels``, None for other labels). ``reference`` and ``prediction`` are integer
    label maps of the same 3D shape, ``spacing`` the voxel size in mm along their axes, ``labels`` the foreground
    labels to score.

    Empty masks (a label that the reference or the prediction lacks) follow one convention for every metric,
    metrics version 2 (`segbook.evaluation.files.METRICS_VERSION`), so that a missed or hallucinated structure can
    never improve a mean:
    - both empty: every metric is NaN (the pair is left out of means, nnU-Net's Dice convention), or with
      ``empty_dice="one"`` a perfect score: 1 for the fractions and NSD, 0 mm for HD95;
    - only one empty: dice, iou, precision, recall and nsd are 0 (precision of an empty prediction and recall of an
      empty reference are 0/0, counted as 0 like Dice); hd95 is the worst case, the largest distance between two
      voxel centres of the image (its diagonal, in mm), where MONAI gives inf and version 1 gave NaN, which left
      the worst cases out of the mean.
    """
    reference, prediction = _label_maps(reference, prediction)
    spacing_mm = _spacing(spacing)
    labels = [int(label) for label in labels]
    _check_options(labels, nsd_tolerance_mm, empty_dice)
    if not labels:
        return []
    boxes = _union_boxes(reference, prediction, labels)
    both_empty = math.nan if empty_dice == "nan" else 1.0
    worst_mm = worst_distance_mm(reference.shape, spacing_mm)
    lesions = {int(label) for label in lesion_labels}

    def one_label(label: int) -> dict:
        return _label_metrics(reference, prediction, label, boxes[label], spacing_mm, nsd_tolerance_mm, both_empty,
                              worst_mm, label in lesions)

    # Labels are independent and their time goes to numpy and scipy code that releases the GIL, so two threads
    # help (measured: 1.4x on 2 cores); the largest boxes go first so that neither thread finishes long after.
    largest_first = sorted(set(labels), key=lambda label: _box_voxels(boxes[label]), reverse=True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        rows = dict(zip(largest_first, pool.map(one_label, largest_first)))
    return [rows[label] for label in labels]


def worst_distance_mm(shape: tuple[int, ...], spacing: Sequence[float]) -> float:
    """The largest distance between two voxel centres of an image: HD95's worst case, for one empty mask."""
    return math.hypot(*((n - 1) * float(s) for n, s in zip(shape, spacing)))


def mean_ignoring_nan(values: Iterable[float]) -> float:
    """Mean of the values that are not NaN (NaN if none is): how nnU-Net averages a metric over labels or cases."""
    kept = [float(value) for value in values if not math.isnan(value)]
    return sum(kept) / len(kept) if kept else math.nan


def _label_maps(reference: np.ndarray, prediction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    reference, prediction = np.asarray(reference), np.asarray(prediction)
    if reference.shape != prediction.shape:
        raise ValueError(f"reference shape {reference.shape} differs from prediction shape {prediction.shape}")
    if reference.ndim != 3:
        raise ValueError(f"label maps must be 3D, got shape {reference.shape}")
    for name, volume in (("reference", reference), ("prediction", prediction)):
        if volume.dtype.kind not in "biu":
            raise ValueError(f"{name} must be an integer label map, got dtype {volume.dtype}")
    # find_objects needs integers; a boolean mask is the label map of label 1.
    return _integers(reference), _integers(prediction)


def _integers(volume: np.ndarray) -> np.ndarray:
    return volume.view(np.uint8) if volume.dtype == bool else volume


def _spacing(spacing: Sequence[float]) -> np.ndarray:
    spacing_mm = np.asarray(spacing, dtype=np.float64)
    if spacing_mm.shape != (3,) or not np.all(np.isfinite(spacing_mm) & (spacing_mm > 0)):
        raise ValueError(f"spacing must be three positive sizes in mm, got {spacing}")
    return spacing_mm


def _check_options(labels: Sequence[int], nsd_tolerance_mm: float, empty_dice: str) -> None:
    if any(label < 1 for label in labels):
        raise ValueError(f"labels must be foreground labels (>= 1), got {list(labels)}")
    if not (math.isfinite(nsd_tolerance_mm) and nsd_tolerance_mm >= 0):
        raise ValueError(f"nsd_tolerance_mm must be a finite distance >= 0, got {nsd_tolerance_mm}")
    if empty_dice not in ("nan", "one"):
        raise ValueError(f"empty_dice must be 'nan' or 'one', got {empty_dice!r}")


def _union_boxes(reference: np.ndarray, prediction: np.ndarray, labels: Sequence[int]) -> dict[int, Box | None]:
    """Bounding box of reference ∪ prediction for each label (None if in neither), from one pass per volume."""
    top = max(labels)
    reference_boxes = ndimage.find_objects(reference, max_label=top)
    prediction_boxes = ndimage.find_objects(prediction, max_label=top)
    return {label: _union(reference_boxes[label - 1], prediction_boxes[label - 1]) for label in labels}


def _union(first: Box | None, second: Box | None) -> Box | None:
    if first is None or second is None:
        return first or second
    return tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(first, second))


def _box_voxels(box: Box | None) -> int:
    return math.prod(s.stop - s.start for s in box) if box else 0


def _label_metrics(
    reference: np.ndarray,
    prediction: np.ndarray,
    label: int,
    box: Box | None,
    spacing: np.ndarray,
    tolerance: float,
    both_empty: float,
    worst_mm: float,
    lesion: bool,
) -> dict:
    ref, pred = _padded_mask(reference, box, label), _padded_mask(prediction, box, label)
    tp = int(np.count_nonzero(ref & pred))  # Python numbers, so rows go to JSON and CSV as they are
    n_ref, n_pred = int(np.count_nonzero(ref)), int(np.count_nonzero(pred))
    if n_ref and n_pred:
        nsd, hd95 = _nsd(ref, pred, spacing, tolerance), _hd95(ref, pred, spacing)
    else:
        # one empty: NSD 0 and HD95 the worst case; both: undefined (NaN), or perfect with empty_dice "one"
        perfect_hd95 = math.nan if math.isnan(both_empty) else 0.0
        nsd, hd95 = (0.0, worst_mm) if n_ref or n_pred else (both_empty, perfect_hd95)
    fp, fn = n_pred - tp, n_ref - tp
    voxel_mm3 = float(np.prod(spacing))
    return {
        "label": label,
        "dice": 2 * tp / (2 * tp + fp + fn) if n_ref or n_pred else both_empty,
        **_overlap_ratios(tp, fp, fn, both_empty),
        "nsd": nsd,
        "hd95": hd95,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": reference.size - tp - fp - fn,
        "reference_voxels": n_ref,
        "prediction_voxels": n_pred,
        "reference_volume_mm3": n_ref * voxel_mm3,
        "prediction_volume_mm3": n_pred * voxel_mm3,
        **(lesion_counts(ref, pred) if lesion else NOT_A_LESION),
    }


def _overlap_ratios(tp: int, fp: int, fn: int, both_empty: float) -> dict[str, float]:
    """IoU, precision and recall from the confusion counts, with the empty-mask rules of `case_metrics`."""
    if tp + fp + fn == 0:
        return {"iou": both_empty, "precision": both_empty, "recall": both_empty}
    return {"iou": tp / (tp + fp + fn), "precision": tp / (tp + fp) if tp + fp else 0.0,
            "recall": tp / (tp + fn) if tp + fn else 0.0}


def _padded_mask(volume: np.ndarray, box: Box | None, label: int) -> np.ndarray:
    """The label's mask inside ``box`` with one background voxel all round (MONAI's crop margin), so that
    surfaces close on the image border and every surface point of the label lies in the array."""
    if box is None:
        return np.zeros((0, 0, 0), dtype=bool)
    mask = np.zeros(tuple(s.stop - s.start + 2 for s in box), dtype=bool)
    np.equal(volume[box], label, out=mask[1:-1, 1:-1, 1:-1])
    return mask


def _nsd(ref: np.ndarray, pred: np.ndarray, spacing: np.ndarray, tolerance: float) -> float:
    ref_codes, pred_codes = _neighbour_codes(ref), _neighbour_codes(pred)
    ref_surface, pred_surface = _on_surface(ref_codes), _on_surface(pred_codes)
    areas = _surfel_area_table(tuple(spacing.tolist()))  # mm² per neighbourhood code
    ref_areas, pred_areas = areas[ref_codes[ref_surface]], areas[pred_codes[pred_surface]]
    limit = np.float32(tolerance)  # MONAI compares float32 distances with the tolerance in float32
    reach = tolerance * (1 + 1e-6) + 1e-9  # covers every float64 distance that rounds to <= limit
    ref_close = _surface_distances(ref_surface, pred_surface, spacing, reach) <= limit
    pred_close = _surface_distances(pred_surface, ref_surface, spacing, reach) <= limit
    close = ref_areas[ref_close].sum() + pred_areas[pred_close].sum()
    return float(close / (ref_areas.sum() + pred_areas.sum()))


def _neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """8-bit code of every 2x2x2 neighbourhood: bit 7 - (4a + 2b + c) is set when voxel (i+a, j+b, k+c) is inside.

    That is the bit order of MONAI's encoding kernel, built one axis at a time (3 passes instead of 8)."""
    bits = mask.view(np.uint8)
    pairs = (bits[:, :, :-1] << 1) | bits[:, :, 1:]
    quads = (pairs[:, :-1] << 2) | pairs[:, 1:]
    return (quads[:-1] << 4) | quads[1:]


def _on_surface(codes: np.ndarray) -> np.ndarray:
    """Neighbourhoods that hold a surfel: some of their 8 voxels inside the mask and some outside."""
    return (codes != _OUTSIDE) & (codes != _INSIDE)


@functools.lru_cache(maxsize=32)
def _surfel_area_table(spacing: tuple[float, ...]) -> np.ndarray:
    """Surface area (mm²) of the marching-cubes patch of each of the 256 neighbourhood codes at this spacing.

    The table is DeepMind's surface-distance definition as MONAI ships it; reading it from MONAI rather than
    retyping 256 triangulations is what keeps our NSD equal to MONAI's."""
    from monai.metrics.utils import get_code_to_measure_table

    table, _ = get_code_to_measure_table(spacing)
    return table.cpu().numpy().astype(np.float64)


def _hd95(ref: np.ndarray, pred: np.ndarray, spacing: np.ndarray) -> float:
    ref_edges, pred_edges = _edge_voxels(ref), _edge_voxels(pred)
    return max(
        _percentile(_surface_distances(pred_edges, ref_edges, spacing), HD_PERCENTILE),
        _percentile(_surface_distances(ref_edges, pred_edges, spacing), HD_PERCENTILE),
    )


def _edge_voxels(mask: np.ndarray) -> np.ndarray:
    """The mask's voxels that have a 6-neighbour outside it (MONAI's edges when it does not use subvoxels)."""
    return mask & ~ndimage.binary_erosion(mask)


def _surface_distances(
    surface: np.ndarray, other: np.ndarray, spacing: np.ndarray, reach: float = math.inf
) -> np.ndarray:
    """Distance (mm, float32) from each point of ``surface`` (in C order) to the nearest point of ``other``.

    Points on both surfaces are at distance 0, and good predictions make them common, so only the others are
    searched for (inf if nothing is within ``reach``). The search is an exact Euclidean nearest neighbour on the
    same grid coordinates as MONAI's CPU path, and the rounding to float32 is MONAI's too."""
    distances = np.zeros(np.count_nonzero(surface), dtype=np.float32)
    apart = ~other[surface]
    if apart.any():
        tree = KDTree(np.argwhere(other) * spacing, leafsize=32)
        distances[apart], _ = tree.query(np.argwhere(surface & ~other) * spacing, k=1, distance_upper_bound=reach)
    return distances


def _percentile(distances: np.ndarray, percentile: float) -> float:
    """torch.quantile in float32: the same arithmetic (float32 rank and interpolation) as MONAI's HD95."""
    import torch

    return float(torch.quantile(torch.from_numpy(distances), percentile / 100))
