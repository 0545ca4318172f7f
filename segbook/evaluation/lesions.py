"""Lesion-wise detection: how many reference lesions a prediction finds, and how many lesions it invents.

Dice over a whole label hides a missed small lesion behind a well-segmented large one; lesion studies report
detection instead. A lesion is a 3D connected component of a lesion label's mask, with 26-connectivity (voxels
touching by a face, an edge or a corner belong to one lesion, as in the lesion-wise evaluations of the autoPET and
BraTS challenges), found with `scipy.ndimage.label`:
- a reference lesion is *detected* when some predicted voxel of the label overlaps it (a prediction that splits a
  lesion in two still detects it once; one predicted blob touching two reference lesions detects both);
- a predicted component that overlaps no reference lesion is a *false-positive lesion*.
Per dataset, lesion sensitivity pools the lesions of every test case (detected / reference lesions) and the false
positives are counted per test case (`lesion_summary`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from scipy import ndimage

from segbook.evaluation.files import LESION_COLUMNS as COLUMNS

#: 26-connectivity in 3D: every voxel of the 3x3x3 neighbourhood is a neighbour.
CONNECTIVITY = ndimage.generate_binary_structure(3, 3)
#: The lesion columns of a label that is not a lesion: empty in metrics.csv.
NOT_A_LESION: dict[str, None] = dict.fromkeys(COLUMNS)


def lesion_counts(reference: np.ndarray, prediction: np.ndarray) -> dict[str, int]:
    """Reference lesions, detected reference lesions and false-positive predicted lesions of two 3D masks."""
    reference, prediction = np.asarray(reference, dtype=bool), np.asarray(prediction, dtype=bool)
    if reference.shape != prediction.shape or reference.ndim != 3:
        raise ValueError(f"lesion masks must be 3D and of one shape, got {reference.shape} and {prediction.shape}")
    reference_lesions, n_reference = _components(reference)
    predicted_lesions, n_predicted = _components(prediction)
    detected = np.unique(reference_lesions[prediction & reference])
    touched = np.unique(predicted_lesions[prediction & reference])
    return {"lesions_reference": n_reference, "lesions_detected": int(np.count_nonzero(detected)),
            "lesions_false_positive": n_predicted - int(np.count_nonzero(touched))}


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.int32), 0
    labelled, count = ndimage.label(mask, structure=CONNECTIVITY)
    return labelled, int(count)


def lesion_summary(rows: Iterable[Mapping[str, Any]], num_cases: int) -> dict[str, Any]:
    """Pooled over the rows (cases, or cases and lesion labels): lesion counts, sensitivity (NaN without reference
    lesions) and false-positive lesions per test case."""
    totals = dict.fromkeys(COLUMNS, 0)
    for row in rows:
        for column in COLUMNS:
            totals[column] += int(row[column])
    reference = totals["lesions_reference"]
    return {**totals, "lesion_sensitivity": totals["lesions_detected"] / reference if reference else math.nan,
            "false_positive_lesions_per_case": totals["lesions_false_positive"] / num_cases if num_cases else math.nan}
