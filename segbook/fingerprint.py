"""A run's comparability fingerprint: every recorded setting that changes what its score measures.

Tables average runs into one cell, and compare two cells in a Delta, only where these agree (docs/results.md,
"Which runs go into one cell"). Three parts, each a dict of readable values with a digest of it:

- training, what defines a configuration across datasets: the resolved recipe (rates, head multiplier, weight decay,
  budget in epochs x iterations, optimiser, phases, frozen parts, LoRA; its description and source aside), the
  effective precision, and for pretrained runs the checkpoint's SHA-256 and, on tasks with several input channels,
  how the checkpoint's stem was tiled; and the plans identifier;
- data, what legitimately differs between datasets but must agree within one: the plans' patch size, batch size,
  spacing, normalisation and strides (`plans_summary`);
- evaluation, how the run was scored (`summary.json`): its settings (checkpoint, sliding-window step, Gaussian
  weighting, mirroring, NSD tolerance, the Dice of two empty masks) and the labels it scored (a registry entry that
  gained a label since changes what a run's mean over labels means).

The trainer records the training and data digests in `run.json` when training starts (`record`), with a digest of
each record they are computed from (`RECORDS`: the settings, the resolved recipe, ...). Results recompute the parts
from the recorded settings for every run, so runs recorded before the fingerprint existed are read the same way
(their recipe as `RunManifest.recipe` resolves it); a record whose digest differs from the one taken when training
started was edited since (`recorded_mismatch`). That check is on the records as written, not on the parts, so a
later segbook that reads more of a recipe (a new field, with its default) does not take every older run for an
edited one. A setting a record lacks reads `UNKNOWN`: equal to another `UNKNOWN`, never to a known value.
Torch-free: the results read thousands of these.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

from segbook.errors import SegbookError

#: Bumped whenever what a part covers changes: a digest recorded under another version is recomputed, not checked.
VERSION = 1
#: The `run.json` key the trainer records the digests under.
KEY = "fingerprint"
UNKNOWN = "unknown"
#: What a digest is shortened to in tables and frames.
SHORT = 12
#: Training settings in the order variant labels name them (the rest of the recipe follows, by name).
TRAINING_ORDER = ("trained", "budget", "lr", "head_multiplier", "weight_decay", "precision", "weights", "stem_tiling",
                  "plans")
#: Training settings two configurations compared in a Delta must share (where both have them: scratch runs have no
#: checkpoint); their learning rates, head multiplier and recipe may differ, that being what is compared.
SHARED = ("trained", "budget", "precision", "plans", "weights", "stem_tiling")
#: The records of `run.json` the parts are computed from, digested one by one when training starts (the run record
#: by its initialisation and plans; the settings without where the checkpoint lies, which a bundle's export strips).
RECORDS = ("run", "settings", "recipe", "precision", "device", "plans_summary")
#: What a run without the key has: `trained` is set only for runs counted before they trained their whole budget.
DEFAULTS = {"trained": "whole budget"}
DATA_KEYS = ("patch_size", "batch_size", "spacing", "normalization", "plans_strides")
#: The recipe's fields that are not settings: its words, and the configuration axes (name, init) themselves.
_NOT_SETTINGS = ("description", "source", "name", "init")
_RENAMED = {"optimizer.lr": "lr", "optimizer.weight_decay": "weight_decay", "groups.head_multiplier": "head_multiplier"}
_RECIPE_KEYS = ("budget", "lr", "head_multiplier", "weight_decay")


@lru_cache(maxsize=1)
def evaluation_keys() -> tuple[str, ...]:
    """The evaluation settings `segbook evaluate` records (`EvaluationSettings`' fields)."""
    from segbook.evaluation.settings import EvaluationSettings

    return tuple(f.name for f in fields(EvaluationSettings))


def digest(values: Mapping[str, Any]) -> str:
    """SHA-256 of the values as canonical JSON."""
    text = json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def effective_precision(setting: Any, device: Any, bf16_supported: bool | None = None) -> str:
    """What a run computed in: nnU-Net autocasts on CUDA only (`auto`: bf16 where the GPU supports it, else fp16);
    on the CPU segbook autocasts `bf16` alone, the rest is fp32; MPS trains in fp32. `auto` on CUDA without knowing
    the GPU (a record made before the effective precision was) reads `auto on cuda`."""
    kind = device.split(":")[0] if isinstance(device, str) else None
    if setting not in ("auto", "bf16", "fp16") or kind not in ("cuda", "cpu", "mps"):
        return UNKNOWN
    if kind == "cuda":
        if setting != "auto":
            return setting
        return "auto on cuda" if bf16_supported is None else ("bf16" if bf16_supported else "fp16")
    return "bf16" if kind == "cpu" and setting == "bf16" else "fp32"


def training_values(run: Mapping[str, Any], channels: int | None = None) -> dict[str, Any]:
    """The training part of a `run.json` (a dict as read: untrusted, any field may be missing or of a wrong type).
    `channels`: the task's input channels, where the record does not say (`plans_summary.input_channels`)."""
    record = _dict(run.get("run"))
    settings = run.get("settings")
    values = {**_recipe_values(run), "precision": _precision(run)}
    if record.get("init") == "pretrained":
        settings = _dict(settings)
        values["weights"] = settings.get("weights_sha256") or UNKNOWN
        recorded = _dict(run.get("plans_summary")).get("input_channels")
        channels = recorded if isinstance(recorded, int) else channels
        if channels is None or channels > 1:
            values["stem_tiling"] = _stem_tiling(settings)
    values["plans"] = record.get("plans") if isinstance(record.get("plans"), str) else UNKNOWN
    return values


def data_values(run: Mapping[str, Any]) -> dict[str, Any]:
    """The data part of a `run.json`: what the plans made of the dataset."""
    summary = _dict(run.get("plans_summary"))
    return {key: summary.get(key, UNKNOWN) for key in DATA_KEYS}


def evaluation_values(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The evaluation part of a `summary.json`: its settings and the labels it scored."""
    settings = _dict(summary.get("settings"))
    labels = sorted(summary["labels"], key=str) if isinstance(summary.get("labels"), dict) else UNKNOWN
    return {**{key: settings.get(key, UNKNOWN) for key in evaluation_keys()}, "labels": labels}


@dataclass(frozen=True)
class Reading:
    """What a `run.json` gives: its training and data parts with their digests, and the digest of each of RECORDS."""

    training: dict[str, Any]
    training_digest: str
    data: dict[str, Any]
    data_digest: str
    records: dict[str, str]


def read(run: Mapping[str, Any], channels: int | None = None) -> Reading:
    """The parts of a `run.json` (see `training_values` for `channels`). Everything they depend on is in RECORDS, so
    they are computed once per distinct records (a store's thousands of runs share a few hundred: one per
    configuration and dataset), and the objects are shared."""
    from segbook.training.settings import LOCATION_ONLY

    records = {**{name: run.get(name) for name in RECORDS},
               "run": {key: _dict(run.get("run")).get(key) for key in ("init", "plans")},
               "settings": ({k: v for k, v in run["settings"].items() if k not in LOCATION_ONLY}
                            if isinstance(run.get("settings"), dict) else run.get("settings"))}
    return _read(json.dumps(records, separators=(",", ":"), default=str), channels)  # a key only: digests sort


@lru_cache(maxsize=4096)
def _read(text: str, channels: int | None) -> Reading:
    records = json.loads(text)
    training, data = training_values(records, channels), data_values(records)
    return Reading(training, digest(training), data, digest(data),
                   {name: digest({"v": records[name]}) for name in RECORDS})


def record(run: Mapping[str, Any]) -> dict[str, Any]:
    """What the trainer writes under `run.json[KEY]` once the settings, device, precision and plans are recorded:
    the training and data digests, and the digest of each of RECORDS."""
    reading = read(run)
    return {"version": VERSION, "training": reading.training_digest, "data": reading.data_digest,
            "records": reading.records}


def recorded_mismatch(run: Mapping[str, Any], reading: Reading) -> str | None:
    """The records of `run.json` (RECORDS) edited since training started: their digest (`reading`: of `run`) is not
    the one recorded then; None when none was, or the run recorded no digests (made before the fingerprint
    existed)."""
    recorded = _dict(_dict(run.get(KEY)).get("records"))
    if not recorded:
        return None
    return " and ".join(name for name in RECORDS if recorded.get(name) != reading.records[name]) or None


def describe(key: str, value: Any) -> str:
    """A setting as labels and notes name it: `12x3 it`, `lr 0.001`, `ckpt 78812568`, `patch 20x32x32`."""
    name = {"head_multiplier": "heads", "weight_decay": "wd", "weights": "ckpt", "stem_tiling": "stem",
            "patch_size": "patch", "batch_size": "batch", "normalization": "norm", "plans_strides": "strides",
            "nsd_tolerance_mm": "nsd tolerance"}.get(key, key.rsplit(".", 1)[-1])
    if value == UNKNOWN:
        return f"{name} {UNKNOWN}"
    if key in ("trained", "precision", "source"):
        return str(value)
    if key == "budget":
        return f"{value} it"
    if key == "head_multiplier":
        return f"heads x{value:g}" if isinstance(value, (int, float)) else f"heads x{value}"
    if key == "weights":
        return f"ckpt {str(value)[:8]}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{name} {value:g}"
    if isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
        return f"{name} {'x'.join(f'{v:g}' for v in value)}"
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return f"{name} {text if len(text) <= 40 else text[:37] + '...'}"


def ordered_keys(profiles: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every key of these settings, TRAINING_ORDER first, then by name."""
    keys = {key for profile in profiles for key in profile}
    return [*(k for k in TRAINING_ORDER if k in keys), *sorted(keys - set(TRAINING_ORDER))]


def distinct_labels(profiles: Mapping[Any, Mapping[str, Any]]) -> dict[Any, str]:
    """A label per profile naming only settings in which they differ, as few as tell them all apart (in
    TRAINING_ORDER): `{a: "2x1 it", b: "12x3 it"}`."""
    differing = [key for key in ordered_keys(profiles.values())
                 if len({digest({"v": _value(p, key)}) for p in profiles.values()}) > 1]
    labels = {name: "" for name in profiles}
    for chosen in range(1, len(differing) + 1):
        labels = {name: ", ".join(describe(k, _value(p, k)) for k in differing[:chosen])
                  for name, p in profiles.items()}
        if len(set(labels.values())) == len(profiles):
            break
    return labels


def differences(mine: Mapping[str, Any], theirs: Mapping[str, Any], keys: Iterable[str] | None = None) -> list[str]:
    """`mine vs theirs` for each of `keys` (default: all) in which the two differ; a key one of them lacks (a
    scratch run's checkpoint) is not compared, unless it has a default (DEFAULTS)."""
    keys = ordered_keys([mine, theirs]) if keys is None else keys
    return [f"{describe(key, _value(mine, key))} vs {describe(key, _value(theirs, key))}" for key in keys
            if (key in DEFAULTS or (key in mine and key in theirs))
            and digest({"v": _value(mine, key)}) != digest({"v": _value(theirs, key)})]


def _value(profile: Mapping[str, Any], key: str) -> Any:
    return profile.get(key, DEFAULTS.get(key, "n/a"))


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _recipe_values(run: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved recipe, flat (`optimizer.momentum`, `phases`, ...; lr, head multiplier, weight decay and
    `budget`, epochs x iterations, by their short names); every key UNKNOWN for a record without settings."""
    if not isinstance(run.get("settings"), dict) and not isinstance(run.get("recipe"), dict):
        return dict.fromkeys(_RECIPE_KEYS, UNKNOWN)
    key = json.dumps({k: run[k] for k in ("settings", "recipe") if run.get(k) is not None}, sort_keys=True,
                     default=str)
    init = _dict(run.get("run")).get("init")
    return dict(_resolved_recipe(key, init if isinstance(init, str) else "scratch"))


@lru_cache(maxsize=256)
def _resolved_recipe(key: str, init: str) -> tuple[tuple[str, Any], ...]:
    """Cached on the recorded settings and recipe: a store's thousands of runs share a few."""
    from segbook.training.manifest import RunManifest

    try:
        recipe = RunManifest(Path(), {**json.loads(key), "run": {"init": init}}).recipe
    except (SegbookError, ValueError, TypeError, AttributeError, KeyError):
        return tuple(dict.fromkeys(_RECIPE_KEYS, UNKNOWN).items())
    flat = _flatten({k: v for k, v in recipe.model_dump(mode="json").items() if k not in _NOT_SETTINGS})
    budget = f"{flat.pop('budget.epochs')}x{flat.pop('budget.iterations_per_epoch')}"
    values = {"budget": budget, **{_RENAMED.get(k, k): v for k, v in flat.items()}}
    return tuple(values.items())


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _precision(run: Mapping[str, Any]) -> str:
    """The effective precision the trainer recorded, else what the recorded setting and device give."""
    recorded = run.get("precision")
    if isinstance(recorded, str) and recorded:
        return recorded
    return effective_precision(_dict(run.get("settings")).get("mixed_precision"), run.get("device"))


def _stem_tiling(settings: dict[str, Any]) -> str:
    from segbook.training.settings import FORMAT_RULE, TrainingSettings

    if not settings:
        return UNKNOWN
    try:
        return str(TrainingSettings.from_dict(settings).stem_tiling or FORMAT_RULE)
    except TypeError:
        return UNKNOWN
