"""Reading the folder shapes users arrive with into one list of cases.

Four layouts are accepted: nnU-Net v1 task folders (`TaskNNN_Name`, the format the SegBook datasets were kept in),
Medical Segmentation Decathlon folders (one 4-D file per case holding every channel), nnU-Net v2 dataset folders,
and plain image/label folders matched by file-name patterns. Reading only lists files (no image is opened): what is
wrong with the file names (missing labels, duplicates, missing channels) becomes a `Problem`; what is wrong inside
the files is `validate.py`'s job.
"""

from __future__ import annotations

import errno
import json
import os
import re
import string
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from segbook.data.problems import Problem, error, warning
from segbook.errors import SegbookError

#: File endings SimpleITK reads that medical datasets come in (longest first, so `.nii.gz` wins over `.gz`).
IMAGE_ENDINGS: tuple[str, ...] = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
LAYOUTS: tuple[str, ...] = ("v1", "v2", "msd", "plain")
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class ImageRef:
    """One channel of a case: a 3-D file, or volume `volume` of a 4-D file (MSD)."""

    path: Path
    volume: int | None = None


@dataclass(frozen=True)
class SourceCase:
    """A labelled case as found in the source: its channels in registry order and its label file."""

    case_id: str
    images: tuple[ImageRef, ...]
    label: Path


@dataclass(frozen=True)
class PlainSource:
    """Image and label folders matched by name patterns.

    Patterns use `{case}` (the case id; may appear twice, e.g. `{case}/{case}_{channel}.nii.gz` for one folder per
    case), `{channel}` (one of `channel_tokens`, in registry channel order) and `{ext}` (any image ending).
    Without `image_pattern`, files are `{case}_{channel}{ext}` with tokens 0000, 0001, ... (nnU-Net style), or
    `{case}{ext}` for a single-channel dataset whose files carry no `_0000` suffix.
    """

    images: Path
    labels: Path
    image_pattern: str | None = None
    label_pattern: str = "{case}{ext}"
    channel_tokens: tuple[str, ...] | None = None


@dataclass
class SourceDataset:
    """The cases of a source and what is wrong with its file names; `files` feeds the import's fingerprint;
    `test_ids` are the cases whose labels the source ships as its test set (`labelsTs`)."""

    layout: str
    location: str
    cases: list[SourceCase] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    test_ids: set[str] = field(default_factory=set)


def split_ending(name: str) -> tuple[str, str] | None:
    """(stem, ending) for an image file name, None for anything else."""
    lower = name.lower()
    for ending in IMAGE_ENDINGS:
        if lower.endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)], name[-len(ending):]
    return None


def _visible_files(folder: Path, recursive: bool = False) -> list[Path]:
    """Files in `folder`, skipping hidden ones (macOS `._*` resource forks ship inside some MSD archives).

    Symbolic links that lead to no file are listed too, so that `broken_link` can report them by name rather than
    their case seeming to lack the file.
    """
    if not folder.is_dir():
        return []
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in candidates if (p.is_file() or (p.is_symlink() and not p.exists()))
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def broken_link(path: Path) -> str | None:
    """Why `path`, a symbolic link, cannot be followed to a file (None when it can, or is no link)."""
    try:
        path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop: following the link leads back to it, never to a file"
        return f"symbolic link to {os.readlink(path)}, which cannot be followed: {exc.strerror}"
    return None


def detect_layout(path: Path) -> str:
    """Guess the layout of a task folder from its name, its dataset.json and its file names."""
    if not (path / "imagesTr").is_dir():
        raise SegbookError(f"{path} has no imagesTr folder, so it is not an nnU-Net or MSD task folder; for plain "
                           "folders pass --images DIR --labels DIR")
    if re.match(r"^Dataset\d{3}_", path.name) or {"channel_names", "file_ending"} & set(_read_json(path)):
        return "v2"
    images = {split_ending(p.name)[0] for p in _visible_files(path / "imagesTr") if split_ending(p.name)}
    labels = {split_ending(p.name)[0] for p in _visible_files(path / "labelsTr") if split_ending(p.name)}
    return "msd" if images and images <= labels else "v1"


def _read_json(path: Path) -> dict:
    """The source's dataset.json, or {} when it is absent or unreadable (the registry is the authority)."""
    try:
        data = json.loads((path / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_source(source: Path | PlainSource, n_channels: int, layout: str = "auto") -> SourceDataset:
    """List the cases of `source` (a task folder, or a `PlainSource`)."""
    if isinstance(source, PlainSource):
        return _read_plain(source, n_channels)
    source = Path(source).expanduser()
    if not source.is_dir():
        raise SegbookError(f"source folder {source} does not exist")
    layout = detect_layout(source) if layout == "auto" else layout
    if layout == "plain":
        raise SegbookError("the plain layout takes --images DIR --labels DIR rather than --from")
    if layout not in LAYOUTS:
        raise SegbookError(f"unknown layout {layout!r}; choose one of auto, {', '.join(LAYOUTS)}")
    dataset = _read_msd(source, n_channels) if layout == "msd" else _read_nnunet(source, n_channels, layout)
    dataset.problems += _check_source_json(source, n_channels)
    return dataset


def _check_source_json(root: Path, n_channels: int) -> list[Problem]:
    """v1/MSD `modality` or v2 `channel_names`: optional, but when present they must agree with the registry."""
    metadata = _read_json(root)
    declared = metadata.get("channel_names") or metadata.get("modality")
    if isinstance(declared, dict) and len(declared) != n_channels:
        return [error("source-metadata", f"declares {len(declared)} channel(s) {list(declared.values())}, the "
                                         f"registry entry {n_channels}", file=root / "dataset.json")]
    return []


class _Collector:
    """Gathers (case, channel) -> files and case -> label files, then turns them into cases and problems."""

    def __init__(self, n_channels: int) -> None:
        self.n_channels = n_channels
        self.images: dict[str, dict[int, list[ImageRef]]] = defaultdict(lambda: defaultdict(list))
        self.labels: dict[str, list[Path]] = defaultdict(list)
        self.problems: list[Problem] = []
        self.files: list[Path] = []
        self.broken: set[str] = set()

    def image(self, case: str, channel: int, ref: ImageRef) -> None:
        self.images[case][channel].append(ref)
        self._file(case, ref.path)

    def image_file(self, case: str, refs: list[ImageRef]) -> None:
        """One file holding every channel (MSD): one ref per channel."""
        for channel, ref in enumerate(refs):
            self.images[case][channel].append(ref)
        self._file(case, refs[0].path)

    def label(self, case: str, path: Path) -> None:
        self.labels[case].append(path)
        self._file(case, path)

    def _file(self, case: str, path: Path) -> None:
        """A file of `case`; a link that leads nowhere is its case's error (and stays out of `files`, which the
        import's fingerprint reads)."""
        why = broken_link(path)
        if why:
            self.problems.append(error("broken-link", why, case, path))
            self.broken.add(case)
        else:
            self.files.append(path)

    def unmatched(self, path: Path, why: str) -> None:
        self.problems.append(warning("unmatched-file", why, file=path))

    def cases(self) -> list[SourceCase]:
        self._check_case_collisions()
        cases = []
        for case_id in sorted((set(self.images) | set(self.labels)) - self.broken):
            channels, labels = self.images.get(case_id, {}), self.labels.get(case_id, [])
            if not channels:
                self.problems.append(error("missing-image", "label has no image files", case_id, labels[0]))
                continue
            if not labels:
                first = next(iter(channels.values()))[0].path
                self.problems.append(error("missing-label", "no label file for this case", case_id, first))
                continue
            self._check_duplicates(case_id, channels, labels)
            self._check_channels(case_id, channels)
            images = tuple(refs[0] for _, refs in sorted(channels.items()))
            cases.append(SourceCase(case_id, images, labels[0]))
        return cases

    def _check_case_collisions(self) -> None:
        folded: dict[str, list[str]] = defaultdict(list)
        for case_id in set(self.images) | set(self.labels):
            folded[case_id.casefold()].append(case_id)
        for variants in folded.values():
            if len(variants) > 1:
                first = sorted(variants)[0]
                self.problems.append(error("duplicate", f"case ids {sorted(variants)} differ only in upper/lower "
                                                        "case (they collide on macOS and Windows)", first))

    def _check_duplicates(self, case_id: str, channels: dict[int, list[ImageRef]], labels: list[Path]) -> None:
        for channel, refs in sorted(channels.items()):
            if len({r.path for r in refs}) > 1:
                files = ", ".join(str(r.path) for r in refs)
                self.problems.append(error("duplicate", f"channel {channel} has several files: {files}", case_id,
                                           refs[0].path))
        if len(labels) > 1:
            self.problems.append(error("duplicate", "several label files: " + ", ".join(map(str, labels)),
                                       case_id, labels[0]))

    def _check_channels(self, case_id: str, channels: dict[int, list[ImageRef]]) -> None:
        expected = set(range(self.n_channels))
        missing, extra = sorted(expected - set(channels)), sorted(set(channels) - expected)
        where = next(iter(channels.values()))[0].path
        if missing:
            self.problems.append(error("channels", f"missing channel(s) {', '.join(map(str, missing))}; the registry "
                                                   f"declares {self.n_channels}", case_id, where))
        if extra:
            self.problems.append(error("channels", f"unexpected channel(s) {', '.join(map(str, extra))}; the "
                                                   f"registry declares {self.n_channels}", case_id, where))


def _pair_folders(root: Path) -> Iterable[tuple[Path, Path | None]]:
    """(images folder, labels folder or None) for imagesTr and, when present, imagesTs."""
    yield root / "imagesTr", root / "labelsTr"
    if (root / "imagesTs").is_dir():
        yield root / "imagesTs", (root / "labelsTs") if (root / "labelsTs").is_dir() else None


def _unlabelled(folder: Path, count: int) -> Problem:
    return warning("unlabelled", f"{count} image file(s) in {folder.name} ignored: there is no "
                                 f"{folder.name.replace('images', 'labels')} folder", file=folder)


def _read_task_folder(root: Path, n_channels: int, layout: str,
                      add_image: Callable[["_Collector", Path, str], None]) -> SourceDataset:
    """The folder walk nnU-Net and MSD share: image/label folder pairs, labels named `{case}{ext}`; `add_image`
    records one image file whose name without ending is given, by the layout's own naming rule."""
    collect = _Collector(n_channels)
    test_ids: set[str] = set()
    for image_dir, label_dir in _pair_folders(root):
        image_files = _visible_files(image_dir)
        if label_dir is None:
            if image_files:
                collect.problems.append(_unlabelled(image_dir, len(image_files)))
            continue
        for folder, add in ((image_files, add_image), (_visible_files(label_dir), _add_label)):
            for path in folder:
                parts = split_ending(path.name)
                if parts:
                    add(collect, path, *parts)
                else:
                    collect.unmatched(path, "not an image file")
        if label_dir.name == "labelsTs":
            test_ids |= {parts[0] for path in _visible_files(label_dir) if (parts := split_ending(path.name))}
    cases = collect.cases()
    return SourceDataset(layout, str(root), cases, collect.problems, collect.files,
                         test_ids=test_ids & {case.case_id for case in cases})


def _add_label(collect: "_Collector", path: Path, stem: str, ending: str) -> None:
    collect.label(stem, path)


def _read_nnunet(root: Path, n_channels: int, layout: str) -> SourceDataset:
    """nnU-Net v1 and v2: `{case}_{channel:04d}{ext}` images (case_0000.nii.gz), `{case}{ext}` labels; labelled
    imagesTs cases count too."""
    def add_image(collect: _Collector, path: Path, stem: str, ending: str) -> None:
        match = _CHANNEL_SUFFIX.match(stem)
        if match:
            collect.image(match["case"], int(match["channel"]), ImageRef(path))
        else:
            collect.unmatched(path, "not named {case}_{channel:04d}" + ending)

    return _read_task_folder(root, n_channels, layout, add_image)


def _read_msd(root: Path, n_channels: int) -> SourceDataset:
    """MSD: `{case}{ext}` for images and labels; a multi-channel case is one 4-D file."""
    def add_image(collect: _Collector, path: Path, stem: str, ending: str) -> None:
        refs = [ImageRef(path)] if n_channels == 1 else [ImageRef(path, c) for c in range(n_channels)]
        collect.image_file(stem, refs)

    return _read_task_folder(root, n_channels, "msd", add_image)


def compile_pattern(pattern: str, tokens: Sequence[str] | None = None) -> re.Pattern:
    """A regular expression for a `{case}`/`{channel}`/`{ext}` file-name pattern (matched against the whole path
    relative to the folder, with `/` separators). `{channel}` is one of `tokens`, or without them any nnU-Net
    channel number (`0000`, `0001`, ...), so that a channel the registry lacks is seen as one."""
    parts, has_case = [], False
    for literal, name, spec, conversion in string.Formatter().parse(pattern):
        parts.append(re.escape(literal))
        if name is None:
            continue
        if spec or conversion:
            raise SegbookError(f"pattern {pattern!r}: write fields as plain {{case}}, {{channel}} or {{ext}}")
        if name == "case":
            parts.append("(?P=case)" if has_case else r"(?P<case>[^/]+?)")
            has_case = True
        elif name == "channel":
            choices = r"\d{4}" if tokens is None else "|".join(re.escape(t) for t in sorted(tokens, key=len,
                                                                                         reverse=True))
            parts.append(f"(?P<channel>{choices})")
        elif name == "ext":
            parts.append("(?:" + "|".join(re.escape(e) for e in IMAGE_ENDINGS) + ")")
        else:
            raise SegbookError(f"pattern {pattern!r}: unknown field {{{name}}}; use {{case}}, {{channel}}, {{ext}}")
    if not has_case:
        raise SegbookError(f"pattern {pattern!r} has no {{case}} field, so it cannot tell cases apart")
    return re.compile("".join(parts))


def _plain_pattern(source: PlainSource, image_files: list[Path], n_channels: int) -> tuple[str, tuple[str, ...]]:
    """The image pattern and channel tokens: the user's, or nnU-Net naming (no tokens: channel numbers), or
    `{case}{ext}` for one channel."""
    nnunet_style = any(_CHANNEL_SUFFIX.match((split_ending(p.name) or ("",))[0]) for p in image_files)
    default = "{case}{ext}" if n_channels == 1 and not nnunet_style else "{case}_{channel}{ext}"
    pattern = source.image_pattern or default
    tokens = tuple(source.channel_tokens or ())
    if "{channel}" in pattern and tokens and len(tokens) != n_channels:
        raise SegbookError(f"{len(tokens)} channel token(s) {list(tokens)} for {n_channels} registry channel(s); "
                           "give one --channel-tokens value per channel, in registry order")
    if "{channel}" not in pattern and n_channels > 1:
        raise SegbookError(f"image pattern {pattern!r} has no {{channel}} field but the dataset has {n_channels} "
                           "channels")
    return pattern, tokens


def _channel_index(match: re.Match, tokens: tuple[str, ...]) -> int:
    """The channel of a matched image file: its token's position, or its nnU-Net number (0 without `{channel}`)."""
    channel = match.groupdict().get("channel")
    if channel is None:
        return 0
    return tokens.index(channel) if tokens else int(channel)


def _read_plain(source: PlainSource, n_channels: int) -> SourceDataset:
    image_root, label_root = Path(source.images).expanduser(), Path(source.labels).expanduser()
    for folder in (image_root, label_root):
        if not folder.is_dir():
            raise SegbookError(f"folder {folder} does not exist")
    shared = image_root.resolve() == label_root.resolve()
    if shared and (source.image_pattern is None or source.label_pattern == "{case}{ext}"):
        raise SegbookError("images and labels share a folder: give an --image-pattern and a --label-pattern that "
                           "tell them apart (e.g. '{case}_{channel}.nii.gz' and '{case}_seg.nii.gz')")
    recursive = "/" in (source.image_pattern or "") or "/" in source.label_pattern
    image_files = _visible_files(image_root, recursive)
    pattern, tokens = _plain_pattern(source, image_files, n_channels)
    image_re, label_re = compile_pattern(pattern, tokens or None), compile_pattern(source.label_pattern)
    collect, claimed = _Collector(n_channels), set()
    for path in image_files:
        match = image_re.fullmatch(path.relative_to(image_root).as_posix())
        if match:
            collect.image(match["case"], _channel_index(match, tokens), ImageRef(path))
            claimed.add(path)
        elif not shared:
            collect.unmatched(path, f"does not match the image pattern {pattern!r}")
    for path in _visible_files(label_root, recursive):
        match = label_re.fullmatch(path.relative_to(label_root).as_posix())
        if match and path not in claimed:
            collect.label(match["case"], path)
        elif path not in claimed:
            why = f"matches neither {pattern!r} nor {source.label_pattern!r}" if shared else \
                f"does not match the label pattern {source.label_pattern!r}"
            collect.unmatched(path, why)
    settings = {"images": str(image_root), "labels": str(label_root), "image_pattern": pattern,
                "label_pattern": source.label_pattern,
                "channel_tokens": list(tokens) or [f"{i:04d}" for i in range(n_channels)]}
    return SourceDataset("plain", f"{image_root} + {label_root}", collect.cases(), collect.problems,
                         collect.files, settings)
