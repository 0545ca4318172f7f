"""Allowed ranges of numeric options, checked the same way by the CLI (at parse time) and by the Python API.

A value outside its range never reaches nnU-Net: `--epochs 0` would otherwise produce a "finished" run that trained
nothing, and `--lr -1` a traceback after planning. Each `Bound` names the option it belongs to, so an error from the
API reads like one from the command line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from segbook.errors import SegbookError


class OptionError(SegbookError):
    """A value outside its option's allowed range; the message names the option and the range."""


@dataclass(frozen=True)
class Bound:
    """`kind` (int or float) between `low` and `high`; None leaves a side open. Floats must be finite."""

    option: str
    kind: type = int
    low: float | None = None
    low_inclusive: bool = True
    high: float | None = None
    high_inclusive: bool = True

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            return (f"{what} in {'[' if self.low_inclusive else '('}{_fmt(self.low)}, {_fmt(self.high)}"
                    f"{']' if self.high_inclusive else ')'}")
        if self.low is not None:
            return f"{what} {'>=' if self.low_inclusive else '>'} {_fmt(self.low)}"
        if self.high is not None:
            return f"{what} {'<=' if self.high_inclusive else '<'} {_fmt(self.high)}"
        return what

    def problem(self, value: Any) -> str | None:
        """Why `value` is not allowed (None when it is)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.kind is int and
                                                                              not isinstance(value, int)):
            return f"{self.option} must be {self.describe()}, got {value!r}"
        inside = math.isfinite(value)
        if inside and self.low is not None:
            inside = value >= self.low if self.low_inclusive else value > self.low
        if inside and self.high is not None:
            inside = value <= self.high if self.high_inclusive else value < self.high
        return None if inside else f"{self.option} must be {self.describe()}, got {_fmt(value)}"

    def parse(self, text: str) -> int | float:
        """The value of `text` if it is allowed; `OptionError` (a ValueError for argparse's sake) otherwise."""
        try:
            value = self.kind(text)
        except ValueError:
            raise OptionError(f"{self.option} must be {self.describe()}, got {text!r}") from None
        error = self.problem(value)
        if error:
            raise OptionError(error)
        return value

    def check(self, value: Any) -> None:
        error = self.problem(value)
        if error:
            raise OptionError(error)


def check_all(values: dict[str, Any], bounds: dict[str, Bound]) -> None:
    """Check every named value that has a bound (None means "use the default" and passes); one error lists all."""
    problems = [error for name, bound in bounds.items()
                if values.get(name) is not None and (error := bound.problem(values[name]))]
    if problems:
        raise OptionError("; ".join(problems))


def _fmt(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)

