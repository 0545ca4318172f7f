"""What validation finds: problems (errors and warnings) tied to a case and a file, and a report that groups them."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from segbook.errors import SegbookError

Severity = Literal["error", "warning"]

#: For each kind of problem: a title for the report and what the user should do about it.
KINDS: dict[str, tuple[str, str]] = {
    "unreadable": ("unreadable or truncated files",
                   "re-download or re-export the file and check that it opens in a viewer (ITK-SNAP, 3D Slicer)"),
    "broken-link": ("symbolic links that lead to no file",
                    "point the link at the real file (`ls -l` shows where it leads), or put the file in its place"),
    "dimension": ("images that are not 3-D volumes",
                  "provide one 3-D volume per channel (MSD layout: one 4-D file with one volume per channel)"),
    "channels": ("wrong number of channels",
                 "give every case exactly the registry's channels, in its order (nnU-Net suffixes _0000, _0001, ...)"),
    "geometry": ("geometry mismatches between a case's files",
                 "resample the label (or channel) onto the first channel's grid, or fix its header, so shape, "
                 "spacing, origin and direction agree"),
    "label-values": ("label values the registry does not declare",
                     "remap the label file to the registry's labels, or register the dataset with these labels "
                     "(--registry FILE)"),
    "non-integer-labels": ("label maps with non-integer values",
                           "re-export the labels with nearest-neighbour interpolation; labels are whole numbers"),
    "non-finite": ("images with NaN or infinite intensities",
                   "replace the NaN/inf voxels (for example with the image minimum) before importing"),
    "duplicate": ("duplicate case ids",
                  "keep one file per case and channel; case ids must differ (also ignoring upper/lower case)"),
    "missing-label": ("images without a label", "add the label file, or remove the images from the source"),
    "missing-image": ("labels without images", "add the image files, or remove the label from the source"),
    "source-metadata": ("source metadata that contradicts the registry",
                        "import with the registry entry that matches this dataset (--task), or fix the entry"),
    "no-cases": ("no cases found", "point --from at the task folder (or --images/--labels at the files)"),
    "empty-label": ("label maps with only background",
                    "check that the label export did not fail; empty cases are imported as they are"),
    "absent-label": ("declared labels that appear in no case",
                     "check that the label files use the registry's numbering (a remapped or missing class)"),
    "unmatched-file": ("files ignored because their names match no case pattern",
                       "rename them, or give --image-pattern/--label-pattern that match them"),
    "unlabelled": ("images ignored because they have no labels",
                   "SegBook evaluates on labelled cases only; add labelsTs if you have the labels"),
    "case-count": ("case count differs from the registry",
                   "check that the download is complete; the test split keeps the registry's train/test ratio"),
    "split": ("a given test split that does not fit the cases",
              "list every case once by its case id (its label file's name without the file ending), in the test "
              "list or, when the file has one, in the train list"),
    "split-count": ("test split size differs from the registry",
                    "the registry's test count is the paper's: scores on another test set are not comparable with "
                    "it (they are recorded with the split's SHA-256)"),
}


@dataclass(frozen=True)
class Problem:
    """One finding, tied to a case and/or file so the user knows exactly where to look."""

    severity: Severity
    kind: str
    message: str
    case: str | None = None
    file: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown problem kind {self.kind!r}")

    def where(self) -> str:
        parts = [f"case {self.case}" if self.case else "", self.file or ""]
        return ": ".join(p for p in parts if p)


def error(kind: str, message: str, case: str | None = None, file: str | Path | None = None) -> Problem:
    return Problem("error", kind, message, case, str(file) if file is not None else None)


def warning(kind: str, message: str, case: str | None = None, file: str | Path | None = None) -> Problem:
    return Problem("warning", kind, message, case, str(file) if file is not None else None)


@dataclass
class ValidationReport:
    """Every problem found in a source dataset, and the cases that were checked."""

    problems: list[Problem] = field(default_factory=list)
    cases: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def counts(self) -> dict[str, int]:
        return {"cases": len(self.cases), "errors": len(self.errors), "warnings": len(self.warnings)}

    def format(self, limit: int = 20) -> str:
        """Problems grouped by kind (errors first), each group with what to fix; `limit` lines per group."""
        groups: dict[tuple[str, str], list[Problem]] = defaultdict(list)
        for problem in sorted(self.problems, key=lambda p: (p.severity != "error", p.case or "", p.file or "")):
            groups[(problem.severity, problem.kind)].append(problem)
        lines = []
        order = list(KINDS)
        for (severity, kind), items in sorted(groups.items(), key=lambda g: (g[0][0] != "error", order.index(g[0][1]))):
            title, fix = KINDS[kind]
            lines.append(f"{severity.upper()}: {title} ({len(items)})")
            for problem in items[:limit]:
                where = problem.where()
                lines.append(f"  - {where}: {problem.message}" if where else f"  - {problem.message}")
            if len(items) > limit:
                lines.append(f"  ... and {len(items) - limit} more")
            lines.append(f"  fix: {fix}")
        counts = self.counts()
        verdict = "not imported" if self.errors else "ok"
        lines.append(f"{counts['cases']} cases checked: {counts['errors']} error(s), {counts['warnings']} "
                     f"warning(s) -> {verdict}")
        return "\n".join(lines)


class DatasetValidationError(SegbookError):
    """A source dataset with errors: nothing was written; the report says what to fix."""

    def __init__(self, report: ValidationReport, task: str) -> None:
        super().__init__(f"{task}: the source dataset has {len(report.errors)} error(s); nothing was imported\n"
                         + report.format())
        self.report = report
