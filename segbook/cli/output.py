"""Printing tabular results in the formats users paste into papers and scripts."""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable, Mapping, TextIO

FORMATS = ("table", "md", "csv", "json", "latex")


def emit(rows: Iterable[Mapping[str, Any]], fmt: str = "table", stream: TextIO | None = None,
         numparse: bool = True) -> None:
    """Print rows; `numparse=False` keeps pre-formatted numbers ("1.00", "+1.95") exactly as given."""
    import pandas as pd

    stream = stream or sys.stdout
    frame = pd.DataFrame(list(rows))
    if fmt == "json":
        stream.write(json.dumps(frame.to_dict(orient="records"), indent=2, default=str) + "\n")
    elif fmt == "csv":
        frame.to_csv(stream, index=False)
    elif fmt == "md":
        stream.write(frame.to_markdown(index=False, disable_numparse=not numparse) + "\n")
    elif fmt == "latex":
        stream.write(frame.to_latex(index=False) + "\n")
    else:
        stream.write(frame.to_markdown(index=False, tablefmt="simple", disable_numparse=not numparse) + "\n")
