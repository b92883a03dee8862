"""The one YAML reader: YAML 1.2 (ruamel.yaml), duplicate keys refused, every key's line kept.

Why not PyYAML: its `safe_load` is YAML 1.1, where `on:` is the boolean True, `yes` is True, `1e-3` is
a string, `010` is octal 8 and `1:30` is 90. YAML 1.2 reads all of these as a user means them, and
ruamel.yaml keeps the line of every key, so a problem points at the line to fix.
"""

from __future__ import annotations

import datetime
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schema.problems import ConfigError, Problem


@dataclass
class Locations:
    """The 1-based line of every key and list item of one YAML document, by field path."""

    file: str
    lines: dict[tuple, int] = field(default_factory=dict)

    def line(self, location: tuple) -> int | None:
        """The line of `location`, or of its deepest ancestor that the file writes."""
        location = tuple(location)
        while location:
            if location in self.lines:
                return self.lines[location]
            location = location[:-1]
        return self.lines.get((), None)

    def has(self, location: tuple) -> bool:
        return tuple(location) in self.lines


def _yaml():
    from ruamel.yaml import YAML

    reader = YAML(typ="rt", pure=True)  # rt keeps line numbers; 1.2 is its default
    reader.allow_duplicate_keys = False
    return reader


def read_yaml_text(text: str, source: str) -> tuple[Any, Locations]:
    """Plain Python data (dict, list, str, int, float, bool, None) and its line numbers."""
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    try:
        reader = _yaml()
        document = reader.load(text)
        _refuse_tags(reader, text, source)
    except MarkedYAMLError as err:
        raise ConfigError(_yaml_problem(err, source, text)) from None
    except YAMLError as err:
        raise ConfigError(Problem(f"not valid YAML: {err}", file=source, fix="correct the YAML syntax")) from None
    locations = Locations(source)
    data = _plain(document, (), locations, source)
    return data, locations


def read_yaml_file(path: str | Path, what: str = "config file") -> tuple[Any, Locations]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(Problem(f"no such {what}", file=str(path), fix="check the path (relative paths start at the working directory)"))
    if not path.is_file():
        raise ConfigError(Problem(f"is a directory, not a {what}", file=str(path), fix=f"give the path of the YAML {what}"))
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a UTF-8 byte-order mark is allowed, as editors on Windows write it
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise ConfigError(
            Problem(
                f"not UTF-8 text: byte 0x{raw[err.start]:02x} at line {line}, column {column}",
                file=str(path),
                line=line,
                fix="save the file as UTF-8",
            )
        ) from None
    return read_yaml_text(text, str(path))


def parse_yaml_value(text: str, source: str) -> Any:
    """One scalar or flow value, as on the right of `key: ` in a file (for `--set key=value`)."""
    data, _ = read_yaml_text(f"value: {text}\n" if text.strip() else "value:\n", source)
    return data["value"] if isinstance(data, dict) else None


def dump_yaml(data: Any) -> str:
    """YAML 1.2 text of plain data, in the mapping's order; reads back equal through read_yaml_text."""
    from ruamel.yaml import YAML

    writer = YAML(typ="safe", pure=True)
    writer.default_flow_style = False
    writer.sort_base_mapping_type_on_output = False
    stream = io.StringIO()
    writer.dump(data, stream)
    return stream.getvalue()


def _yaml_problem(err, source: str, text: str) -> Problem:
    from ruamel.yaml.constructor import DuplicateKeyError

    mark = err.problem_mark or err.context_mark
    line = mark.line + 1 if mark is not None else None
    if isinstance(err, DuplicateKeyError):
        key = str(err.problem).split('"')[1] if '"' in str(err.problem) else "a key"
        first = _first_line_of_key(text, key, err.context_mark.line if err.context_mark is not None else 0, err.problem_mark)
        return Problem(
            f"the key '{key}' is written twice in one mapping (lines {first} and {line}); YAML keeps only one of them",
            file=source,
            line=line,
            fix=f"remove one of the two '{key}' entries",
        )
    problem = (err.problem or "").strip()
    context = (err.context or "").strip()
    message = "not valid YAML: " + "; ".join(part for part in (context, problem) if part)
    return Problem(message, file=source, line=line, fix="correct the YAML syntax on that line")


def _first_line_of_key(text: str, key: str, mapping_line: int, duplicate: Any) -> int:
    """The 1-based line where `key` is first written in its mapping (ruamel marks the mapping's start,
    not the first occurrence): in a block mapping, the first line from the mapping's start that writes the
    key at the duplicate's column; in a flow mapping, the duplicate's own line."""
    lines = text.splitlines()
    if duplicate is None:
        return mapping_line + 1
    column = duplicate.column
    for index in range(mapping_line, duplicate.line):
        line = lines[index]
        if line[:column].strip() in ("", "-") and re.match(rf"{re.escape(key)}\s*:", line[column:]):
            return index + 1
    return duplicate.line + 1


def _refuse_tags(reader, text: str, source: str) -> None:
    """Any explicit tag (`!!int "3"`, `!!binary ...`, `!custom {...}`) is refused: a tag changes what a
    value is behind the reader's back, and no lorafleet file needs one."""
    for event in reader.parse(text):
        tag = getattr(event, "tag", None)
        if tag is not None:
            raise ConfigError(
                Problem(
                    f"YAML tags ({tag.replace('tag:yaml.org,2002:', '!!')}) are not allowed in lorafleet files",
                    file=source,
                    line=event.start_mark.line + 1,
                    fix="write the plain value without a tag",
                )
            )


def _kind_of_key(key: Any) -> str:
    if key is None:
        return "nothing"
    if isinstance(key, tuple):  # ruamel's key for `? [a, b]`
        return "a list"
    return "a mapping" if isinstance(key, Mapping) else f"a {type(key).__name__}"


def _key_line(node: Any, key: Any) -> int:
    """The 1-based line where `key` is written: in `node` itself, or in a mapping merged into it with
    `<<: *anchor` (such keys are written where the anchor is)."""
    position = (node.lc.data or {}).get(key)
    if position is not None:
        return position[0] + 1
    for merged in getattr(node, "merge", ()):
        if key in merged:
            return _key_line(merged, key)
    return node.lc.line + 1


def _plain(node: Any, path: tuple, locations: Locations, source: str) -> Any:
    """ruamel's round-trip objects as plain Python, recording each key's line on the way."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(node, CommentedMap):
        if not path:
            locations.lines[()] = node.lc.line + 1
        out = {}
        for key in node:
            if not isinstance(key, (str, int, float, bool)) or isinstance(key, (CommentedMap, CommentedSeq)):
                raise ConfigError(
                    Problem(
                        f"a key must be a plain name, not {_kind_of_key(key)}",
                        file=source,
                        line=_key_line(node, key),
                        fix="write a field name before the colon",
                    )
                )
            name = str(key) if not isinstance(key, str) else key
            locations.lines[path + (name,)] = _key_line(node, key)
            out[name] = _plain(node[key], path + (name,), locations, source)
        return out
    if isinstance(node, CommentedSeq):
        out_list = []
        for index, item in enumerate(node):
            locations.lines[path + (index,)] = node.lc.item(index)[0] + 1
            out_list.append(_plain(item, path + (index,), locations, source))
        return out_list
    if isinstance(node, bool) or node is None:
        return node
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str(node)
    if isinstance(node, (datetime.date, datetime.datetime)):
        return node.isoformat()
    return node
