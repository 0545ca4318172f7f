"""The training subset of a run that trains on a fraction of the data: fixed per dataset, nested, never too small.

A run with training fraction f (`segbook.runs.Identity.fraction`) trains on the first n of the cases it would
otherwise train on (fold 'all': the train split; folds 0-4: the fold's training part, its validation untouched), in
one fixed order: the case ids ranked by SHA-256 of `"subset:{case_id}"`. So

- the subsets are nested: the cases of 10% are among those of 25%, which are among those of 50%, ... (a smaller n
  takes a prefix of the same order), and the size curve measures the number of cases, not which ones;
- the order depends only on the case ids: not on the run's seed (seeds then measure training noise on the same
  cases), nor on file order, platform or library versions. A case keeps its rank when others come or go, and the
  prefix "subset:" keeps the order unrelated to the test split's draw (`segbook.data.split`, `"{seed}:{case_id}"`);
- n = ceil(f x N) of the N cases, rounded up so that a fraction never trains on less than it says (computed on the
  percentage, so 10% of 30 is 3, not 4 through float error), and at least `MIN_TRAINING_CASES`: a smaller fraction
  takes the minimum and the record says so. Fewer than the minimum cases to draw from is an error for any fraction
  below 1; fraction 1 is every case, as a run without a fraction always was.

The test split is never subsetted: every run is evaluated on the whole of it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Iterable

from segbook.errors import SegbookError

#: The fewest cases a run on a fraction trains on: below it the "fraction" is a single patient, and the smallest point
#: of a data-efficiency curve would say more about that patient than about the amount of data.
MIN_TRAINING_CASES = 2
ORDER = "sha256-rank-v1 of 'subset:{case_id}'"


class SubsetError(SegbookError):
    """A fraction that cannot be drawn from these cases (fewer than the minimum)."""


@dataclass(frozen=True)
class TrainingSubset:
    """The cases a run trains on, out of the `available` ones it could have trained on."""

    cases: tuple[str, ...]  # sorted
    fraction: float
    available: int
    minimum_applied: bool  # the fraction gave fewer than MIN_TRAINING_CASES: the minimum was taken instead

    def record(self) -> dict[str, Any]:
        """What `run.json` keeps (`training_cases`): the ids, how many of how many, and how they were chosen."""
        return {"fraction": self.fraction, "count": len(self.cases), "available": self.available,
                "minimum": MIN_TRAINING_CASES, "minimum_applied": self.minimum_applied, "order": ORDER,
                "cases": list(self.cases)}


def subset_order(case_ids: Iterable[str]) -> list[str]:
    """The fixed order subsets are prefixes of (ties, impossible in practice, broken by the id)."""
    return sorted(set(case_ids), key=lambda case: (_rank(case), case))


def subset_size(fraction: float, available: int) -> int:
    """ceil(fraction x available) computed on the percentage rounded to 6 decimals, at least the minimum, at most
    `available`."""
    return min(available, max(MIN_TRAINING_CASES, _wanted(fraction, available)))


def training_subset(case_ids: Iterable[str], fraction: float) -> TrainingSubset:
    """The first `subset_size(fraction, N)` of the N cases in `subset_order`; every case for fraction 1."""
    ordered = subset_order(case_ids)
    if not 0 < fraction <= 1:
        raise SubsetError(f"training fraction must be in (0, 1], got {fraction!r}")
    if fraction == 1:
        return TrainingSubset(tuple(sorted(ordered)), 1.0, len(ordered), False)
    if len(ordered) < MIN_TRAINING_CASES:
        raise SubsetError(f"a training fraction needs at least {MIN_TRAINING_CASES} cases to draw from, and there "
                          f"are {len(ordered)}: train this task on all its cases (fraction 1)")
    size = subset_size(fraction, len(ordered))
    minimum_applied = _wanted(fraction, len(ordered)) < MIN_TRAINING_CASES
    return TrainingSubset(tuple(sorted(ordered[:size])), fraction, len(ordered), minimum_applied)


def _wanted(fraction: float, available: int) -> int:
    """ceil(fraction x available), on the percentage rounded to 6 decimals (0.1 x 30 is 3, not 3.0000000000000004)."""
    return math.ceil(round(fraction * 100, 6) * available / 100 - 1e-9)


def _rank(case_id: str) -> str:
    return hashlib.sha256(f"subset:{case_id}".encode("utf-8")).hexdigest()
