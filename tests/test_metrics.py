"""segbook's metrics against the references they promise to equal, to 1e-6: MONAI for NSD (subvoxel surfels) and
HD95, nnU-Net for Dice and the confusion counts. Random, edge-case and real masks, isotropic and anisotropic."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice
from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn
from scipy import ndimage
from sklearn.metrics import jaccard_score, precision_score, recall_score

from segbook.evaluation.metrics import case_metrics, mean_ignoring_nan

ABS = 1e-6
ANISOTROPIC = (3.0, 0.8, 0.8)
LESION_KEYS = {"lesions_reference", "lesions_detected", "lesions_false_positive"}
KEYS = {
    "label", "dice", "iou", "precision", "recall", "nsd", "hd95", "tp", "fp", "fn", "tn",
    "reference_voxels", "prediction_voxels", "reference_volume_mm3", "prediction_volume_mm3", *LESION_KEYS,
}  # fmt: skip


def expected_metrics(
    reference: np.ndarray, prediction: np.ndarray, label: int, spacing: tuple[float, ...], tolerance: float
) -> dict:
    """Dice and counts as nnU-Net computes them, NSD and HD95 as MONAI does (where only one mask is empty, MONAI's
    NaN replaced by the worst case: the distance between opposite corner voxels of the image), IoU, precision and
    recall as scikit-learn does (its zero_division=0 is our rule for one empty mask)."""
    ref, pred = reference == label, prediction == label
    tp, fp, fn, tn = (int(n) for n in compute_tp_fp_fn_tn(ref, pred))
    y, y_pred = torch.from_numpy(ref)[None, None], torch.from_numpy(pred)[None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about empty masks, which some tests are about
        nsd = compute_surface_dice(y_pred, y, [tolerance], True, spacing=list(spacing), use_subvoxels=True).item()
        hd95 = compute_hausdorff_distance(y_pred, y, True, percentile=95, spacing=list(spacing)).item()
    flat_ref, flat_pred = ref.ravel(), pred.ravel()
    ratios = {name: math.nan if tp + fp + fn == 0 else float(score(flat_ref, flat_pred, zero_division=0))
              for name, score in (("iou", jaccard_score), ("precision", precision_score), ("recall", recall_score))}
    return {
        **ratios,
        "dice": math.nan if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn),
        "nsd": nsd,
        "hd95": diagonal_mm(reference.shape, spacing) if ref.any() != pred.any() else hd95,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


def diagonal_mm(shape: tuple[int, ...], spacing: tuple[float, ...]) -> float:
    corner = np.array(shape) - 1
    return float(np.linalg.norm(corner * np.array(spacing)))


def assert_matches_references(
    reference: np.ndarray,
    prediction: np.ndarray,
    labels: list[int],
    spacing: tuple[float, ...],
    tolerance: float = 2.0,
) -> list[dict]:
    rows = case_metrics(reference, prediction, labels, spacing, nsd_tolerance_mm=tolerance)
    assert [row["label"] for row in rows] == labels
    for row in rows:
        expected = expected_metrics(reference, prediction, row["label"], spacing, tolerance)
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, abs=ABS, nan_ok=True), f"label {row['label']} {key}"
    return rows


def blobs(shape: tuple[int, ...], n_labels: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth random blobs, several per label, some cut by the volume border."""
    volume = np.zeros(shape, dtype=np.uint8)
    for label in range(1, n_labels + 1):
        field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=3)
        volume[field > np.quantile(field, 0.96)] = label
    return volume


def perturbed(reference: np.ndarray, labels: list[int], rng: np.random.Generator) -> np.ndarray:
    """A plausible prediction: each label eroded, dilated or shifted, plus scattered false positives."""
    prediction = reference.copy()
    for label in labels:
        mask = reference == label
        change = rng.integers(3)
        if change == 0:
            new = ndimage.binary_erosion(mask)
        elif change == 1:
            new = ndimage.binary_dilation(mask)
        else:
            new = np.roll(mask, tuple(rng.integers(-2, 3, size=3)), axis=(0, 1, 2))
        prediction[mask & ~new] = 0
        prediction[new] = label
    specks = rng.random(reference.shape) < 2e-4
    prediction[specks] = rng.choice(labels, size=int(specks.sum()))
    return prediction


@pytest.mark.parametrize(
    ("seed", "spacing", "tolerance"),
    [(0, (1.0, 1.0, 1.0), 2.0), (1, ANISOTROPIC, 2.0), (2, (0.7, 1.3, 2.1), 1.0), (3, ANISOTROPIC, 5.0)],
)
def test_random_blobs_match_monai_and_nnunet(seed: int, spacing: tuple[float, ...], tolerance: float) -> None:
    rng = np.random.default_rng(seed)
    labels = [1, 2, 3, 4, 5]
    reference = blobs((48, 40, 32), len(labels), rng)
    assert_matches_references(reference, perturbed(reference, labels, rng), labels, spacing, tolerance)


def test_empty_masks_score_zero_and_the_worst_hd95_or_are_left_out_when_both_are_empty() -> None:
    reference = np.zeros((20, 24, 16), dtype=np.uint8)
    prediction = np.zeros_like(reference)
    reference[5:10, 6:12, 4:9] = 1  # only in the reference
    prediction[8:14, 3:9, 2:7] = 2  # only in the prediction; label 3 is in neither
    rows = assert_matches_references(reference, prediction, [1, 2, 3], ANISOTROPIC)
    assert [(row["dice"], row["nsd"]) for row in rows[:2]] == [(0.0, 0.0), (0.0, 0.0)]
    assert [(row["iou"], row["precision"], row["recall"]) for row in rows[:2]] == [(0.0, 0.0, 0.0)] * 2
    worst = math.sqrt((19 * 3.0) ** 2 + (23 * 0.8) ** 2 + (15 * 0.8) ** 2)
    assert [row["hd95"] for row in rows[:2]] == [pytest.approx(worst)] * 2
    assert all(math.isnan(rows[2][key]) for key in ("dice", "nsd", "iou", "precision", "recall", "hd95"))


def test_a_missed_structure_cannot_improve_the_mean_hd95() -> None:
    """Averaged over two cases, a run that misses the structure in one of them has a worse HD95 than its HD95 on
    the case it found: the miss counts as the worst case instead of dropping out of the mean."""
    reference = np.zeros((24, 24, 24), dtype=np.uint8)
    reference[6:14, 6:14, 6:14] = 1
    shifted = np.roll(reference, 3, axis=0)  # found, 3 voxels off
    found = case_metrics(reference, shifted, [1], ANISOTROPIC)[0]
    missed = case_metrics(reference, np.zeros_like(reference), [1], ANISOTROPIC)[0]
    assert missed["hd95"] > found["hd95"] > 0
    mean = mean_ignoring_nan([found["hd95"], missed["hd95"]])
    assert mean == pytest.approx((found["hd95"] + diagonal_mm(reference.shape, ANISOTROPIC)) / 2)
    assert mean > found["hd95"]


def test_one_voxel_masks() -> None:
    reference = np.zeros((16, 16, 16), dtype=np.uint8)
    prediction = np.zeros_like(reference)
    reference[4, 5, 6] = prediction[4, 5, 6] = 1  # the same voxel
    reference[10, 10, 10] = 2
    prediction[12, 9, 11] = 2  # a voxel nearby
    reference[2, 12, 3] = 3
    prediction[1:4, 11:14, 2:5] = 3  # one voxel inside a small cube
    rows = assert_matches_references(reference, prediction, [1, 2, 3], ANISOTROPIC)
    assert (rows[0]["dice"], rows[0]["nsd"], rows[0]["hd95"]) == (1.0, 1.0, 0.0)


def test_masks_touching_the_volume_border() -> None:
    rng = np.random.default_rng(4)
    reference = np.zeros((24, 20, 16), dtype=np.uint8)
    reference[0:3] = 1  # a slab on one face
    reference[:, :, 12:] = 2  # a slab on the opposite face of another axis
    reference[18:, 15:, :4] = 3  # a block in a corner
    reference[10:14, 8:12, 6:10] = 4
    reference[:, 0, :] = 5  # a one-voxel-thick wall
    prediction = perturbed(reference, [1, 2, 3, 4, 5], rng)
    prediction[-1, -1, -1] = 4  # a false positive in the far corner
    assert_matches_references(reference, prediction, [1, 2, 3, 4, 5], ANISOTROPIC)
    assert_matches_references(reference, prediction, [1, 2, 3, 4, 5], (1.0, 1.0, 1.0))


@pytest.mark.parametrize(
    ("spacing", "tolerance"), [((1.0, 1.0, 1.0), 2.0), ((2.5, 0.8, 0.8), 1.6), ((2.5, 0.8, 0.8), 2.5)]
)
def test_distances_equal_to_the_tolerance_count_as_in_monai(spacing: tuple[float, ...], tolerance: float) -> None:
    """Shifts of whole voxels put many surface distances exactly at the tolerance, where rounding decides."""
    reference = np.zeros((24, 24, 24), dtype=np.uint8)
    reference[6:16, 5:17, 7:15] = 1
    reference[3:8, 17:22, 15:21] = 2
    prediction = np.zeros_like(reference)
    prediction[8:18, 5:17, 7:15] = 1  # 2 voxels along the first axis
    prediction[3:8, 19:24, 15:21] = 2  # 2 voxels along the second axis
    assert_matches_references(reference, prediction, [1, 2], spacing, tolerance)


@pytest.mark.slow
def test_real_segmentation_with_eroded_and_shifted_labels(shared) -> None:
    import nibabel as nib

    image = nib.load(shared / "totalsegmentator_example" / "seg.nii.gz")
    reference = np.asanyarray(image.dataobj)
    spacing = tuple(float(s) for s in image.header.get_zooms()[:3])
    labels = [int(label) for label in np.unique(reference) if label > 0]
    rng = np.random.default_rng(5)
    prediction = perturbed(reference, labels, rng)
    prediction[prediction == labels[0]] = 0  # a structure the model missed
    labels.append(max(labels) + 1)  # a structure in neither
    assert_matches_references(reference, prediction, labels, spacing)


def test_counts_and_volumes_add_up() -> None:
    rng = np.random.default_rng(6)
    reference = blobs((30, 28, 26), 3, rng)
    prediction = perturbed(reference, [1, 2, 3], rng)
    spacing = (1.5, 0.5, 2.0)
    rows = case_metrics(reference, prediction, [3, 1, 2, 1], spacing, lesion_labels=[2])
    assert [row["label"] for row in rows] == [3, 1, 2, 1]
    for row in rows:
        assert set(row) == KEYS
        lesion = row["label"] == 2
        assert all(type(value) in (int, float) for key, value in row.items()  # plain numbers: JSON-ready
                   if lesion or key not in LESION_KEYS)
        assert all((row[key] is None) != lesion for key in LESION_KEYS)  # lesion counts for lesion labels only
        n_ref, n_pred = int((reference == row["label"]).sum()), int((prediction == row["label"]).sum())
        assert (row["reference_voxels"], row["prediction_voxels"]) == (n_ref, n_pred)
        assert row["tp"] + row["fn"] == n_ref and row["tp"] + row["fp"] == n_pred
        assert row["tp"] + row["fp"] + row["fn"] + row["tn"] == reference.size
        assert row["reference_volume_mm3"] == pytest.approx(n_ref * 1.5)
        assert row["prediction_volume_mm3"] == pytest.approx(n_pred * 1.5)


def test_boolean_masks_are_label_maps_of_label_one() -> None:
    reference = np.zeros((10, 10, 10), dtype=bool)
    reference[2:6, 3:7, 4:8] = True
    prediction = np.roll(reference, 1, axis=0)
    assert case_metrics(reference, prediction, [1], ANISOTROPIC) == case_metrics(
        reference.astype(np.int16), prediction.astype(np.int16), [1], ANISOTROPIC
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prediction": np.zeros((8, 8, 9), np.uint8)}, r"\(8, 8, 8\) differs from prediction shape \(8, 8, 9\)"),
        ({"prediction": np.zeros((8, 8, 8), np.float32)}, "integer label map"),
        ({"labels": [0, 1]}, "foreground labels"),
        ({"spacing": (1.0, 1.0)}, "three positive sizes"),
        ({"nsd_tolerance_mm": -1.0}, "finite distance"),
        ({"empty_dice": "zero"}, "'nan' or 'one'"),
    ],
)
def test_invalid_inputs_are_rejected(change: dict, message: str) -> None:
    arguments = {"reference": np.zeros((8, 8, 8), np.uint8), "prediction": np.zeros((8, 8, 8), np.uint8)}
    arguments |= {"labels": [1], "spacing": (1.0, 1.0, 1.0)} | change
    with pytest.raises(ValueError, match=message):
        case_metrics(**arguments)


def test_mean_ignoring_nan() -> None:
    assert mean_ignoring_nan([0.5, math.nan, 1.0]) == 0.75
    assert math.isnan(mean_ignoring_nan([math.nan, math.nan]))
    assert math.isnan(mean_ignoring_nan([]))
