"""Cheap checks of a job's data before any model loads: every source exists, every row parses, every
field the format and template need is there with the right type."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from data_pipeline.errors import DataError
from data_pipeline.sources import iter_chunks, parse_example, resolve_files
from schema.atomic import write_json_atomic
from schema.data import NAMED_TEMPLATES, PLACEHOLDER, DataConfig, SourceConfig
from schema.outputs import cache_root


def validate_data(data: DataConfig) -> None:
    """Raises DataError at the first source with a problem (see validate_source)."""
    for source in [*data.train, *([data.eval] if data.eval else [])]:
        validate_source(source, data.template)


def validate_source(source: SourceConfig, template: str) -> int:
    """The number of rows of `source`. Raises DataError naming file, line or row, field and the fields
    that exist. A source that passed once (same files, sizes, mtimes and settings) is not scanned again."""
    marker = _validated_marker(source, template)
    if marker is not None and marker.is_file():
        return int(json.loads(marker.read_text())["rows"])
    template = source.template or template
    needed = PLACEHOLDER.findall(NAMED_TEMPLATES.get(template, template))
    seen = 0
    for chunk in iter_chunks(source):
        for row, place in zip(chunk.rows, chunk.places):
            example = parse_example(source, row, chunk.file, place)
            missing = [name for name in needed if name not in example.values]
            if missing:
                raise DataError(
                    f"{chunk.file}: {place}: the template {template!r} names {{{missing[0]}}}, which the row lacks; "
                    f"the row has fields {sorted(row)}. Fix the template or map the field with fields:"
                )
            seen += 1
    if not seen:
        raise DataError(f"{source.path}: the source holds no rows")
    if marker is not None:
        write_json_atomic(marker, {"source": source.path, "rows": seen})
    return seen


def _validated_marker(source: SourceConfig, template: str) -> Path | None:
    if source.path.startswith("hf:"):
        return None
    files = resolve_files(source)
    stamp = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    payload = json.dumps([stamp, source.model_dump(mode="json"), template], sort_keys=True)
    return cache_root() / "data" / "validated" / hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()
