"""Checking every case of a source dataset before anything is written.

Headers are read first (`ImageFileReader.ReadImageInformation`, cheap) to compare geometry and channel counts; then
every file is read in full, because a truncated `.nii.gz` has an intact header, NaNs hide in the voxels and label
values are only known after reading. Cases are independent, so they are checked in a process pool.
"""

from __future__ import annotations

import functools
import gzip
import multiprocessing
import os
import re
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import numpy as np

from segbook.data.layouts import SourceCase
from segbook.data.problems import Problem, ValidationReport, error, warning
from segbook.processes import bind_to_parent

T = TypeVar("T")
R = TypeVar("R")

#: Default geometry tolerance: spacings may differ by this fraction, origins by this fraction of a voxel, direction
#: cosines by this much. Files that differ less are imported with the first channel's header.
DEFAULT_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Header:
    """What `ReadImageInformation` tells about a file, spatial parts reduced to 3-D (ITK order x, y, z)."""

    dimension: int
    volumes: int  # size of the 4th axis (1 for 3-D files)
    components: int
    pixel_type: str
    size: tuple[int, ...]
    full_size: tuple[int, ...]  # every axis, for messages about files that are not 3-D
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def describe(self) -> str:
        return f"shape {self.size}, spacing {_fmt(self.spacing)}, origin {_fmt(self.origin)}"


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v + 0.0:.6g}" for v in values) + ")"  # + 0.0 turns -0 into 0


def read_header(path: str | Path) -> Header:
    """The geometry of an image file without reading its voxels; raises RuntimeError when unreadable."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    dim = reader.GetDimension()
    n = min(dim, 3)
    direction = reader.GetDirection()
    return Header(
        dimension=dim,
        volumes=reader.GetSize()[3] if dim == 4 else 1,
        components=reader.GetNumberOfComponents(),
        pixel_type=sitk.GetPixelIDValueAsString(reader.GetPixelID()),
        size=tuple(reader.GetSize()[:n]),
        full_size=tuple(reader.GetSize()),
        spacing=tuple(reader.GetSpacing()[:n]),
        origin=tuple(reader.GetOrigin()[:n]),
        direction=tuple(direction[r * dim + c] for r in range(n) for c in range(n)),
    )


def geometry_differences(a: Header, b: Header, tolerance: float = DEFAULT_TOLERANCE) -> list[str]:
    """How `b`'s grid differs from `a`'s beyond the tolerance (empty when they agree)."""
    if a.size != b.size:
        return [f"shape {b.size} vs {a.size}"]
    spacing_a, spacing_b = np.asarray(a.spacing), np.asarray(b.spacing)
    found = []
    if np.any(np.abs(spacing_a - spacing_b) > tolerance * spacing_a):
        found.append(f"spacing {_fmt(b.spacing)} vs {_fmt(a.spacing)}")
    if np.any(np.abs(np.subtract(a.origin, b.origin)) > tolerance * spacing_a):
        found.append(f"origin {_fmt(b.origin)} vs {_fmt(a.origin)}")
    if np.any(np.abs(np.subtract(a.direction, b.direction)) > tolerance):
        found.append(f"direction {_fmt(b.direction)} vs {_fmt(a.direction)}")
    return found


def same_geometry(a: Header, b: Header) -> bool:
    """Equal as nnU-Net judges it (np.allclose); files that are not must be written with one header."""
    return a.size == b.size and all(np.allclose(getattr(a, f), getattr(b, f))
                                    for f in ("spacing", "origin", "direction"))


#: SimpleITK's first line only says where in its C++ sources it gave up; its reason follows, after a prefix.
_ITK_SOURCE_LINE = re.compile(r"^Exception thrown in SimpleITK \w+: .*:\d+:$")
_ITK_PREFIX = re.compile(r"^(sitk::ERROR: |ITK ERROR: \w+\(0x[0-9a-fA-F]+\): )")


def _reason(exc: BaseException, path: Path, limit: int = 300) -> str:
    """The reason SimpleITK or nibabel gives, on one line, without ITK's source location and prefixes, and with the
    file's name for its full path (the problem names the file already)."""
    lines = [line.strip() for line in str(exc).replace(str(path), path.name).splitlines() if line.strip()]
    text = " ".join(_ITK_PREFIX.sub("", line) for line in lines if not _ITK_SOURCE_LINE.match(line))
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _content_hint(path: Path) -> str:
    """What the file holds, when SimpleITK cannot read its header: ITK says only that no reader recognises it, alike
    for a web page or text saved under an image name (a failed download) and for a `.gz` cut short."""
    try:
        with open(path, "rb") as file:
            head = file.read(256)
        if head.startswith(b"\x1f\x8b"):
            with gzip.open(path) as file:
                file.read(352)  # the NIfTI header and the extension flag after it
            return ""
    except (EOFError, zlib.error, gzip.BadGzipFile):
        return "its gzip data breaks off or is damaged: the file is truncated or corrupt"
    except OSError:
        return ""
    if not head:
        return "the file is empty"
    first = head.decode("utf-8", "replace").strip().split("\n")[0].strip()
    if first.isprintable() and "\ufffd" not in first:
        return f"the file is text, not an image; it begins {first[:60]!r}"
    return "not gzip data, although named .gz" if path.name.lower().endswith(".gz") else ""


def _check_headers(case: SourceCase, n_channels: int) -> tuple[dict[Path, Header], list[Problem]]:
    headers, problems = {}, []
    for path in dict.fromkeys([r.path for r in case.images] + [case.label]):
        try:
            headers[path] = read_header(path)
        except RuntimeError as exc:
            hint = _content_hint(path)
            problems.append(error("unreadable", f"cannot read the header: {_reason(exc, path)}"
                                                + (f" ({hint})" if hint else ""), case.case_id, path))
    for path, header in headers.items():
        problems += _check_dimension(case, path, header, n_channels)
    return headers, problems


def _check_dimension(case: SourceCase, path: Path, header: Header, n_channels: int) -> list[Problem]:
    if header.components != 1:
        return [error("dimension", f"{header.components} components per voxel (e.g. RGB); expected scalar voxels",
                      case.case_id, path)]
    packed = any(r.path == path and r.volume is not None for r in case.images)
    if packed:
        if header.dimension != 4 or header.volumes != n_channels:
            found = f"{header.volumes} volume(s)" if header.dimension == 4 else f"a {header.dimension}-D image"
            return [error("channels", f"{found}; the registry declares {n_channels} channels, one volume each",
                          case.case_id, path)]
        return []
    if header.dimension != 3:
        return [error("dimension", f"a {header.dimension}-D image of size {header.full_size}; expected a 3-D "
                                   "volume", case.case_id, path)]
    return []


def _check_geometry(case: SourceCase, headers: Mapping[Path, Header], tolerance: float) -> list[Problem]:
    reference = headers[case.images[0].path]
    problems = []
    others = [(f"channel {i}", ref.path) for i, ref in enumerate(case.images) if ref.path != case.images[0].path]
    for what, path in [*others, ("label", case.label)]:
        found = geometry_differences(reference, headers[path], tolerance)
        if found:
            problems.append(error("geometry", f"{what} differs from channel 0 ({case.images[0].path.name}): "
                                              + "; ".join(found), case.case_id, path))
    return problems


def read_voxels(path: str | Path) -> np.ndarray:
    """The voxel values as stored, indexed (x, y, z[, volume]).

    NIfTI goes through nibabel: ITK 5.4 reads truncated NIfTI files without an error (the missing voxels become 0)
    and turns NaN and infinite values into 0, hiding exactly what validation looks for.
    """
    if str(path).lower().endswith((".nii", ".nii.gz")):
        import nibabel as nib

        return np.asanyarray(nib.load(str(path)).dataobj)
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).T


def _read_array(path: Path, case_id: str) -> tuple[np.ndarray | None, list[Problem]]:
    try:
        return read_voxels(path), []
    except Exception as exc:  # nibabel and zlib raise many types for damaged files; all mean the same here
        return None, [error("unreadable", f"the header reads but the voxel data does not (truncated or corrupt "
                                          f"file): {_reason(exc, path)}", case_id, path)]


def _label_values(array: np.ndarray) -> np.ndarray:
    """The distinct values of an integer label map (bincount is much faster than unique on big volumes)."""
    low, high = int(array.min()), int(array.max())
    if low >= 0 and high < 1 << 16:
        return np.flatnonzero(np.bincount(array.ravel().astype(np.intp, copy=False), minlength=high + 1))
    return np.unique(array)


def _check_label(case_id: str, path: Path, array: np.ndarray, labels: Mapping[int, str]) -> tuple[list[Problem],
                                                                                                 list[int]]:
    if not np.issubdtype(array.dtype, np.integer):
        finite = np.isfinite(array)
        if not finite.all():
            return [error("non-integer-labels", f"{int((~finite).sum())} NaN/inf voxels", case_id, path)], []
        fractional = array != np.round(array)
        if fractional.any():
            sample = sorted({float(v) for v in array[fractional][:1000]})[:5]
            return [error("non-integer-labels", f"{int(fractional.sum())} voxels with fractional values, e.g. "
                                                f"{sample}", case_id, path)], []
        array = np.round(array).astype(np.int64)
    values = [int(v) for v in _label_values(array)]
    undeclared = [v for v in values if v not in labels]
    problems = []
    if undeclared:
        declared = ", ".join(f"{k}={name}" for k, name in labels.items())
        problems.append(error("label-values", f"values {undeclared} are not declared (registry: {declared})",
                              case_id, path))
    if values == [0]:
        problems.append(warning("empty-label", "the label map is all background", case_id, path))
    return problems, values


def _check_finite(case_id: str, path: Path, array: np.ndarray) -> list[Problem]:
    if not np.issubdtype(array.dtype, np.floating):
        return []
    bad = ~np.isfinite(array)
    if not bad.any():
        return []
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    axes = "x y z" + (" volume" if array.ndim == 4 else "")
    return [error("non-finite", f"{int(np.isnan(array).sum())} NaN and {int(np.isinf(array).sum())} infinite "
                                f"voxels (first at {axes} {first})", case_id, path)]


@dataclass(frozen=True)
class CaseResult:
    """What checking one case found: its problems and the label values present."""

    case_id: str
    problems: tuple[Problem, ...]
    label_values: tuple[int, ...] = ()


def check_case(case: SourceCase, n_channels: int, labels: Mapping[int, str],
               tolerance: float = DEFAULT_TOLERANCE) -> CaseResult:
    """Every check of one case; stops before the full reads when the headers already rule the case out."""
    headers, problems = _check_headers(case, n_channels)
    if problems:
        return CaseResult(case.case_id, tuple(problems))
    problems = _check_geometry(case, headers, tolerance)
    label, read_problems = _read_array(case.label, case.case_id)
    problems += read_problems
    values: list[int] = []
    if label is not None:
        label_problems, values = _check_label(case.case_id, case.label, label, labels)
        problems += label_problems
    del label
    for path in dict.fromkeys(r.path for r in case.images):
        array, read_problems = _read_array(path, case.case_id)
        problems += read_problems
        if array is not None:
            problems += _check_finite(case.case_id, path, array)
    return CaseResult(case.case_id, tuple(problems), tuple(values))


def parallel_map(func: Callable[[T], R], items: Sequence[T], num_processes: int = 1, desc: str = "",
                 progress: bool = True) -> Iterator[R]:
    """`map` with a progress bar, in `num_processes` spawned processes (in-process for 1), results in order. The
    processes end with this one, even when it is killed outright (`segbook.processes`)."""
    from tqdm import tqdm

    bar = functools.partial(tqdm, total=len(items), desc=desc, unit="case", disable=not progress, leave=False)
    if num_processes <= 1 or len(items) <= 1:
        yield from bar(map(func, items))
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(num_processes, len(items)), mp_context=context,
                             initializer=bind_to_parent, initargs=(os.getpid(),)) as pool:
        yield from bar(pool.map(func, items))


def validate_cases(cases: Sequence[SourceCase], channels: Sequence[str], labels: Mapping[int, str],
                   num_processes: int = 1, tolerance: float = DEFAULT_TOLERANCE, progress: bool = True,
                   problems: Iterable[Problem] = ()) -> ValidationReport:
    """Check every case; the report holds `problems` (from reading the layout) plus everything found here."""
    check = functools.partial(check_case, n_channels=len(channels), labels=dict(labels), tolerance=tolerance)
    report = ValidationReport(problems=list(problems), cases=[c.case_id for c in cases])
    seen: set[int] = set()
    for result in parallel_map(check, list(cases), num_processes, "validating", progress):
        report.problems += result.problems
        seen.update(result.label_values)
    if cases and not report.errors:
        absent = [f"{index} ({name})" for index, name in labels.items() if index and index not in seen]
        if absent:
            report.problems.append(warning("absent-label", f"label(s) {', '.join(absent)} appear in no case"))
    return report
