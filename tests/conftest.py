"""Shared fixtures: the reference material in tests/data and an isolated SEGBOOK_HOME per test.

No test reads or writes the user's own folders: for the whole session SEGBOOK_HOME points at a temporary folder
and nnU-Net's folder variables are unset (fixtures and tests narrow this further).
"""

from __future__ import annotations

from pathlib import Path

import pytest

#: Reference files that hold segbook to the official code and to real data (provenance: tests/data/README.md).
REFERENCE_DATA = Path(__file__).resolve().parent / "data"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that needs the SLURM test cluster is also slow: `pytest -m "not slow"` (the fast tier) must run
    without the cluster and without waiting on its queue."""
    for item in items:
        if item.get_closest_marker("slurm") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _user_backbones_stay_in_their_test(monkeypatch: pytest.MonkeyPatch):
    """A test that loads a user's backbone file leaves neither the backbone nor SEGBOOK_BACKBONE_FILES (which
    loading exports for worker processes) to the tests after it: each test starts from the registry as it found
    it, and the variable is restored."""
    import os

    from segbook import backbones

    found = backbones._registry
    monkeypatch.setattr(backbones, "_registry", backbones._Registry(dict(found.backbones), set(found.loaded_files),
                                                                     dict(found.entry_points)))
    monkeypatch.setenv(backbones.FILES_VARIABLE, os.environ.get(backbones.FILES_VARIABLE, ""))  # restored after
    if not os.environ[backbones.FILES_VARIABLE]:
        monkeypatch.delenv(backbones.FILES_VARIABLE)


@pytest.fixture(scope="session", autouse=True)
def _never_the_users_folders(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SEGBOOK_HOME", str(tmp_path_factory.mktemp("session_home")))
        for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "SEGBOOK_REGISTRY"):
            patch.setenv(variable, "unset")
            patch.delenv(variable)
        yield


@pytest.fixture(scope="session")
def shared() -> Path:
    """tests/data: the official STU-Net's golden outputs and state_dict schema, a real CT, the paper's datasets."""
    return REFERENCE_DATA


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
