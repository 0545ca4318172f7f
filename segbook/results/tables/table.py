"""A table ready for any output format: plain values and `Cell`s (a score with what it averages and lacks), notes.

Text formats show cells formatted (`81.56 ±0.59 (n=2)*`, or with `--summary median` `81.20 (78.05, 84.90) (n=4)`:
the median with its first and third quartiles), csv and json their numbers with counts, quartiles and details as
columns of their own, LaTeX with its special characters escaped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

MISSING_MARK = "*"  # a group cell that some datasets of the group lack
PARTIAL_MARK = "\u2020"  # a dataset cell averaging only some of the folds that were started (a dagger)
NOISE_MARK = "~"  # a dataset's Delta(PT) no larger than its seed noise
LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 PARTIAL_MARK: r"$^\dagger$"}


@dataclass(frozen=True)
class Cell:
    """One score (percent) with how many datasets (or folds) it averages and what is missing from it."""

    value: float | None
    count: int = 0
    missing: tuple[str, ...] = ()
    status: str = ""
    marker: str = ""
    signed: bool = False
    source: str = ""
    #: The standard deviation across seeds (same unit as `value`), where more than one seed was run.
    spread: float | None = None
    #: How many seeds a dataset cell averages (its `count` being the folds each seed averages).
    seeds: int | None = None
    #: The first and third quartiles (same unit as `value`), where `value` is a median (`--summary median`).
    quartiles: tuple[float, float] | None = None

    def number(self) -> float | None:
        return None if self.value is None else round(self.value, 4)

    def text(self, show_count: bool = True) -> str:
        if self.value is None:
            return (self.status or "missing") + self.marker
        number = self._format(self.value)
        if self.quartiles is not None:
            number += f" ({self._format(self.quartiles[0])}, {self._format(self.quartiles[1])})"
        spread = "" if self.spread is None else f" \u00b1{self.spread:.2f}"
        return number + spread + (f" (n={self.count})" if show_count else "") + self.marker

    def _format(self, value: float) -> str:
        return f"{value + 0.0:+.2f}" if self.signed else f"{value:.2f}"  # + 0.0: no -0.00

    def detail(self) -> str:
        return "; ".join(self.missing) if self.missing else self.status


@dataclass
class ResultTable:
    """A table ready for any output format: plain values and `Cell`s, with footnotes."""

    name: str
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    count_label: str = "n"
    detail_label: str = "missing"
    show_count: bool = True
    #: Per column, how codes read in text formats (e.g. `base` -> `STU-Net-B`); csv and json keep the codes.
    display: dict[str, Mapping[str, str]] = field(default_factory=dict)

    def records(self, fmt: str) -> list[dict[str, Any]]:
        """Rows for `segbook.cli.output.emit`: formatted cells in text formats, numbers plus counts in csv/json
        (and, where any cell has one, the standard deviation across seeds)."""
        machine = fmt in ("csv", "json")
        cells = [value for row in self.rows for value in row if isinstance(value, Cell)]
        spread = any(cell.spread is not None for cell in cells)
        seeds = any((cell.seeds or 0) > 1 for cell in cells)
        quartiles = any(cell.quartiles is not None for cell in cells)
        records = [dict(self._record(row, machine, spread, seeds, quartiles)) for row in self.rows]
        return [{_latex(k): _latex(v) for k, v in r.items()} for r in records] if fmt == "latex" else records

    def _record(self, row: list[Any], machine: bool, spread: bool, seeds: bool,
                quartiles: bool) -> Iterable[tuple[str, Any]]:
        for column, value in zip(self.columns, row):
            if isinstance(value, Cell) and machine:
                yield column, value.number()
                if quartiles:
                    low, high = value.quartiles or (None, None)
                    yield f"{column} q1", None if low is None else round(low, 4)
                    yield f"{column} q3", None if high is None else round(high, 4)
                yield f"{column} {self.count_label}", value.count
                yield f"{column} {self.detail_label}", value.detail()
                if spread:
                    yield f"{column} seed sd", None if value.spread is None else round(value.spread, 4)
                if seeds:
                    yield f"{column} seeds", value.seeds
            elif isinstance(value, Cell):
                yield column, value.text(self.show_count)
            elif machine:
                yield column, value
            else:
                yield column, "-" if value is None else self.display.get(column, {}).get(value, value)


def _latex(value: Any) -> Any:
    """pandas' `to_latex` writes text as it is; `CT&PET` or `Task001_X` would break the document."""
    if not isinstance(value, str):
        return value
    return re.sub("|".join(map(re.escape, LATEX_ESCAPES)), lambda match: LATEX_ESCAPES[match[0]], value)

