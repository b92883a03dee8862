"""Cheap checks of a job's data before any model loads: every source exists, every row parses, every
field the format and template need is there with the right type."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from data_pipeline.errors import DataError
from data_pipeline.sources import iter_chunks, parse_example, resolve_files
from data_pipeline.splits import source_splitter
from schema.atomic import write_json_atomic
from schema.data import NAMED_TEMPLATES, PLACEHOLDER, DataConfig, SourceConfig
from schema.outputs import cache_root


def validate_data(data: DataConfig) -> None:
    """Raises DataError at the first source with a problem (see validate_source)."""
    for source in [*data.train, *([data.eval] if data.eval else [])]:
        validate_source(source, data.template, data.max_bad_frac)


def validate_source(source: SourceConfig, template: str, max_bad_frac: float = 1.0) -> int:
    """The number of rows of `source`. Raises DataError naming file, line or row, field and the fields
    that exist; and when more than `max_bad_frac` of the rows (of its split) have an empty response,
    which tokenising would drop and then refuse, after the job has started. A source that passed once
    (same files, sizes, mtimes and settings) is not scanned again."""
    marker = _validated_marker(source, template, max_bad_frac)
    if marker is not None and marker.is_file():
        return int(json.loads(marker.read_text())["rows"])
    template = source.template or template
    needed = PLACEHOLDER.findall(NAMED_TEMPLATES.get(template, template))
    splitter = source_splitter(source) if source.split is not None else None
    seen, considered, empty = 0, 0, []
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
            if splitter is None or splitter.split_of(example.values) == source.split:
                considered += 1
                # A chat row's labels include the template's closing markup, so only other formats can be empty.
                if source.format != "chat" and not example.response.strip():
                    empty.append(f"{chunk.file}: {place}")
    if not seen:
        raise DataError(f"{source.path}: the source holds no rows; add rows, or remove the source")
    if considered and len(empty) / considered > max_bad_frac:
        raise DataError(
            f"{source.path}: {len(empty)} of {considered} rows ({len(empty) / considered:.0%}) have an empty response, more than "
            f"data.max_bad_frac={max_bad_frac} (for example {'; '.join(empty[:2])}); fill them in, remove them, or raise data.max_bad_frac"
        )
    if marker is not None:
        write_json_atomic(marker, {"source": source.path, "rows": seen})
    return seen


def _validated_marker(source: SourceConfig, template: str, max_bad_frac: float) -> Path | None:
    if source.path.startswith("hf:"):
        return None
    files = resolve_files(source)
    stamp = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    payload = json.dumps([stamp, source.model_dump(mode="json"), template, max_bad_frac], sort_keys=True)
    return cache_root() / "data" / "validated" / hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()
