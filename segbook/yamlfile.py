"""Reading hand-written YAML strictly: a repeated mapping key is an error, not a silent loss.

PyYAML keeps the last of repeated keys without a word, so two registry files pasted together (`datasets:` twice)
would quietly drop every entry of the first. Every YAML file segbook reads goes through `read_yaml`, which names the
file and the lines of the problem instead.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from segbook.errors import SegbookError

#: libyaml's parser when PyYAML was built with it (several times faster on the built-in registry); its nodes carry
#: line numbers just like the pure-Python parser's.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlFileError(SegbookError):
    """A YAML file that does not say one unambiguous thing: a syntax error or a repeated key, with file and line."""


class _UniqueKeyLoader(_SafeLoader):
    """The safe loader, recording the repeated keys of every mapping (which it would otherwise overwrite)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.repeated: list[str] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        # Looked at before the base class flattens `<<: *anchor` merges: a key overriding a merged one is intended.
        marks: dict[Any, list[yaml.Mark]] = defaultdict(list)
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                marks[self.construct_object(key_node)].append(key_node.start_mark)
        self.repeated += [_describe_repeat(key, found) for key, found in marks.items() if len(found) > 1]
        return super().construct_mapping(node, deep)


def _describe_repeat(key: Any, marks: list[yaml.Mark]) -> str:
    """`key 'a' appears twice (lines 1 and 40)`; with columns where lines alone do not tell the places apart."""
    lines = [str(mark.line + 1) for mark in marks]
    if len(set(lines)) == len(lines):
        where = "lines " + _and(lines)
    else:
        where = "at " + _and([f"line {mark.line + 1} column {mark.column + 1}" for mark in marks])
    times = "twice" if len(marks) == 2 else f"{len(marks)} times"
    return f"key {key!r} appears {times} ({where})"


def _and(items: list[str]) -> str:
    return ", ".join(items[:-1]) + f" and {items[-1]}"


def _describe_syntax(error: yaml.YAMLError) -> str:
    """Where and what, without PyYAML's `in "<unicode string>"` (the caller names the file)."""
    mark = getattr(error, "problem_mark", None)
    if mark is None:  # a character YAML does not allow: PyYAML gives its position in the text
        return " ".join(str(error).replace('in "<unicode string>",', "at").split())
    text = f"line {mark.line + 1}, column {mark.column + 1}: {error.problem}"
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and context_mark is not None:
        text += f" ({context} started on line {context_mark.line + 1})"
    return text


def read_yaml(path: str | os.PathLike) -> Any:
    """The data of a YAML file, read with the safe loader.

    Raises YamlFileError naming the file (and lines) for text that is not UTF-8, a syntax error, or a key repeated in
    any mapping at any depth; OSError when the file cannot be read at all.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise YamlFileError(f"{path}: not UTF-8 text (byte {error.start} cannot be decoded)") from None
    loader = _UniqueKeyLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as error:
        raise YamlFileError(f"{path}: not valid YAML: {_describe_syntax(error)}") from None
    finally:
        loader.dispose()
    if loader.repeated:
        raise YamlFileError(f"{path}: " + "; ".join(loader.repeated) + "; YAML would silently keep only the last "
                            "of each, so merge them into one")
    return data
