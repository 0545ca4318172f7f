"""The SegBook datasets as validated, queryable metadata (`dataset_registry.yaml`).

Facts live in YAML, one entry per dataset; everything derived from them (scale, nnU-Net folder name, the
`dataset.json` fragments) is computed here so it can never disagree with the facts. Users add datasets in their own
YAML files (`--registry FILE` or `SEGBOOK_REGISTRY`), validated by the same schema and merged after the built-in
file; a clash of key or dataset id with a different entry is an error.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import shlex
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from segbook.errors import SegbookError
from segbook.yamlfile import YamlFileError, read_yaml

REGISTRY_ENV = "SEGBOOK_REGISTRY"
BUILTIN_FILENAME = "dataset_registry.yaml"

Modality = Literal["CT", "MRI", "CT&PET", "Ultrasound"]
Target = Literal["Lesion", "Seen Structure", "Unseen Structure", "Structure&Lesion"]
Region = Literal["Head and Neck", "Thoracic", "Abdominal", "Pelvic", "Limb", "Other", "unknown"]
Scale = Literal["small", "medium", "large"]
LabelKind = Literal["background", "structure", "lesion"]

MODALITIES: tuple[str, ...] = get_args(Modality)
TARGETS: tuple[str, ...] = get_args(Target)
REGIONS: tuple[str, ...] = get_args(Region)
SCALES: tuple[str, ...] = get_args(Scale)

#: Case counts where a dataset stops being small / medium (the SegBook paper: <100, 100-399, >=400).
MEDIUM_FROM, LARGE_FROM = 100, 400


def _totalseg_v1_classes() -> frozenset[str]:
    """The 104 TotalSegmentator v1 classes the released STU-Net checkpoints were pretrained on.

    Spelled out here so validation needs neither `../shared` nor `stunet` (which imports torch); a test checks them
    against the checkpoints' label file.
    """
    paired = ["adrenal_gland", "autochthon", "clavicula", "femur", "gluteus_maximus", "gluteus_medius",
              "gluteus_minimus", "heart_atrium", "heart_ventricle", "hip", "humerus", "iliac_artery", "iliac_vena",
              "iliopsoas", "kidney", "scapula"]
    single = ["aorta", "brain", "colon", "duodenum", "esophagus", "face", "gallbladder", "heart_myocardium",
              "inferior_vena_cava", "liver", "lung_lower_lobe_left", "lung_lower_lobe_right", "lung_middle_lobe_right",
              "lung_upper_lobe_left", "lung_upper_lobe_right", "pancreas", "portal_vein_and_splenic_vein",
              "pulmonary_artery", "sacrum", "small_bowel", "spleen", "stomach", "trachea", "urinary_bladder"]
    names = [f"{part}_{side}" for part in paired for side in ("left", "right")] + single
    names += [f"rib_{side}_{i}" for side in ("left", "right") for i in range(1, 13)]
    names += [f"vertebrae_{level}{i}" for level, count in (("C", 7), ("T", 12), ("L", 5)) for i in range(1, count + 1)]
    return frozenset(names)


TOTALSEG_V1_CLASSES = _totalseg_v1_classes()


class RegistryError(SegbookError):
    """A registry file that cannot be read, fails validation, or clashes with another file."""


class TaskLookupError(SegbookError):
    """A `--task` that names no dataset or several; carries what the user can pick from."""

    def __init__(self, message: str, query: str, candidates: Sequence[DatasetEntry] = (),
                 suggestions: Sequence[DatasetEntry] = ()) -> None:
        super().__init__(message)
        self.query = query
        self.candidates = list(candidates)
        self.suggestions = list(suggestions)


class _Model(BaseModel):
    # Unknown fields are typos in a user's YAML: reject them rather than ignore them.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Label(_Model):
    """One output class: background, an anatomical structure, or a lesion."""

    index: int = Field(ge=0)
    name: str = Field(min_length=1)
    kind: LabelKind
    #: Structures only: whether the structure is one of (or a union of) the 104 TotalSegmentator v1 classes.
    seen: bool | None = Field(default=None, validate_default=True)
    #: The TotalSegmentator v1 classes a seen structure corresponds to.
    totalseg_classes: list[str] = Field(default_factory=list, validate_default=True)

    @field_validator("name")
    @classmethod
    def _stripped(cls, name: str) -> str:
        if name != name.strip():
            raise ValueError(f"label name {name!r} has leading or trailing spaces")
        return name

    @field_validator("seen")
    @classmethod
    def _seen_for_structures(cls, seen: bool | None, info: ValidationInfo) -> bool | None:
        kind = info.data.get("kind")
        if kind == "structure" and seen is None:
            raise ValueError("a structure must say whether TotalSegmentator covers it (seen: true or false)")
        if kind in ("background", "lesion") and seen is not None:
            raise ValueError(f"'seen' applies to structures only, not to a {kind}")
        return seen

    @field_validator("totalseg_classes")
    @classmethod
    def _known_classes(cls, classes: list[str], info: ValidationInfo) -> list[str]:
        unknown = [name for name in classes if name not in TOTALSEG_V1_CLASSES]
        if unknown:
            close = sorted({c for name in unknown for c in difflib.get_close_matches(name, TOTALSEG_V1_CLASSES, 3)})
            hint = f"; close: {', '.join(close)}" if close else ""
            raise ValueError(f"not TotalSegmentator v1 classes: {', '.join(unknown)}{hint}")
        if "seen" in info.data and bool(classes) != bool(info.data["seen"]):
            raise ValueError("list the matching TotalSegmentator v1 classes exactly when seen is true")
        return classes


class DatasetEntry(_Model):
    """Everything the benchmark knows about one dataset; derived values are properties, never stored."""

    key: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    #: The SegBook paper's task number ("613"); None for datasets that are not in the paper.
    paper_task: str | None = Field(default=None, pattern=r"^\d{3}$")
    name: str = Field(min_length=1)
    dataset_id: int = Field(ge=1, le=999)
    modality: Modality
    channels: list[str] = Field(min_length=1)
    target: Target
    cases: int = Field(gt=0)
    train_cases: int = Field(gt=0)
    test_cases: int = Field(gt=0)
    labels: list[Label] = Field(min_length=2)
    region: Region
    bone: bool
    vessel: bool
    citation: str = "unknown"
    source_url: str = Field(default="unknown", pattern=r"^(unknown|https?://\S+)$")
    licence: str = "unknown"
    nsd_tolerance_mm: float = Field(default=2.0, gt=0)
    file_ending: str = Field(default=".nii.gz", pattern=r"^\.[A-Za-z0-9.]+$")
    #: The SegBook authors' nnU-Net v1 plans (3d_fullres), for comparison with ours.
    reference_patch_size: list[int] | None = Field(default=None, min_length=3, max_length=3)
    reference_spacing: list[float] | None = Field(default=None, min_length=3, max_length=3)
    #: Case counts from which a dataset is medium and large: the paper's 100 and 400. Demo registries of toy-sized
    #: synthetic tasks scale them down so every grouping still has members.
    scale_thresholds: tuple[int, int] = (MEDIUM_FROM, LARGE_FROM)
    notes: list[str] = Field(default_factory=list)

    @field_validator("channels")
    @classmethod
    def _channels_match_modality(cls, channels: list[str], info: ValidationInfo) -> list[str]:
        if any(not name.strip() for name in channels):
            raise ValueError("channel names must not be empty")
        is_ct = [name.casefold() == "ct" for name in channels]
        modality = info.data.get("modality")
        if modality == "CT" and not all(is_ct):
            raise ValueError("a CT dataset's channels are all named 'CT' (that name selects CT normalisation)")
        if modality in ("MRI", "Ultrasound") and any(is_ct):
            raise ValueError(f"an {modality} dataset has no channel named 'CT' (it would get CT normalisation)")
        return channels

    @field_validator("test_cases")
    @classmethod
    def _split_matches_cases(cls, test_cases: int, info: ValidationInfo) -> int:
        cases, train = info.data.get("cases"), info.data.get("train_cases")
        if cases is not None and train is not None and abs(train + test_cases - cases) > 1:
            raise ValueError(f"train_cases + test_cases = {train + test_cases} but cases = {cases} "
                             "(the published splits differ from the paper's count by at most one)")
        return test_cases

    @field_validator("labels")
    @classmethod
    def _labels_are_nnunet_labels(cls, labels: list[Label]) -> list[Label]:
        indices = [label.index for label in labels]
        if indices != list(range(len(labels))):
            raise ValueError(f"label indices must run 0, 1, 2, ... in order (nnU-Net needs that); got {indices}")
        kinds = [label.kind == "background" for label in labels]
        if not kinds[0] or any(kinds[1:]):
            raise ValueError("label 0 and only label 0 is the background")
        seen: dict[str, str] = {}
        for label in labels:
            folded = label.name.casefold()
            if folded in seen:
                raise ValueError(f"label names must be unique: {seen[folded]!r} and {label.name!r}")
            seen[folded] = label.name
        return labels

    @field_validator("scale_thresholds")
    @classmethod
    def _thresholds_increase(cls, thresholds: tuple[int, int]) -> tuple[int, int]:
        if not 0 < thresholds[0] < thresholds[1]:
            raise ValueError(f"scale thresholds must be positive and increasing, got {list(thresholds)}")
        return thresholds

    @property
    def scale(self) -> Scale:
        medium_from, large_from = self.scale_thresholds
        if self.cases < medium_from:
            return "small"
        return "medium" if self.cases < large_from else "large"

    @property
    def safe_name(self) -> str:
        """The key without its `TaskNNN_` prefix, reduced to the characters nnU-Net folder names allow."""
        return re.sub(r"[^A-Za-z0-9_-]", "_", re.sub(r"^Task\d+_", "", self.key))

    @property
    def nnunet_name(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.safe_name}"

    @property
    def channel_names_json(self) -> dict[str, str]:
        return {str(i): name for i, name in enumerate(self.channels)}

    @property
    def labels_json(self) -> dict[str, int]:
        return {label.name: label.index for label in self.labels}

    @property
    def foreground_labels(self) -> list[Label]:
        return self.labels[1:]

    def label_kind(self, index: int) -> LabelKind:
        if not 0 <= index < len(self.labels):
            raise SegbookError(f"{self.key} has no label {index} (labels 0-{len(self.labels) - 1})")
        return self.labels[index].kind

    def row(self) -> dict[str, Any]:
        """One flat row for tables and CSV."""
        return {"key": self.key, "paper_task": self.paper_task or "", "dataset_id": self.dataset_id,
                "name": self.name, "modality": self.modality, "target": self.target, "cases": self.cases,
                "scale": self.scale, "train": self.train_cases, "test": self.test_cases, "region": self.region,
                "bone": self.bone, "vessel": self.vessel, "channels": ", ".join(self.channels),
                "labels": len(self.foreground_labels)}

    def as_dict(self) -> dict[str, Any]:
        """All stored fields plus the derived ones, JSON-ready."""
        return {**self.model_dump(mode="json"), "scale": self.scale, "nnunet_name": self.nnunet_name}


@dataclass(frozen=True)
class RegistrySummary:
    """The paper's dataset statistics, recomputed from the registry."""

    total: int
    by_scale: dict[str, int]
    scale_percent: dict[str, float]
    by_modality_target: dict[str, dict[str, int]]
    by_region: dict[str, int]
    bone: int
    vessel: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fold(text: str) -> str:
    """Case-, space-, `_`- and `-`-insensitive form of a name, for matching what users type."""
    return re.sub(r"[\s_-]+", "", text.casefold())


_TARGET_ALIASES = {"seen": "Seen Structure", "unseen": "Unseen Structure", "structure+lesion": "Structure&Lesion",
                   "structureandlesion": "Structure&Lesion", "both": "Structure&Lesion"}
_MODALITY_ALIASES = {"mr": "MRI", "pet": "CT&PET", "petct": "CT&PET", "pet/ct": "CT&PET", "ct/pet": "CT&PET",
                     "us": "Ultrasound"}
_REGION_ALIASES = {"hn": "Head and Neck", "h&n": "Head and Neck", "headneck": "Head and Neck",
                   "thorax": "Thoracic", "chest": "Thoracic", "abdomen": "Abdominal", "pelvis": "Pelvic"}
_NUMBER = re.compile(r"(?i)(task|dataset)?_?(\d{1,3})")


def _choice(value: str, choices: Sequence[str], aliases: Mapping[str, str], what: str) -> str:
    folded = _fold(value)
    for choice in choices:
        if _fold(choice) == folded:
            return choice
    if folded in aliases:
        return aliases[folded]
    raise SegbookError(f"unknown {what} {value!r}; choose from: {', '.join(choices)}")


def _how_to_name(entry: DatasetEntry) -> str:
    return f"--task {entry.key}, --task {shlex.quote(entry.name)} or --task Dataset{entry.dataset_id:03d}"


@dataclass(frozen=True)
class Registry:
    """The merged registry: entries in the paper's order, then user datasets in file order."""

    entries: tuple[DatasetEntry, ...]
    #: The file each entry came from (by key), for messages.
    sources: Mapping[str, Path] = field(default_factory=dict)

    def __iter__(self) -> Iterator[DatasetEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, query: str | int) -> DatasetEntry:
        """Resolve a paper number (613, Task613), key, nnU-Net id (Dataset613) or name (case-insensitive)."""
        text = str(query).strip()
        for entry in self.entries:
            if entry.key.casefold() == text.casefold():
                return entry
        number = _NUMBER.fullmatch(text)
        if number:
            return self._by_number(text, number[1], int(number[2]))
        matches = [e for e in self.entries if _fold(text) in {_fold(e.name), _fold(e.safe_name), _fold(e.nnunet_name)}]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise self._ambiguous(text, matches, f"{len(matches)} datasets have that name")
        raise self._unknown(text)

    def _by_number(self, text: str, prefix: str | None, number: int) -> DatasetEntry:
        """`DatasetNNN` is an nnU-Net id; `NNN` and `TaskNNN` are a paper number or, failing that, an id."""
        by_paper = [] if (prefix or "").lower() == "dataset" else [
            e for e in self.entries if e.paper_task is not None and int(e.paper_task) == number]
        paper_keys = {e.key for e in by_paper}
        matches = by_paper + [e for e in self.entries if e.dataset_id == number and e.key not in paper_keys]
        if len(matches) == 1:
            return matches[0]
        if matches:
            why = (f"the paper numbers {len(by_paper)} different datasets {number:03d}" if len(by_paper) > 1
                   else f"{number:03d} is the paper number of one dataset and the dataset id of another")
            raise self._ambiguous(text, matches, why)
        raise self._unknown(text)

    def _ambiguous(self, text: str, matches: list[DatasetEntry], why: str) -> TaskLookupError:
        lines = [f"task {text!r} is ambiguous: {why}; name one of them:"]
        lines += [f"  {e.name} ({e.modality}, {e.target}, {e.cases} cases): {_how_to_name(e)}" for e in matches]
        return TaskLookupError("\n".join(lines), text, candidates=matches)

    def _unknown(self, text: str) -> TaskLookupError:
        """Suggest names that contain what was typed, then names that look like it."""
        aliases = {_fold(alias): e for e in self.entries for alias in (e.name, e.safe_name)}
        typed = _fold(text)
        close = [a for a in aliases if typed and typed in a]
        close += difflib.get_close_matches(typed, list(aliases), n=8, cutoff=0.6)
        suggestions = list({aliases[a].key: aliases[a] for a in close}.values())[:8]
        message = f"no dataset matches {text!r}" + (
            "; did you mean " + ", ".join(f"{e.name} ({e.key})" for e in suggestions) + "?" if suggestions else ".")
        return TaskLookupError(f"{message} Run `segbook tasks` to list all datasets.", text, suggestions=suggestions)

    def select(self, modality: str | None = None, target: str | None = None, scale: str | None = None,
               region: str | None = None) -> list[DatasetEntry]:
        """The entries matching every given filter (case-insensitive; target accepts `seen`, `unseen`, ...)."""
        wanted = {
            "modality": modality and _choice(modality, MODALITIES, _MODALITY_ALIASES, "modality"),
            "target": target and _choice(target, TARGETS, _TARGET_ALIASES, "target"),
            "scale": scale and _choice(scale, SCALES, {}, "scale"),
            "region": region and _choice(region, REGIONS, _REGION_ALIASES, "region"),
        }
        return [e for e in self.entries
                if all(value is None or getattr(e, name) == value for name, value in wanted.items())]

    def summary(self) -> RegistrySummary:
        scales = Counter(e.scale for e in self.entries)
        total = len(self.entries)
        grid = {m: {t: 0 for t in TARGETS} for m in MODALITIES}
        for entry in self.entries:
            grid[entry.modality][entry.target] += 1
        regions = Counter(e.region for e in self.entries)
        return RegistrySummary(
            total=total,
            by_scale={s: scales[s] for s in SCALES},
            scale_percent={s: 100.0 * scales[s] / total if total else 0.0 for s in SCALES},
            by_modality_target=grid,
            by_region={r: regions[r] for r in REGIONS if regions[r]},
            bone=sum(e.bone for e in self.entries),
            vessel=sum(e.vessel for e in self.entries),
        )


def builtin_registry_path() -> Path:
    return Path(str(resources.files("segbook") / BUILTIN_FILENAME))


def _describe(path: Path, number: int, key: Any, error: ValidationError) -> list[str]:
    name = f"entry {key!r} (#{number})" if isinstance(key, str) else f"entry #{number}"
    lines = []
    for item in error.errors(include_url=False):
        where = ".".join(str(part) for part in item["loc"]) or "(entry)"
        message = item["msg"].removeprefix("Value error, ")
        given = item.get("input")
        if item["type"] != "missing" and not isinstance(given, (dict, list)):
            message += f" (got {given!r})"
        lines.append(f"{path}: {name}, field '{where}': {message}")
    return lines


def read_registry_file(path: str | os.PathLike) -> list[DatasetEntry]:
    """Parse and validate one registry file; all problems are reported together."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as error:
        raise RegistryError(f"cannot read registry file {path}: {error.strerror or error}") from None
    return list(_read_validated(path, stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=16)
def _read_validated(path: Path, mtime_ns: int, size: int) -> tuple[DatasetEntry, ...]:
    """Cached on the file's identity and modification, since every command loads the built-in file again."""
    try:
        data = read_yaml(path)
    except OSError as error:
        raise RegistryError(f"cannot read registry file {path}: {error.strerror or error}") from None
    except YamlFileError as error:
        raise RegistryError(str(error)) from None
    if not isinstance(data, dict) or set(data) != {"datasets"} or not isinstance(data["datasets"], list):
        raise RegistryError(f"{path}: a registry file is a mapping with one key, 'datasets', holding a list of "
                            "entries (see docs/registry.md)")
    entries, problems = [], []
    for number, raw in enumerate(data["datasets"], start=1):
        try:
            entries.append(DatasetEntry.model_validate(raw))
        except ValidationError as error:
            problems += _describe(path, number, raw.get("key") if isinstance(raw, dict) else None, error)
    if problems:
        raise RegistryError("invalid dataset registry:\n  " + "\n  ".join(problems))
    return tuple(entries)


def _env_files() -> list[Path]:
    return [Path(part) for part in os.environ.get(REGISTRY_ENV, "").split(os.pathsep) if part.strip()]


def _free_id(used: set[int]) -> int:
    return next((i for i in [*range(900, 1000), *range(1, 900)] if i not in used), 0)


def _merge(files: Sequence[Path]) -> Registry:
    by_key: dict[str, DatasetEntry] = {}
    by_id: dict[int, str] = {}
    sources: dict[str, Path] = {}
    for path in files:
        for entry in read_registry_file(path):
            old = by_key.get(entry.key)
            if old == entry:
                continue
            if old is not None:
                raise RegistryError(f"{path}: dataset key {entry.key!r} is already defined differently in "
                                    f"{sources[entry.key]}; give your dataset another key")
            if entry.dataset_id in by_id:
                other = by_id[entry.dataset_id]
                raise RegistryError(f"{path}: dataset id {entry.dataset_id} of {entry.key!r} is already used by "
                                    f"{other!r} in {sources[other]}; choose a free id, e.g. {_free_id(set(by_id))}")
            by_key[entry.key], by_id[entry.dataset_id], sources[entry.key] = entry, entry.key, path
    return Registry(tuple(by_key.values()), sources)


def load_registry(extra_files: Sequence[str | os.PathLike] | None = None) -> Registry:
    """The built-in registry, then the files in `SEGBOOK_REGISTRY` (os.pathsep-separated), then `extra_files`."""
    return _merge([builtin_registry_path(), *_env_files(), *(Path(f) for f in extra_files or ())])
