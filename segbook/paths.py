"""Where segbook keeps things: nnU-Net's three folders, the weight cache and the batch state.

nnU-Net reads `nnUNet_raw`, `nnUNet_preprocessed` and `nnUNet_results` from the environment. When a user has set
them, segbook uses them as they are; otherwise everything lives under one `SEGBOOK_HOME` (default
`~/.cache/segbook`) in a fixed layout, and segbook exports the variables so nnU-Net's own code agrees.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

NNUNET_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def segbook_home() -> Path:
    if "SEGBOOK_HOME" in os.environ:
        return Path(os.environ["SEGBOOK_HOME"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser()
    return cache / "segbook"


@dataclass(frozen=True)
class Paths:
    """All folders segbook reads and writes, resolved once from the environment."""

    home: Path
    raw: Path
    preprocessed: Path
    results: Path

    @classmethod
    def from_env(cls) -> "Paths":
        home = segbook_home()
        defaults = {"nnUNet_raw": "nnUNet_raw", "nnUNet_preprocessed": "nnUNet_preprocessed",
                    "nnUNet_results": "nnUNet_results"}
        resolved = {var: Path(os.environ[var]).expanduser() if os.environ.get(var) else home / sub
                    for var, sub in defaults.items()}
        return cls(home=home, raw=resolved["nnUNet_raw"], preprocessed=resolved["nnUNet_preprocessed"],
                   results=resolved["nnUNet_results"])

    @property
    def weights(self) -> Path:
        return self.home / "weights"

    @property
    def batch(self) -> Path:
        return self.home / "batch"

    @property
    def claims(self) -> Path:
        """Claims on runs and datasets (`segbook.claims`), shared by every command and launcher."""
        return self.batch / "claims"

    def export(self) -> None:
        """Point nnU-Net (read lazily from the environment in nnunetv2 >= 2.8) at these folders."""
        os.environ["nnUNet_raw"] = str(self.raw)
        os.environ["nnUNet_preprocessed"] = str(self.preprocessed)
        os.environ["nnUNet_results"] = str(self.results)
