"""What a run records of a user's backbone (`run.json`'s `backbone`), and how its runs find that backbone again.

A built-in backbone needs no record. A user's comes from a Python file (`--backbone-file`) or an installed package's
entry point, which a later shell may not name: so its runs record at training start what tables need of it (name,
family, title, planner, default recipes, checkpoint formats, table order, colour) and where it came from: the file's
absolute path and SHA-256, or the entry point's name, object, distribution and version.

`adopt` makes a recorded backbone known again. It runs only the very file a run recorded, and only while its content
is the recorded one. A file gone or changed, an entry point no longer installed or of another version, or a caller
that runs no code (an imported bundle) gets a stand-in built from the description: tables show its runs, nothing
can build it, so a changed file never silently rebuilds another network. `require` is evaluation's strict form:
anything but the recorded backbone is an error. A record is untrusted input: a malformed one is a `RecordError`
naming what is wrong, never a crash.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from segbook import backbones
from segbook.backbones import FORMAT_READERS, MODEL_NAME, PLANNERS, STAND_IN, STUDY_RECIPES, Backbone, BackboneError
from stunet.checkpoints import file_sha256

#: The key of the record in `run.json` (and of the records a bundle carries, by model name, in `bundle.json`).
KEY = "backbone"
FILE, ENTRY_POINT = "file", "entry point"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COLOUR = re.compile(r"^(#[0-9a-fA-F]{6})?$")
_TEXTS = ("name", "family", "title", "label", "classifier", "colour")
_ENTRY_POINT_TEXTS = ("name", "value", "distribution", "version")
_MAX_TEXT = 300


class RecordError(BackboneError):
    """A run's backbone record that is not one segbook writes (ignored: its runs are not shown)."""


def record_of(model: str) -> dict[str, Any] | None:
    """What a run of `model` records of its backbone; None for a built-in one, which segbook itself knows."""
    backbone = backbones.get(model)
    source = _source(backbone)
    if source is None:
        return None
    return {"name": backbone.name, "family": backbone.family, "title": backbone.title, "label": backbone.label,
            "planner": backbone.planner, "default_recipes": dict(backbone.default_recipes),
            "checkpoint_formats": list(backbone.checkpoint_formats), "classifier": backbone.classifier,
            "table_order": backbone.table_order, "colour": backbone.colour, "source": source}


def _source(backbone: Backbone) -> dict[str, str] | None:
    origin = backbones._registry.entry_points.get(backbone.name)
    if origin is not None:
        return {"kind": ENTRY_POINT, **origin}
    if backbone.source in backbones._registry.loaded_files:
        return {"kind": FILE, "path": backbone.source, "sha256": file_sha256(backbone.source)}
    return None


def adopt(record: Any, run_code: bool = True) -> str | None:
    """Make the recorded backbone known: as registered already, from the recorded file (`run_code`), else as a
    stand-in. Returns why it is not the recorded backbone (file gone or changed, entry point missing or of another
    version), None when it is or when no code was to run; `RecordError` for a malformed record."""
    stand_in, source = _checked(record)
    problem = _found(stand_in.name, source, run_code)
    if not backbones.is_known(stand_in.name):
        backbones._add([stand_in], "a run's backbone record")
    return problem


def require(record: Any) -> None:
    """The recorded backbone itself, or `BackboneError` saying what changed: evaluation builds the network, which
    must be the one the run trained."""
    problem = adopt(record, run_code=True)
    if problem is None and backbones.get(record["name"]).source.startswith(STAND_IN):
        problem = f"backbone {record['name']} is known only from its runs' records"
    if problem:
        raise BackboneError(f"{problem}; the network is rebuilt only from the backbone its run recorded: restore "
                            "that file (or install that version), or train the run again")


def _found(name: str, source: dict[str, Any], run_code: bool) -> str | None:
    if backbones.is_known(name) and not backbones.get(name).source.startswith(STAND_IN):
        return _differs(name, source)
    if not run_code:
        return None
    if source["kind"] == ENTRY_POINT:
        return (f"backbone {name} came from entry point {source['value']} of {source['distribution']} "
                f"{source['version']}, which is not installed")
    return _load_file(name, source)


def _load_file(name: str, source: dict[str, Any]) -> str | None:
    """Run the recorded file, only while it is the recorded content."""
    if source["path"] is None:
        return f"backbone {name}'s record names no file (an imported run)"
    path = Path(source["path"])
    if not path.is_file():
        return f"backbone {name}'s file {path} is gone"
    digest = file_sha256(path)
    if digest != source["sha256"]:
        return (f"backbone {name}'s file {path} changed since the run recorded it (SHA-256 {digest}, recorded "
                f"{source['sha256']})")
    try:
        backbones.load_backbone_file(path)
    except BackboneError as error:
        return str(error)
    return None if backbones.is_known(name) else f"backbone file {path} no longer defines {name}"


def _differs(name: str, source: dict[str, Any]) -> str | None:
    """Why the registered backbone `name` is not the recorded one; None when it is."""
    current = _source(backbones.get(name))
    recorded = source.get("path") or source.get("value")
    if current is None or current["kind"] != source["kind"]:
        return f"backbone {name} is now {backbones.get(name).source}, not the recorded {source['kind']} {recorded}"
    if source["kind"] == FILE and current["sha256"] != source["sha256"]:
        return (f"backbone {name} is loaded from {current['path']}, whose SHA-256 {current['sha256']} differs from "
                f"the recorded {source['sha256']} ({recorded})")
    if source["kind"] == ENTRY_POINT and (current["distribution"], current["version"]) != (
            source["distribution"], source["version"]):
        return (f"backbone {name} comes from {current['distribution']} {current['version']}, not the recorded "
                f"{source['distribution']} {source['version']}")
    return None


def _checked(record: Any) -> tuple[Backbone, dict[str, Any]]:
    """The stand-in a record describes and its source, or `RecordError` naming the first problem."""
    if not isinstance(record, dict):
        raise RecordError(f"a backbone record is a JSON object, got {type(record).__name__}")
    for key in _TEXTS:
        _text(record.get(key), key)
    if not _COLOUR.fullmatch(record["colour"]) or not MODEL_NAME.fullmatch(record["name"]):
        raise RecordError(f"name {record['name']!r} or colour {record['colour']!r} is not valid")
    if record.get("planner") not in PLANNERS:
        raise RecordError(f"planner {record.get('planner')!r} is not one of {', '.join(PLANNERS)}")
    recipes, formats, order = record.get("default_recipes"), record.get("checkpoint_formats"), record.get("table_order")
    if not isinstance(recipes, dict) or set(recipes) != set(STUDY_RECIPES):
        raise RecordError(f"default_recipes {recipes!r}: one recipe for each of {', '.join(STUDY_RECIPES)}")
    if not isinstance(formats, list) or not all(isinstance(f, str) and f in FORMAT_READERS for f in formats):
        raise RecordError(f"checkpoint_formats {formats!r}: a list of {', '.join(FORMAT_READERS)}")
    if isinstance(order, bool) or not isinstance(order, int) or abs(order) > 10**6:
        raise RecordError(f"table_order {order!r} is not an integer")
    source = _checked_source(record.get("source"))
    origin = f"{source['kind']} {source.get('path') or source.get('value')}"
    try:
        stand_in = Backbone(
            name=record["name"], family=record["family"], title=record["title"], label=record["label"],
            build=_unbuildable, planner=record["planner"],
            default_recipes=tuple((i, _text(recipes[i], f"default_recipes.{i}")) for i in STUDY_RECIPES),
            checkpoint_formats=tuple(formats), classifier=record["classifier"], table_order=order,
            colour=record["colour"], source=f"{STAND_IN} ({origin})")
    except BackboneError as error:
        raise RecordError(str(error)) from None
    return stand_in, source


def _checked_source(source: Any) -> dict[str, Any]:
    if not isinstance(source, dict) or source.get("kind") not in (FILE, ENTRY_POINT):
        raise RecordError(f"source {source!r}: an object of kind {FILE!r} or {ENTRY_POINT!r}")
    if source["kind"] == ENTRY_POINT:
        for key in _ENTRY_POINT_TEXTS:
            _text(source.get(key), f"source.{key}")
        return source
    path, digest = source.get("path"), source.get("sha256")
    if path is not None and not (isinstance(path, str) and len(path) < 4096 and Path(path).is_absolute()):
        raise RecordError(f"source.path {path!r}: an absolute path (or null in an imported run)")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise RecordError(f"source.sha256 {digest!r} is not a SHA-256")
    return source


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str) or len(value) > _MAX_TEXT:
        raise RecordError(f"{key} {str(value)[:40]!r}: a string of at most {_MAX_TEXT} characters")
    return value


def _unbuildable(model: str, *args: Any, **kwargs: Any) -> None:
    raise BackboneError(f"backbone {model} is known only from its runs' records (its file is gone or changed, or "
                        "its runs were imported): name its file with --backbone-file to build it")
