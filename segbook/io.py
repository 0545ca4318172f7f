"""Atomic file writing: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator


def now() -> str:
    """The local time with its offset, as every record segbook writes spells it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; results are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path for a writer that wants a file name; rename it over `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Build a directory in a temporary sibling and rename it into place only if the block succeeds.

    With `replace=True` an existing directory at `path` is swapped out (moved aside, then deleted) so readers
    never see a mixture of old and new content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
    try:
        yield tmp
        if path.exists():
            if not replace:
                raise FileExistsError(f"{path} already exists")
            old = path.with_name(f".{path.name}.{os.getpid()}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)



def leftovers(path: str | os.PathLike) -> list[Path]:
    """The `.partial` and `.old` folders an interrupted `atomic_directory` of `path` left next to it."""
    path = Path(path)
    prefix = f".{path.name}."
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    return sorted(path.parent / n for n in names if n.startswith(prefix) and n.endswith((".partial", ".old")))


def sweep_leftovers(path: str | os.PathLike) -> list[str]:
    """Repair what an `atomic_directory` killed mid-way left next to `path`; returns what it did, for the log.

    A half-built `.partial` folder is deleted. An `.old` folder is the previous content moved aside just before the
    new one was renamed into place: if `path` is missing, the kill came between the two renames and the old content
    is put back; otherwise it is deleted. Call it only while holding the claim on `path` (no live writer).
    """
    path = Path(path)
    found = leftovers(path)
    done = []
    for partial in (p for p in found if p.name.endswith(".partial")):
        shutil.rmtree(partial, ignore_errors=True)
        done.append(f"deleted the unfinished {partial.name}")
    old = sorted((p for p in found if p.name.endswith(".old")), key=lambda p: p.stat().st_mtime)
    if old and not path.exists():
        os.replace(old.pop(), path)
        done.append(f"restored {path.name} from the copy a killed process had moved aside")
    for stale in old:
        shutil.rmtree(stale, ignore_errors=True)
        done.append(f"deleted the replaced {stale.name}")
    return done
