"""Shared fixtures: the read-only reference material in ../shared and an isolated SEGBOOK_HOME per test."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"reference material not found at {SHARED} (the read-only ../shared folder)")
    return SHARED


@pytest.fixture
def segbook_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh SEGBOOK_HOME with nnU-Net's variables unset, so nothing touches the user's real folders."""
    home = tmp_path / "segbook_home"
    monkeypatch.setenv("SEGBOOK_HOME", str(home))
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "SEGBOOK_REGISTRY"):
        # Set then delete, so monkeypatch restores the variable even when segbook's code exports it meanwhile.
        monkeypatch.setenv(variable, "unset")
        monkeypatch.delenv(variable)
    return home
