"""Synthetic segmentation datasets for demos and tests, written in any layout `segbook data import` accepts.

A dataset is a `SynthSpec`: volume size and spacing, CT-like, MRI-like or CT&PET intensities, channels, and a list of
targets. Each structure target has a *prototype*: its position in a normalised body frame, its shape, size and
intensity are drawn from the prototype number alone, so the same prototype looks alike in every synthetic task
(a "seen" structure of a target task resembles the source task's structure with that prototype; a new prototype is
"unseen"). Cases vary around the prototype (position, size, rotation, noise). Everything is drawn from numpy
Generators seeded by (seed, case), so a spec writes the same bytes on every platform.

Sizes and spacings are in ITK order (x, y, z); numpy arrays are (z, y, x).

`write_synthetic_task` is `segbook data synth`: a dataset in a source layout, its registry file, and the
`segbook data import` command that imports it.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from segbook.errors import SegbookError

Layout = Literal["v1", "v2", "msd", "plain"]
LAYOUTS: tuple[str, ...] = ("v1", "v2", "msd", "plain")

_PROTOTYPE_SALT = 0x5E6B00C  # separates prototype draws from case draws
_BODY_HALF_EXTENT = (0.45, 0.40, 0.5)  # body ellipsoid half-axes as fractions of the volume (x, y, z)
_SHARED_CT_HU, _SHARED_MRI_LEVEL = 130.0, 650.0  # the one intensity of every structure with `same_intensity`


Modality = Literal["CT", "MRI", "CT&PET"]
MODALITIES: tuple[str, ...] = ("CT", "MRI", "CT&PET")
#: Each modality's channels when none are given: the registry's names (a channel named CT selects CT normalisation).
DEFAULT_CHANNELS = {"CT": ("CT",), "MRI": ("T2",), "CT&PET": ("CT", "PET")}


class SynthError(SegbookError, ValueError):
    """A synthetic dataset that cannot be made: no cases, repeated target names, an unknown layout..."""


@dataclass(frozen=True)
class TargetSpec:
    """One label of a synthetic task.

    `shape`: "blob" (a lumpy ellipsoid, organ-like), "tube" (a curved tube, vessel-like) or "sphere" (round,
    lesion-like). Lesions are small spheres, `count` of them per case (drawn in the inclusive range), placed inside the
    structure named by `within` when given. A structure with `totalseg_classes` is registered as "seen" (one of the
    TotalSegmentator classes the backbones were pretrained on).
    """

    name: str
    kind: Literal["structure", "lesion"] = "structure"
    shape: Literal["blob", "tube", "sphere"] = "blob"
    prototype: int | None = None
    within: str | None = None
    count: tuple[int, int] = (1, 2)
    totalseg_classes: tuple[str, ...] = ()


@dataclass(frozen=True)
class SynthSpec:
    """A synthetic dataset: `cases` volumes of `size` voxels at `spacing` mm, each with every target labelled."""

    name: str = "Synthetic"
    cases: int = 8
    size: tuple[int, int, int] = (48, 48, 32)
    spacing: tuple[float, float, float] = (1.5, 1.5, 2.5)
    modality: Modality = "CT"
    channels: tuple[str, ...] = ()
    targets: tuple[TargetSpec, ...] = (TargetSpec("organ"),)
    seed: int = 0
    origin: tuple[float, float, float] | None = None
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    noise: float = 1.0  # image noise relative to the default (12 HU in CT, 15 in MRI): >1 makes tasks harder
    #: All structures share one intensity, so only shape and position tell them apart: the anatomical prior that
    #: pretraining on a source task with the same structures can pass on.
    same_intensity: bool = False

    def __post_init__(self) -> None:
        if self.cases < 1:
            raise SynthError("a synthetic dataset needs at least one case")
        if self.modality not in MODALITIES:
            raise SynthError(f"unknown modality {self.modality!r}; choose one of {', '.join(MODALITIES)}")
        if not self.channels:
            object.__setattr__(self, "channels", DEFAULT_CHANNELS[self.modality])
        _check_channels(self.modality, self.channels)
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names) or not names:
            raise SynthError(f"target names must be unique and non-empty, got {names}")
        for target in self.targets:
            if target.within is not None and target.within not in names:
                raise SynthError(f"target {target.name!r} is placed within unknown target {target.within!r}")

    @property
    def case_ids(self) -> list[str]:
        prefix = re.sub(r"[^a-z0-9]+", "", self.name.lower()) or "case"
        return [f"{prefix}_{i:03d}" for i in range(self.cases)]

    @property
    def labels(self) -> dict[int, str]:
        """Label index to name, background first (nnU-Net wants consecutive indices)."""
        return {0: "background", **{i + 1: t.name for i, t in enumerate(self.targets)}}

    def prototype_of(self, index: int) -> int:
        target = self.targets[index]
        return target.prototype if target.prototype is not None else index


def _check_channels(modality: str, channels: Sequence[str]) -> None:
    """A CT&PET task has CT channels (CT intensities, CT normalisation) and others (PET uptake); a CT task only CT
    ones: said here, naming the modality that fits, rather than by the registry after the images are written."""
    is_ct = [name.casefold() == "ct" for name in channels]
    if modality == "CT" and not all(is_ct):
        raise SynthError(f"a CT task's channels are all named CT, not {', '.join(channels)}: for CT with PET use "
                         "the modality CT&PET")
    if modality == "CT&PET" and (all(is_ct) or not any(is_ct)):
        raise SynthError(f"a CT&PET task has a channel named CT and at least one other (PET), not "
                         f"{', '.join(channels)}")


def numbered_targets(structures: int, lesions: int = 0) -> tuple[TargetSpec, ...]:
    """`structure_1`..`structure_N` (blobs of prototypes 0..N-1: each looks the same in every task) and
    `lesion_1`..`lesion_M` inside the first structure: the targets `segbook data synth` makes from two counts."""
    targets = [TargetSpec(f"structure_{i + 1}", prototype=i) for i in range(structures)]
    within = targets[0].name if targets else None
    return (*targets, *(TargetSpec(f"lesion_{i + 1}", kind="lesion", within=within) for i in range(lesions)))


@dataclass(frozen=True)
class SynthDataset:
    """Where `write_synthetic_dataset` put a dataset; `images`/`labels` are set for the plain layout."""

    path: Path
    layout: str
    spec: SynthSpec
    case_ids: list[str]
    images: Path | None = None
    labels: Path | None = None
    channel_tokens: list[str] = field(default_factory=list)

    def import_arguments(self) -> list[str]:
        """The `segbook data import` arguments that name this dataset: `--from` a task folder, or the plain
        folders with their file pattern."""
        if self.images is None:
            return ["--from", str(self.path)]
        arguments = ["--images", str(self.images), "--labels", str(self.labels)]
        if self.channel_tokens:
            arguments += ["--image-pattern", "{case}_{channel}.nii.gz", "--channel-tokens", *self.channel_tokens]
        return arguments


@dataclass(frozen=True)
class SynthTask:
    """A synthetic dataset with the registry file that registers it (what `segbook data synth` writes)."""

    dataset: SynthDataset
    entry: dict
    registry: Path

    @property
    def key(self) -> str:
        return self.entry["key"]

    def import_command(self) -> str:
        """The shell command that imports the dataset as this registry entry."""
        return shlex.join(["segbook", "data", "import", "--registry", str(self.registry), "--task", self.key,
                           *self.dataset.import_arguments()])


# ----------------------------------------------------------------------------------------------------------------
# Drawing one case


@dataclass(frozen=True)
class _Appearance:
    """What a prototype looks like: identical in every task that uses the prototype."""

    center: np.ndarray  # normalised body coordinates (x, y, z) in [-1, 1]
    radii: np.ndarray
    angles: np.ndarray
    ct_hu: float
    mri_levels: np.ndarray  # one intensity per channel slot
    wobble: np.ndarray  # amplitudes and phases of the low-frequency surface deformation
    bend: np.ndarray
    pet_uptake: float  # standardised uptake value (SUV) of the structure


def _appearance(prototype: int) -> _Appearance:
    rng = np.random.default_rng([_PROTOTYPE_SALT, prototype])
    return _Appearance(
        center=rng.uniform(-0.45, 0.45, 3),
        radii=rng.uniform(0.2, 0.38, 3),
        angles=rng.uniform(-np.pi, np.pi, 3),
        ct_hu=float(rng.choice([rng.uniform(60, 220), rng.uniform(350, 900)], p=[0.8, 0.2])),
        mri_levels=rng.uniform(150, 900, 8),
        wobble=rng.uniform(0, 2 * np.pi, 6),
        bend=rng.uniform(-0.3, 0.3, 4),
        pet_uptake=float(rng.uniform(1.5, 8.0)),  # drawn last: the earlier draws stay what they were
    )


def _rotation(angles: np.ndarray) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _body_coordinates(size: Sequence[int]) -> np.ndarray:
    """Normalised coordinates (3, z, y, x): the body ellipsoid is the unit ball."""
    axes = [(np.arange(n) - (n - 1) / 2) / (half * n) for n, half in zip(size, _BODY_HALF_EXTENT)]
    x, y, z = axes
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    return np.stack([xx, yy, zz])


def _local(coords: np.ndarray, center: np.ndarray, angles: np.ndarray) -> np.ndarray:
    rotation = _rotation(angles)
    shifted = coords - center[:, None, None, None]
    return np.einsum("ij,j...->i...", rotation.T, shifted)


def _blob(coords: np.ndarray, look: _Appearance, center: np.ndarray, scale: float, angles: np.ndarray) -> np.ndarray:
    u = _local(coords, center, angles) / (look.radii * scale)[:, None, None, None]
    r = np.sqrt((u ** 2).sum(0))
    phase = look.wobble
    wobble = 0.12 * (np.sin(3 * u[0] + phase[0]) * np.cos(2 * u[1] + phase[1]) + np.sin(2.5 * u[2] + phase[2]))
    return r < 1.0 + wobble


def _tube(coords: np.ndarray, look: _Appearance, center: np.ndarray, scale: float, angles: np.ndarray) -> np.ndarray:
    u = _local(coords, center, angles)
    t = u[2]
    cx = look.bend[0] * np.sin(3 * t + look.wobble[0]) + look.bend[1] * t
    cy = look.bend[2] * np.cos(2 * t + look.wobble[1]) + look.bend[3] * t
    radius = 0.1 * scale * (1.0 + 0.2 * np.sin(4 * t + look.wobble[2]))
    return (np.hypot(u[0] - cx, u[1] - cy) < radius) & (np.abs(t) < 0.8 * scale)


def _sphere(coords: np.ndarray, center: np.ndarray, radius: float) -> np.ndarray:
    return ((coords - center[:, None, None, None]) ** 2).sum(0) < radius ** 2


def _lesion_centers(rng: np.random.Generator, coords: np.ndarray, host: np.ndarray, n: int) -> list[np.ndarray]:
    candidates = np.argwhere(host)
    if len(candidates) == 0:
        candidates = np.argwhere((coords ** 2).sum(0) < 0.6)
    picks = rng.choice(len(candidates), size=n, replace=len(candidates) < n)
    return [coords[(slice(None), *candidates[p])] for p in picks]


def _label_map(spec: SynthSpec, rng: np.random.Generator, coords: np.ndarray, min_radius: float) -> np.ndarray:
    labels = np.zeros(coords.shape[1:], dtype=np.uint8)
    masks: dict[str, np.ndarray] = {}
    order = sorted(range(len(spec.targets)), key=lambda i: spec.targets[i].kind == "lesion")
    for index in order:
        target = spec.targets[index]
        look = _appearance(spec.prototype_of(index))
        if target.kind == "lesion":
            mask = np.zeros_like(labels, dtype=bool)
            host = masks.get(target.within) if target.within else (coords ** 2).sum(0) < 0.6
            low, high = target.count
            for center in _lesion_centers(rng, coords, host, max(1, int(rng.integers(low, high + 1)))):
                mask |= _sphere(coords, center, max(min_radius, rng.uniform(0.07, 0.13)))
        else:
            center = look.center + rng.normal(0, 0.04, 3)
            angles = look.angles + rng.normal(0, 0.08, 3)
            scale = float(rng.uniform(0.88, 1.12))
            if target.shape == "sphere":
                mask = _sphere(coords, center, float(look.radii.mean() * scale))
            elif target.shape == "tube":
                mask = _tube(coords, look, center, scale, angles)
            else:
                mask = _blob(coords, look, center, scale, angles)
        masks[target.name] = mask
        labels[mask & ((coords ** 2).sum(0) < 1.0)] = index + 1
    return labels


def _ct_image(spec: SynthSpec, rng: np.random.Generator, coords: np.ndarray, labels: np.ndarray) -> np.ndarray:
    radius = np.sqrt((coords[:2] ** 2).sum(0))
    image = np.full(labels.shape, -1000.0)
    image[radius < 1.0] = -90.0  # subcutaneous fat
    image[radius < 0.9] = 40.0  # soft tissue
    for index in range(len(spec.targets)):
        look = _appearance(spec.prototype_of(index))
        tissue = _SHARED_CT_HU if spec.same_intensity else look.ct_hu
        level = tissue - 70.0 if spec.targets[index].kind == "lesion" else tissue
        image[labels == index + 1] = level
    image += rng.normal(0, 12.0 * spec.noise, image.shape)
    return np.clip(image, -1024, 3071).astype(np.int16)


def _mri_image(spec: SynthSpec, rng: np.random.Generator, coords: np.ndarray, labels: np.ndarray,
               channel: int) -> np.ndarray:
    radius = np.sqrt((coords[:2] ** 2).sum(0))
    image = np.where(radius < 0.95, 300.0 + 60.0 * channel, 5.0)
    for index in range(len(spec.targets)):
        look = _appearance(spec.prototype_of(index))
        if spec.same_intensity:  # lesions stay visible as darker spots
            level = _SHARED_MRI_LEVEL * (0.6 if spec.targets[index].kind == "lesion" else 1.0)
        else:
            level = look.mri_levels[channel % len(look.mri_levels)]
        image[labels == index + 1] = level
    gradient = rng.uniform(-0.15, 0.15, 3)
    bias = 1.0 + np.einsum("i,i...->...", gradient, coords) * 0.5
    image = image * bias + rng.normal(0, 15.0 * spec.noise, image.shape)
    return np.abs(image).astype(np.float32)


def _pet_image(spec: SynthSpec, rng: np.random.Generator, coords: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """PET-like uptake (SUV): none outside the body, about 1 in it, each structure its prototype's, lesions avid
    (three times their host's), with noise that grows with the uptake as counting noise does."""
    radius = np.sqrt((coords[:2] ** 2).sum(0))
    image = np.where(radius < 0.95, 1.0, 0.0)
    for index, target in enumerate(spec.targets):
        image[labels == index + 1] = _uptake(spec, index) * (3.0 if target.kind == "lesion" else 1.0)
    image = image + rng.normal(0, 0.15 * spec.noise, image.shape) * np.sqrt(image + 0.05)
    return np.clip(image, 0, None).astype(np.float32)


def _uptake(spec: SynthSpec, index: int) -> float:
    """A target's PET uptake: its prototype's, or for a lesion inside a structure that structure's."""
    host = spec.targets[index].within
    if host is not None:
        index = next(i for i, t in enumerate(spec.targets) if t.name == host)
    return _appearance(spec.prototype_of(index)).pet_uptake


def synthesize_case(spec: SynthSpec, case: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The channel arrays and the label map of one case, as (z, y, x) numpy arrays."""
    rng = np.random.default_rng([spec.seed, case])
    coords = _body_coordinates(spec.size)
    min_radius = 1.6 / (min(s * h for s, h in zip(spec.size, _BODY_HALF_EXTENT)))
    labels = _label_map(spec, rng, coords, min_radius)
    if spec.modality == "MRI":
        images = [_mri_image(spec, rng, coords, labels, c) for c in range(len(spec.channels))]
    else:
        images = [_ct_image(spec, rng, coords, labels) if name.casefold() == "ct" else
                  _pet_image(spec, rng, coords, labels) for name in spec.channels]
    return images, labels


# ----------------------------------------------------------------------------------------------------------------
# Writing


def _to_itk(array: np.ndarray, spec: SynthSpec):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spec.spacing])
    origin = spec.origin or tuple(-0.5 * n * s for n, s in zip(spec.size, spec.spacing))
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection([float(d) for d in spec.direction])
    return image


def _write(image, path: Path) -> None:
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)


def _write_4d(arrays: list[np.ndarray], spec: SynthSpec, path: Path) -> None:
    """MSD stores all channels of a case in one 4-D NIfTI (channel last in ITK order)."""
    import SimpleITK as sitk

    volumes = [_to_itk(a, spec) for a in arrays]
    _write(sitk.JoinSeries(volumes), path)


def _channel_token(name: str, index: int) -> str:
    token = re.sub(r"[^a-z0-9]+", "", name.lower())
    return token or f"ch{index}"


def _v1_json(spec: SynthSpec, train: list[str], test: list[str]) -> dict:
    return {
        "name": spec.name, "description": "segbook synthetic dataset", "tensorImageSize": "4D",
        "modality": {str(i): c for i, c in enumerate(spec.channels)},
        "labels": {str(k): v for k, v in spec.labels.items()},
        "numTraining": len(train), "numTest": len(test),
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in train],
        "test": [f"./imagesTs/{c}.nii.gz" for c in test],
    }


def _v2_json(spec: SynthSpec, train: list[str]) -> dict:
    return {
        "name": spec.name, "channel_names": {str(i): c for i, c in enumerate(spec.channels)},
        "labels": {v: k for k, v in spec.labels.items()}, "numTraining": len(train), "file_ending": ".nii.gz",
    }


def _folder_name(spec: SynthSpec, layout: str, dataset_id: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9]+", "", spec.name) or "Synthetic"
    if layout == "v2":
        return f"Dataset{dataset_id:03d}_{safe}"
    if layout == "msd":
        return f"Task{dataset_id:02d}_{safe}"
    if layout == "v1":
        return f"Task{dataset_id:03d}_{safe}"
    return safe


def write_synthetic_dataset(spec: SynthSpec, out: str | Path, layout: Layout = "v2", dataset_id: int = 990,
                            held_out: int = 0, held_out_labels: bool = True) -> SynthDataset:
    """Write `spec` under `out` in a source layout and say where it went.

    v1/v2/msd write a task folder (`TaskNNN_Name`, `DatasetNNN_Name`, `TaskNN_Name`) with `imagesTr`/`labelsTr`;
    the last `held_out` cases go to `imagesTs` (with `labelsTs` when `held_out_labels`). MSD stores multi-channel
    cases as one 4-D file. "plain" writes `images/` (`{case}.nii.gz`, or `{case}_{channel}.nii.gz` with the channel
    name lower-cased when there are several) and `labels/{case}.nii.gz`.
    """
    if layout not in LAYOUTS:
        raise SynthError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    root = Path(out) / _folder_name(spec, layout, dataset_id)
    ids = spec.case_ids
    split_at = len(ids) - held_out
    tokens = [_channel_token(c, i) for i, c in enumerate(spec.channels)]
    for index, case_id in enumerate(ids):
        images, labels = synthesize_case(spec, index)
        test = index >= split_at
        image_dir = root / ("images" if layout == "plain" else "imagesTs" if test else "imagesTr")
        label_dir = root / ("labels" if layout == "plain" else "labelsTs" if test else "labelsTr")
        if layout == "msd" and len(images) > 1:
            _write_4d(images, spec, image_dir / f"{case_id}.nii.gz")
        elif layout == "msd" or (layout == "plain" and len(images) == 1):
            _write(_to_itk(images[0], spec), image_dir / f"{case_id}.nii.gz")
        else:
            for channel, array in enumerate(images):
                suffix = tokens[channel] if layout == "plain" else f"{channel:04d}"
                _write(_to_itk(array, spec), image_dir / f"{case_id}_{suffix}.nii.gz")
        if not test or held_out_labels:
            _write(_to_itk(labels, spec), label_dir / f"{case_id}.nii.gz")
    train, test_ids = ids[:split_at], ids[split_at:]
    if layout in ("v1", "msd"):
        (root / "dataset.json").write_text(json.dumps(_v1_json(spec, train, test_ids), indent=2))
    elif layout == "v2":
        (root / "dataset.json").write_text(json.dumps(_v2_json(spec, train), indent=2))
    plain = layout == "plain"
    return SynthDataset(path=root, layout=layout, spec=spec, case_ids=ids,
                        images=root / "images" if plain else None, labels=root / "labels" if plain else None,
                        channel_tokens=tokens if plain and len(tokens) > 1 else [])


def write_synthetic_task(spec: SynthSpec, out: str | Path, layout: Layout = "v2",
                         dataset_id: int = 990) -> SynthTask:
    """Write `spec` under `out` in a source layout and `out/registry.yaml` registering it (one fifth of the cases
    held out as SegBook's test split), ready for `SynthTask.import_command()`."""
    dataset = write_synthetic_dataset(spec, out, layout=layout, dataset_id=dataset_id)
    entry = registry_entry(spec, dataset_id)
    return SynthTask(dataset, entry, write_registry_file(Path(out) / "registry.yaml", entry))


def registry_entry(spec: SynthSpec, dataset_id: int = 990, key: str | None = None,
                   test_cases: int | None = None) -> dict:
    """A user-registry entry (the schema of docs/registry.md) describing `spec`, for `--registry FILE`."""
    test = test_cases if test_cases is not None else max(1, round(spec.cases * 0.2))
    labels = [{"index": 0, "name": "background", "kind": "background"}]
    for index, target in enumerate(spec.targets, start=1):
        label = {"index": index, "name": target.name, "kind": target.kind}
        if target.kind == "structure":
            label.update(seen=bool(target.totalseg_classes), totalseg_classes=list(target.totalseg_classes))
        labels.append(label)
    kinds = {t.kind for t in spec.targets}
    structures = [t for t in spec.targets if t.kind == "structure"]
    if kinds == {"lesion"}:
        target = "Lesion"
    elif kinds == {"structure", "lesion"}:
        target = "Structure&Lesion"
    else:
        target = "Seen Structure" if all(t.totalseg_classes for t in structures) else "Unseen Structure"
    safe = re.sub(r"[^A-Za-z0-9]+", "", spec.name) or "Synthetic"
    return {
        "key": key or f"Task{dataset_id:03d}_{safe}", "name": spec.name, "dataset_id": dataset_id,
        "modality": spec.modality, "channels": list(spec.channels), "target": target, "cases": spec.cases,
        "train_cases": spec.cases - test, "test_cases": test, "region": "Other", "bone": False,
        "vessel": any(t.shape == "tube" for t in spec.targets), "citation": "synthetic (segbook data synth)",
        "notes": [f"synthetic: seed {spec.seed}, size {list(spec.size)}, spacing {list(spec.spacing)}"],
        "labels": labels,
    }


def write_registry_file(path: str | Path, *entries: dict) -> Path:
    """Write entries as a user registry YAML file."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"datasets": list(entries)}, sort_keys=False), encoding="utf-8")
    return path
