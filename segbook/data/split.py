"""SegBook's fixed held-out test split: drawn once per dataset, stored with it, stable across re-imports.

The draw ranks the case ids by SHA-256 of `"{seed}:{case_id}"` and takes the first `n_test` as the test set. It
depends only on the set of ids and the seed: not on file order, platform, Python or numpy version. A case keeps its
rank when others are added or removed, so a slightly different download changes the split only where it must.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from segbook.errors import SegbookError
from segbook.io import atomic_write_json

SPLIT_FILE = "segbook_split.json"
ALGORITHM = "sha256-rank-v1"
DEFAULT_SEED = 0


class SplitChangedError(SegbookError):
    """The cases differ from those the stored split was drawn on; redrawing would move cases between the sets."""


@dataclass(frozen=True)
class Split:
    train: tuple[str, ...]
    test: tuple[str, ...]
    seed: int = DEFAULT_SEED
    algorithm: str = ALGORITHM

    @property
    def case_ids(self) -> set[str]:
        return set(self.train) | set(self.test)

    def as_dict(self, registry_train: int | None = None, registry_test: int | None = None) -> dict:
        return {"algorithm": self.algorithm, "seed": self.seed, "n_train": len(self.train), "n_test": len(self.test),
                "registry_train_cases": registry_train, "registry_test_cases": registry_test,
                "train": list(self.train), "test": list(self.test)}


def held_out_count(n_cases: int, train_cases: int, test_cases: int) -> int:
    """The registry's test count when the case count matches it, else the same ratio (at least one each side)."""
    if n_cases < 2:
        raise SegbookError(f"a dataset needs at least 2 labelled cases for a train/test split, found {n_cases}")
    if n_cases == train_cases + test_cases:
        return test_cases
    return min(n_cases - 1, max(1, round(n_cases * test_cases / (train_cases + test_cases))))


def _rank(case_id: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{case_id}".encode("utf-8")).hexdigest()


def draw_split(case_ids: Iterable[str], n_test: int, seed: int = DEFAULT_SEED) -> Split:
    """The `n_test` ids of lowest hash rank are the test set; both sets are returned sorted."""
    ids = sorted(set(case_ids))
    if not 0 < n_test < len(ids):
        raise SegbookError(f"cannot hold out {n_test} of {len(ids)} cases for testing")
    ranked = sorted(ids, key=lambda c: (_rank(c, seed), c))
    return Split(train=tuple(sorted(ranked[n_test:])), test=tuple(sorted(ranked[:n_test])), seed=seed)


def read_split(folder: Path) -> Split | None:
    """The split stored in a raw dataset folder, or None."""
    path = Path(folder) / SPLIT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Split(tuple(data["train"]), tuple(data["test"]), int(data["seed"]), data["algorithm"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SegbookError(f"{path} is damaged ({exc}); delete it and re-import with --resplit") from None


def write_split(folder: Path, split: Split, registry_train: int | None = None,
                registry_test: int | None = None) -> None:
    atomic_write_json(Path(folder) / SPLIT_FILE, split.as_dict(registry_train, registry_test))


def resolve_split(case_ids: Iterable[str], n_test: int, stored: Split | None, seed: int | None = None,
                  resplit: bool = False) -> Split:
    """The split to use: the stored one when it covers exactly these cases (and no other seed was asked for),
    a fresh draw when there is none or `resplit`; otherwise SplitChangedError says what changed."""
    ids = set(case_ids)
    if stored is None or resplit:
        return draw_split(ids, n_test, DEFAULT_SEED if seed is None else seed)
    if seed is not None and seed != stored.seed:
        raise SplitChangedError(f"the stored split was drawn with seed {stored.seed}, not {seed}; pass --resplit to "
                                "draw a new test set (results on the old one are no longer comparable)")
    if ids != stored.case_ids:
        added, removed = sorted(ids - stored.case_ids), sorted(stored.case_ids - ids)
        raise SplitChangedError(
            f"the cases changed since the test split was drawn ({len(added)} added: {_preview(added)}; "
            f"{len(removed)} removed: {_preview(removed)}); pass --resplit to draw a new test set (results on the "
            "old one are no longer comparable)")
    return stored


def _preview(ids: list[str], limit: int = 5) -> str:
    return ", ".join(ids[:limit]) + (", ..." if len(ids) > limit else "") if ids else "none"
