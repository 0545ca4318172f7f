"""SegBook's fixed held-out test split: drawn once per dataset (or given), stored with it, stable across re-imports.

The SegBook authors published their case counts, not their case lists, so segbook draws its own split: the draw
ranks the case ids by SHA-256 of `"{seed}:{case_id}"` and takes the first `n_test` as the test set. It depends only
on the set of ids and the seed: not on file order, platform, Python or numpy version. A case keeps its rank when
others are added or removed, so a slightly different download changes the split only where it must.

A split can also be given: a file of test case ids (a challenge's official test set, the authors' lists should they
appear), or the labelled test set the source ships. Either is checked against the cases before anything is written.

Every split has a SHA-256 of its two sorted id lists (`Split.sha256`): runs, evaluations and results record it, so
that scores on different test sets are never averaged together.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from segbook.data.problems import Problem, error, warning
from segbook.errors import SegbookError
from segbook.io import atomic_write_json

SPLIT_FILE = "segbook_split.json"
ALGORITHM = "sha256-rank-v1"
FROM_FILE = "user-file"
FROM_SOURCE = "source-test-set"
DEFAULT_SEED = 0
#: Header cells a split CSV may start with.
_CSV_HEADERS = {"case", "case_id", "id"}
_SUBSETS = ("train", "test")


class SplitChangedError(SegbookError):
    """The cases differ from those the stored split was drawn on; redrawing would move cases between the sets."""


@dataclass(frozen=True)
class Split:
    """The train and test ids; `seed` for a drawn split, `source` (a file, a source folder) for a given one."""

    train: tuple[str, ...]
    test: tuple[str, ...]
    seed: int | None = DEFAULT_SEED
    algorithm: str = ALGORITHM
    source: str | None = None

    @property
    def case_ids(self) -> set[str]:
        return set(self.train) | set(self.test)

    @property
    def sha256(self) -> str:
        """Identifies the split by its content alone (not by how it was made): the sorted ids of both sets."""
        content = json.dumps({"test": sorted(self.test), "train": sorted(self.train)}, separators=(",", ":"))
        return hashlib.sha256(content.encode("utf-8")).hexdigest()

    def record(self) -> dict[str, Any]:
        """What runs, evaluations and the import record keep of the split: how it was made, sizes and hash."""
        return {"sha256": self.sha256, "algorithm": self.algorithm, "seed": self.seed, "source": self.source,
                "n_train": len(self.train), "n_test": len(self.test)}

    def as_dict(self, registry_train: int | None = None, registry_test: int | None = None) -> dict:
        return {**self.record(), "registry_train_cases": registry_train, "registry_test_cases": registry_test,
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
        seed = None if data.get("seed") is None else int(data["seed"])
        split = Split(tuple(data["train"]), tuple(data["test"]), seed, data["algorithm"], data.get("source"))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SegbookError(f"{path} is damaged ({exc}); delete it and re-import with --resplit") from None
    if data.get("sha256") not in (None, split.sha256):
        raise SegbookError(f"{path} is damaged: its id lists do not give its recorded SHA-256 (edited by hand?); "
                           "re-import with --resplit, or with --split FILE to give a split")
    return split


def split_sha256(folder: Path) -> str | None:
    """The SHA-256 of the split stored in a raw dataset folder (None without one)."""
    split = read_split(folder)
    return split.sha256 if split else None


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
        how = f"was drawn with seed {stored.seed}, not {seed}" if stored.seed is not None else \
            f"comes from {stored.source}, not from a draw with seed {seed}"
        raise SplitChangedError(f"the stored split {how}; pass --resplit to draw a new test set (results on the old "
                                "one are no longer comparable)")
    if ids != stored.case_ids:
        added, removed = sorted(ids - stored.case_ids), sorted(stored.case_ids - ids)
        raise SplitChangedError(
            f"the cases changed since the test split was drawn ({len(added)} added: {_preview(added)}; "
            f"{len(removed)} removed: {_preview(removed)}); pass --resplit to draw a new test set (results on the "
            "old one are no longer comparable)")
    return stored


def _preview(ids: list[str], limit: int = 5) -> str:
    return ", ".join(ids[:limit]) + (", ..." if len(ids) > limit else "") if ids else "none"


# --- given splits: a file of test ids, or the source's own labelled test set ------------------------------------


@dataclass(frozen=True)
class GivenSplit:
    """A test split as given, before it is checked against the cases: test ids, train ids when given too (a file
    may list both), where it comes from and how it was made (`FROM_FILE`, `FROM_SOURCE`)."""

    test: tuple[str, ...]
    train: tuple[str, ...] | None
    source: str
    algorithm: str


def read_split_file(path: str | Path) -> GivenSplit:
    """The ids of a split file; `SegbookError` when it cannot be read or has no recognisable form.

    JSON: a list of test case ids, or an object with a `test` list and optionally a `train` list (a
    `segbook_split.json` from another copy of the dataset is one). CSV: a case id per row in the first column; an
    optional second column says `test` or `train` (without it every row is a test case); a first row whose first
    cell is `case`, `case_id` or `id` is a header.
    """
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise SegbookError(f"cannot read the split file {path}: {exc}") from None
    test, train = _json_ids(path, text) if path.suffix.lower() == ".json" else _csv_ids(path, text)
    return GivenSplit(tuple(test), None if train is None else tuple(train), str(path.resolve()), FROM_FILE)


def _json_ids(path: Path, text: str) -> tuple[list[str], list[str] | None]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SegbookError(f"the split file {path} is not valid JSON ({exc})") from None
    test, train = (data, None) if isinstance(data, list) else \
        (data.get("test"), data.get("train")) if isinstance(data, dict) else (None, None)
    if not _is_id_list(test) or not (train is None or _is_id_list(train)):
        raise SegbookError(f"the split file {path} must hold a list of test case ids, or an object with a 'test' "
                           "list of ids (and optionally a 'train' list)")
    return test, train


def _is_id_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) and item.strip() == item and item
                                           for item in value)


def _csv_ids(path: Path, text: str) -> tuple[list[str], list[str] | None]:
    rows = [[cell.strip() for cell in row] for row in csv.reader(io.StringIO(text)) if any(c.strip() for c in row)]
    if rows and rows[0][0].casefold() in _CSV_HEADERS:
        rows = rows[1:]
    if not rows:
        raise SegbookError(f"the split file {path} lists no case ids")
    if all(len(row) == 1 or not row[1] for row in rows):
        return [row[0] for row in rows], None
    subsets = {line: row[1].casefold() for line, row in enumerate(rows, start=1) if len(row) > 1}
    wrong = [f"row {line}: {value!r}" for line, value in subsets.items() if value not in _SUBSETS]
    if wrong or len(subsets) != len(rows):
        shown = wrong or ["some rows have no second column"]
        raise SegbookError(f"the split file {path}: the second column says test or train, on every row "
                           f"({'; '.join(shown[:5])})")
    return ([row[0] for row in rows if row[1].casefold() == "test"],
            [row[0] for row in rows if row[1].casefold() == "train"])


def source_test_split(source_test: Iterable[str], location: str) -> GivenSplit:
    """The labelled test set a source ships (its `imagesTs`/`labelsTs`), kept as the test split."""
    return GivenSplit(tuple(sorted(source_test)), None, location, FROM_SOURCE)


def check_given_split(given: GivenSplit, case_ids: Iterable[str], registry_test: int,
                      exact_count: bool = False) -> tuple[Split | None, list[Problem]]:
    """The split `given` makes of the cases, with the problems found (errors: no split).

    Errors: an id listed twice, an id that is no labelled case, a case in both lists or (when train ids are given)
    in neither, an empty side; with `exact_count`, a test count other than the registry's. A test count that only
    differs from the registry's is a warning.
    """
    cases = set(case_ids)
    what = "the source's labelled test set" if given.algorithm == FROM_SOURCE else f"the split file {given.source}"
    problems = _duplicates(given) + _unknown(given, cases)
    train = set(given.train) if given.train is not None else cases - set(given.test)
    problems += [error("split", f"is in both the test and the train list of {what}", case)
                 for case in sorted(set(given.test) & train)]
    if given.train is not None:
        problems += [error("split", f"is in neither the test nor the train list of {what}", case)
                     for case in sorted(cases - set(given.test) - train)]
    test = set(given.test) & cases
    if not test or not train & cases:
        problems.append(error("split", f"{what} leaves {len(test)} test and {len(train & cases)} train case(s); "
                                       "both sides need at least one"))
    if len(test) != registry_test:
        message = f"{what} holds {len(test)} test case(s), the registry's test split {registry_test}"
        problems.append(error("split", message + "; --keep-source-split keeps a source's test set only when they "
                                                 "agree (give it with --split FILE to use it anyway)")
                        if exact_count else warning("split-count", message))
    if any(p.severity == "error" for p in problems):
        return None, problems
    return Split(tuple(sorted(train)), tuple(sorted(test)), None, given.algorithm, given.source), problems


def _duplicates(given: GivenSplit) -> list[Problem]:
    lists = [("test", given.test), ("train", given.train or ())]
    return [error("split", f"is listed {count} times in the {name} list", case)
            for name, ids in lists for case, count in sorted(Counter(ids).items()) if count > 1]


def _unknown(given: GivenSplit, cases: set[str]) -> list[Problem]:
    problems = []
    for case in sorted((set(given.test) | set(given.train or ())) - cases):
        close = difflib.get_close_matches(case, cases, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        problems.append(error("split", f"is not a labelled case of the source{hint}", case))
    return problems


def train_case_ids(raw: Path) -> list[str]:
    """The train split's case ids: from segbook's split file, else (a dataset not imported by segbook) from
    nnU-Net's labelsTr."""
    split = read_split(raw)
    if split is not None:
        return sorted(split.train)
    dataset = json.loads((raw / "dataset.json").read_text(encoding="utf-8"))
    ending = dataset.get("file_ending", ".nii.gz")
    return sorted(p.name[: -len(ending)] for p in (raw / "labelsTr").glob(f"*{ending}"))
