"""Which registered datasets can validate which: structures shared by name, channels, modality shift.

External validation scores a run trained on dataset A on another dataset B, on the structures both label. What the
two share is derived from the registry whenever it is asked, never stored: structure labels match by the registry's
label names (compared without case, spaces, `_` and `-`: "Left kidney" is "left_kidney"), and a user's label map
(`--label-map FILE`) adds synonyms and merges:

    structures:
      Kidney: [Left kidney, Right kidney]   # B's left and right kidney count as A's Kidney
      Liver: [Liver, Hepar]                 # a synonym

Each key names one scored structure; its list holds labels of A and of B (the key itself counts when it is a label
name). The labels of one side merge: the reference is the union of B's, the prediction the union of A's. A label
named nowhere in the map is matched by name, structures only (lesion labels of two datasets rarely mean the same).
Torch-free: `segbook tasks pairs` asks it, as do external evaluation and the external table.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from segbook.errors import SegbookError
from segbook.yamlfile import YamlFileError, read_yaml

if TYPE_CHECKING:
    from segbook.registry import DatasetEntry, Label, Registry

MAX_LABEL_MAP_BYTES = 1 << 20


class LabelMapError(SegbookError):
    """A label map that cannot be used: unreadable, naming unknown labels, mapping a label twice, ambiguous."""


class IncompatibleError(SegbookError):
    """Two datasets one cannot validate the other on: no shared structure, or different input channels."""


class ChannelMapError(SegbookError):
    """A channel map that cannot feed the run: the wrong count, a channel the tested dataset lacks, one twice."""


def fold(name: str) -> str:
    """A label name compared without case, spaces, `_` and `-`."""
    return re.sub(r"[\s_-]+", "", name.casefold())


@dataclass(frozen=True)
class SharedStructure:
    """One structure scored externally: the labels of the trained dataset (A) and of the tested one (B) it is."""

    name: str
    trained: tuple[int, ...]
    tested: tuple[int, ...]
    #: "name" (same label name in both) or "label map"
    matched_by: str = "name"

    @property
    def label(self) -> int:
        """The label id it is scored under: A's (the lowest, where the map merges several of A's labels)."""
        return min(self.trained)

    def record(self, trained: "DatasetEntry", tested: "DatasetEntry") -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "matched_by": self.matched_by,
                "trained_labels": {str(i): trained.labels[i].name for i in self.trained},
                "tested_labels": {str(i): tested.labels[i].name for i in self.tested}}


@dataclass(frozen=True)
class LabelMap:
    """A user's label map as read: structure name -> the label names that count as it; the file's SHA-256."""

    groups: dict[str, tuple[str, ...]]
    path: str = ""
    sha256: str = ""

    def record(self) -> dict[str, Any] | None:
        return {"path": self.path, "sha256": self.sha256, "structures": {k: list(v) for k, v in self.groups.items()}}


@dataclass(frozen=True)
class Pairing:
    """What validating a run trained on `trained` on `tested` would score, and what changes between them."""

    trained: "DatasetEntry"
    tested: "DatasetEntry"
    structures: tuple[SharedStructure, ...]
    label_map: LabelMap | None = None
    problems: tuple[str, ...] = field(default=())
    #: The tested dataset's channel indices fed to the run as the trained one's channels, in their order (None:
    #: channel for channel, as `channel_problems` allows)
    channel_map: tuple[int, ...] | None = None

    @property
    def shift(self) -> str:
        return modality_shift(self.trained.modality, self.tested.modality)

    @property
    def usable(self) -> bool:
        return bool(self.structures) and not self.problems

    def require_usable(self) -> None:
        """Refuse, naming why, a pairing nothing can be scored on."""
        problems = list(self.problems)
        if not self.structures:
            problems.append(f"{self.trained.key} and {self.tested.key} share no structure (by the registry's label "
                            f"names: {_names(self.trained)} vs {_names(self.tested)}); a --label-map FILE can "
                            "name synonyms")
        if problems:
            raise IncompatibleError(f"cannot validate a run on {self.trained.key} on {self.tested.key}: "
                                    + "; ".join(problems))

    def scoring_entry(self) -> "DatasetEntry":
        return scoring_entry(self.trained, [(s.label, s.name, self.trained.labels[s.label].kind)
                                            for s in self.structures])

    @property
    def remap(self) -> tuple[tuple[int, tuple[int, ...], tuple[int, ...]], ...]:
        """Per scored label: the tested dataset's labels (the reference) and the trained one's (the prediction)."""
        return tuple((s.label, s.tested, s.trained) for s in self.structures)

    def record(self) -> dict[str, Any]:
        """What an external evaluation records of the pairing."""
        return {"trained_on": self.trained.key, "tested_on": self.tested.key,
                "modality": {"trained": self.trained.modality, "tested": self.tested.modality},
                "shift": self.shift, "channels": {"trained": list(self.trained.channels),
                                                  "tested": list(self.tested.channels)},
                "structures": [s.record(self.trained, self.tested) for s in self.structures],
                "label_map": self.label_map.record() if self.label_map else None,
                **({"channel_map": self.channel_map_record()} if self.channel_map is not None else {})}

    def channel_map_record(self) -> list[dict[str, Any]]:
        """Per channel the run reads (A's, in order): the tested dataset's channel fed to it, by index and name."""
        return [{"trained": name, "tested_index": index, "tested": self.tested.channels[index]}
                for name, index in zip(self.trained.channels, self.channel_map or ())]


def scoring_entry(trained: "DatasetEntry", scored: Sequence[tuple[int, str, str]]) -> "DatasetEntry":
    """`trained` as external scores see it: background and the scored (label id, structure name, kind) only, so
    that evaluation's summaries and `segbook.evaluation.files`' checks work on external scores unchanged. The ids
    need not run 0, 1, 2, ... (a copy, not a registry entry)."""
    from segbook.registry import Label

    labels = [trained.labels[0], *(Label.model_construct(index=index, name=name, kind=kind, seen=None,
                                                         totalseg_classes=[]) for index, name, kind in scored)]
    return trained.model_copy(update={"labels": labels})


def modality_shift(trained: str, tested: str) -> str:
    """"same modality", or "CT -> MRI": the grouping of the external table."""
    return "same modality" if trained == tested else f"{trained} -> {tested}"


def channel_problems(trained: "DatasetEntry", tested: "DatasetEntry") -> list[str]:
    """A run reads its dataset's channels in order: the tested dataset must have as many, and, beyond one, the same
    (a single channel of another modality is the modality shift external validation asks about)."""
    if len(trained.channels) != len(tested.channels):
        return [f"their input channels differ: {trained.key} has {len(trained.channels)} "
                f"({', '.join(trained.channels)}), {tested.key} {len(tested.channels)} ({', '.join(tested.channels)})"]
    if len(trained.channels) > 1 and [fold(c) for c in trained.channels] != [fold(c) for c in tested.channels]:
        return [f"their input channels differ: {trained.key} reads {', '.join(trained.channels)}, {tested.key} has "
                f"{', '.join(tested.channels)}"]
    return []


def channel_map(trained: "DatasetEntry", tested: "DatasetEntry", channels: Sequence[str]) -> tuple[int, ...]:
    """The tested dataset's channels, named by the registry's channel names (compared as label names are) or by
    0-based index, that the run reads as the trained dataset's channels in their order: one per trained channel,
    each a channel of `tested`, none twice."""
    where = f"--channels {' '.join(channels)}"
    if len(channels) != len(trained.channels):
        raise ChannelMapError(f"{where}: {trained.key} reads {len(trained.channels)} channel(s) "
                              f"({', '.join(trained.channels)}); name one of {tested.key}'s for each, in that order")
    by_name = {fold(name): index for index, name in enumerate(tested.channels)}
    indices = []
    for name in channels:
        index = by_name.get(fold(name))
        if index is None and name.strip().isdigit() and int(name) < len(tested.channels):
            index = int(name)
        if index is None:
            raise ChannelMapError(f"{where}: {tested.key} has no channel {name!r} (its channels: "
                                  + ", ".join(f"{i}: {n}" for i, n in enumerate(tested.channels)) + ")")
        if index in indices:
            raise ChannelMapError(f"{where}: channel {index} ({tested.channels[index]}) of {tested.key} is named "
                                  "twice; each of the run's channels needs its own")
        indices.append(index)
    return tuple(indices)


def read_label_map(path: str | Path) -> LabelMap:
    """A label map file, checked for form (its names are checked against two datasets by `pair`)."""
    path = Path(path).expanduser()
    try:
        if path.stat().st_size > MAX_LABEL_MAP_BYTES:
            raise LabelMapError(f"label map {path}: larger than {MAX_LABEL_MAP_BYTES // 1024} KiB")
        data = read_yaml(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as error:
        raise LabelMapError(f"cannot read label map {path}: {error.strerror or error}") from None
    except YamlFileError as error:
        raise LabelMapError(str(error)) from None
    groups = data.get("structures") if isinstance(data, dict) and set(data) == {"structures"} else None
    if not isinstance(groups, dict) or not groups:
        raise LabelMapError(f"label map {path}: a mapping with one key, 'structures', holding structure names each "
                            "with the list of label names that count as it (see docs/results.md)")
    checked: dict[str, tuple[str, ...]] = {}
    for name, labels in groups.items():
        if not isinstance(name, str) or not name.strip():
            raise LabelMapError(f"label map {path}: structure name {name!r} is not a name")
        if isinstance(labels, str):
            labels = [labels]
        if not isinstance(labels, list) or not labels or not all(isinstance(n, str) and n.strip() for n in labels):
            raise LabelMapError(f"label map {path}: structure {name!r} needs a list of label names")
        if fold(name) in {fold(other) for other in checked}:
            raise LabelMapError(f"label map {path}: structure {name!r} is given twice (names are compared without "
                                "case, spaces, '_' and '-'), which leaves the map ambiguous")
        checked[name.strip()] = tuple(n.strip() for n in labels)
    return LabelMap(checked, str(path), digest)


def pair(trained: "DatasetEntry", tested: "DatasetEntry", label_map: LabelMap | None = None,
         channels: Sequence[str] | None = None) -> Pairing:
    """The structures a run on `trained` is scored on in `tested`, and the problems that forbid it.

    A label map naming a label neither dataset has, one label twice, or a structure with labels on one side only is
    refused (LabelMapError); so is a name matching several labels of one dataset. `channels` (see `channel_map`)
    says which of `tested`'s channels the run reads; given, the channels may differ (ChannelMapError if it does
    not fit).
    """
    mapped = channel_map(trained, tested, channels) if channels is not None else None
    claimed: dict[tuple[str, int], str] = {}
    structures = [_mapped(name, labels, trained, tested, claimed, label_map)
                  for name, labels in (label_map.groups.items() if label_map else ())]
    by_name = {fold(label.name): label for label in tested.foreground_labels
               if label.kind == "structure" and ("tested", label.index) not in claimed}
    for label in trained.foreground_labels:
        match = by_name.get(fold(label.name))
        if label.kind == "structure" and ("trained", label.index) not in claimed and match is not None:
            structures.append(SharedStructure(label.name, (label.index,), (match.index,)))
    structures.sort(key=lambda s: s.label)
    problems = channel_problems(trained, tested) if mapped is None else []
    return Pairing(trained, tested, tuple(structures), label_map, tuple(problems), mapped)


def _mapped(name: str, labels: Sequence[str], trained: "DatasetEntry", tested: "DatasetEntry",
            claimed: dict[tuple[str, int], str], label_map: LabelMap) -> SharedStructure:
    where = f"label map {label_map.path}: structure {name!r}"
    listed = [(label, True) for label in labels]
    names = listed if fold(name) in {fold(n) for n in labels} else [(name, False), *listed]
    sides: dict[str, set[int]] = {"trained": set(), "tested": set()}
    for label_name, must_exist in names:
        found = [(side, label) for side, entry in (("trained", trained), ("tested", tested))
                 for label in _named(entry, label_name, where)]
        if not found and must_exist:
            raise LabelMapError(f"{where}: no label {label_name!r} in {trained.key} ({_names(trained)}) or "
                                f"{tested.key} ({_names(tested)})")
        for side, label in found:
            owner = claimed.get((side, label.index))
            if owner is not None and owner != name:
                raise LabelMapError(f"{where}: label {label.name!r} of "
                                    f"{(trained if side == 'trained' else tested).key} is mapped twice (also to "
                                    f"structure {owner!r})")
            claimed[(side, label.index)] = name
            sides[side].add(label.index)
    missing = [entry.key for side, entry in (("trained", trained), ("tested", tested)) if not sides[side]]
    if missing:
        raise LabelMapError(f"{where} names no label of {' or '.join(missing)}, which leaves it ambiguous: each "
                            "structure needs at least one label of each dataset")
    kinds = {trained.labels[i].kind for i in sides["trained"]} | {tested.labels[i].kind for i in sides["tested"]}
    if len(kinds) > 1:
        raise LabelMapError(f"{where} mixes {' and '.join(sorted(kinds))} labels, which leaves it ambiguous")
    return SharedStructure(name, tuple(sorted(sides["trained"])), tuple(sorted(sides["tested"])), "label map")


def _named(entry: "DatasetEntry", name: str, where: str) -> list["Label"]:
    found = [label for label in entry.foreground_labels if fold(label.name) == fold(name)]
    if len(found) > 1:
        raise LabelMapError(f"{where}: {name!r} matches {len(found)} labels of {entry.key} "
                            f"({', '.join(label.name for label in found)}), which leaves it ambiguous")
    return found


def _names(entry: "DatasetEntry") -> str:
    return ", ".join(label.name for label in entry.foreground_labels) or "none"


def validation_pairs(registry: "Registry", structure: str | None = None) -> list[Pairing]:
    """Every ordered pair of registered datasets that share a structure by name (with `structure`: those sharing
    that one, with all they share), the datasets whose channels differ included with their problem."""
    entries = list(registry)
    wanted = fold(structure) if structure else None
    if wanted is not None and not any(fold(label.name) == wanted for entry in entries
                                      for label in entry.foreground_labels if label.kind == "structure"):
        raise SegbookError(f"no registered dataset has a structure named {structure!r}")
    pairs = []
    for trained in entries:
        for tested in entries:
            if trained.key == tested.key:
                continue
            pairing = pair(trained, tested)
            if pairing.structures and (wanted is None or any(fold(s.name) == wanted for s in pairing.structures)):
                pairs.append(pairing)
    return pairs
