"""Reading a source's rows in bounded chunks, and turning each row into prompt and response parts.

Rows are read a chunk at a time (never the whole file), and every row keeps where it came from
(file and line, or file and row) so that a bad row is reported by location, before training.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schema.data import FORMAT_FIELDS, OPTIONAL_FIELDS, SourceConfig
from data_pipeline.errors import DataError

FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv")
CHUNK_ROWS = 4096


@dataclass
class RowChunk:
    """Up to CHUNK_ROWS rows of one file, with each row's index in the source and its place in the file."""

    file: str
    rows: list[dict[str, Any]]
    source_rows: list[int]  # 0-based index of the row across the whole source (all files, in order)
    places: list[str]  # "line 12" for JSON lines, "row 12" for tables


@dataclass
class Example:
    """One row as the pipeline sees it: the prompt text (or chat messages) and the response text."""

    prompt: str
    response: str
    messages: list[dict[str, str]] | None
    values: dict[str, Any]  # the row's columns plus the role names, for {placeholders} in templates


def is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def resolve_files(source: SourceConfig) -> list[Path]:
    """The data files of a source, in a stable order; a HF dataset directory is returned as itself."""
    if source.path.startswith("hf:"):
        return []
    path = Path(source.path).expanduser()
    if any(ch in source.path for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{source.path}: the glob matches no files; check the pattern and the working directory ({Path.cwd()})")
    elif is_hf_dataset_dir(path):
        return [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
        if not files:
            raise DataError(f"{source.path}: the directory holds no {', '.join(FILE_SUFFIXES)} files and is not a HF dataset directory")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{source.path}: no such file or directory (relative paths start at {Path.cwd()}); correct the path")
    unknown = [f for f in files if f.suffix not in FILE_SUFFIXES]
    if unknown:
        raise DataError(f"{unknown[0]}: unsupported file type '{unknown[0].suffix}'; use one of {', '.join(FILE_SUFFIXES)}")
    return files


def source_fingerprint(source: SourceConfig) -> str:
    """A hash of the source's bytes (every file, in order); for a hub dataset, of its name and split."""
    digest = hashlib.blake2b(digest_size=16)
    if source.path.startswith("hf:"):
        digest.update(f"{source.path}:{source.hf_split}".encode())
        return digest.hexdigest()
    for file in resolve_files(source):
        members = sorted(p for p in file.rglob("*") if p.is_file()) if file.is_dir() else [file]
        for member in members:
            digest.update(str(member.relative_to(file) if file.is_dir() else member.name).encode())
            with open(member, "rb") as handle:
                while block := handle.read(1 << 20):
                    digest.update(block)
    return digest.hexdigest()


def iter_chunks(source: SourceConfig, chunk_rows: int = CHUNK_ROWS) -> Iterator[RowChunk]:
    """The source's rows, chunk by chunk, in file order. Raises DataError at the first unreadable row."""
    if source.path.startswith("hf:"):
        yield from _hub_chunks(source, chunk_rows)
        return
    next_row = 0
    for file in resolve_files(source):
        _refuse_misnamed_parquet(file)
        if is_hf_dataset_dir(file):
            reader = _hf_dir_chunks(file, source.hf_split, chunk_rows)
        elif file.suffix in (".jsonl", ".ndjson"):
            reader = _jsonl_chunks(file, chunk_rows)
        elif file.suffix == ".json":
            reader = _json_chunks(file, chunk_rows)
        elif file.suffix == ".parquet":
            reader = _parquet_chunks(file, chunk_rows)
        else:
            reader = _csv_chunks(file, chunk_rows)
        for rows, places in reader:
            yield RowChunk(str(file), rows, list(range(next_row, next_row + len(rows))), places)
            next_row += len(rows)


PARQUET_MAGIC = b"PAR1"


def _refuse_misnamed_parquet(file: Path) -> None:
    if file.suffix != ".parquet" and file.is_file():
        with open(file, "rb") as handle:
            if handle.read(len(PARQUET_MAGIC)) == PARQUET_MAGIC:
                raise DataError(f"{file}: is a Parquet file (it starts with PAR1) named {file.suffix}; rename it to {file.stem}.parquet")


class _RepeatedKey(ValueError):
    """A JSON object that writes one key twice (json keeps the last silently)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise _RepeatedKey(key)
    return dict(pairs)


def _load_json(text: str) -> Any:
    """json.loads, refusing an object that writes a key twice (raises _RepeatedKey)."""
    return json.loads(text, object_pairs_hook=_unique_keys)


def _jsonl_chunks(file: Path, chunk_rows: int) -> Iterator[tuple[list[dict], list[str]]]:
    rows: list[dict] = []
    places: list[str] = []
    with open(file, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = decode_line(raw[3:] if number == 1 and raw.startswith(BOM) else raw, file, number)
            if not line.strip():
                continue
            try:
                row = _load_json(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{file}:{number}: line {number} is not valid JSON ({err.msg} at column {err.colno}); fix or delete that line"
                ) from None
            except _RepeatedKey as err:
                raise DataError(f"{file}:{number}: line {number} writes the key '{err}' twice; JSON would keep only the last; remove one of them") from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{file}:{number}: line {number} is a JSON {type(row).__name__}, not an object with fields; write one {{\"field\": ...}} object per line"
                )
            rows.append(row)
            places.append(f"line {number}")
            if len(rows) == chunk_rows:
                yield rows, places
                rows, places = [], []
    if rows:
        yield rows, places


BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark, as some editors write it; pandas and datasets skip it too


def decode_line(raw: bytes, file: Path, number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        hint = " (it looks like a Parquet file; name it .parquet)" if raw.startswith(b"PAR1") or b"PAR1" in raw[:8] else ""
        raise DataError(
            f"{file}:{number}: line {number} is not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}){hint}; "
            "save the file as UTF-8"
        ) from None


def _json_chunks(file: Path, chunk_rows: int) -> Iterator[tuple[list[dict], list[str]]]:
    # A JSON array cannot be streamed with the standard library; use JSONL for large sources.
    try:
        data = _load_json(decode_line(file.read_bytes().removeprefix(BOM), file, 1))
    except json.JSONDecodeError as err:
        raise DataError(f"{file}:{err.lineno}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); fix the JSON there") from None
    except _RepeatedKey as err:
        raise DataError(f"{file}: an object writes the key '{err}' twice; JSON would keep only the last; remove one of them") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{file}: a .json source must hold a list of objects (or {{\"data\": [...]}}), got a {type(data).__name__}")
    for start in range(0, len(data), chunk_rows):
        rows = data[start : start + chunk_rows]
        for offset, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(f"{file}: row {start + offset + 1} is a JSON {type(row).__name__}, not an object with fields; make every row a {{\"field\": ...}} object")
        yield rows, [f"row {start + i + 1}" for i in range(len(rows))]


def _parquet_chunks(file: Path, chunk_rows: int) -> Iterator[tuple[list[dict], list[str]]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except Exception as err:
        raise DataError(f"{file}: not a readable Parquet file ({err}); write it again, or point at another file") from None
    seen = 0
    batches = parquet.iter_batches(batch_size=chunk_rows)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as err:  # corrupt pages surface only when read
            raise DataError(f"{file}: rows after row {seen} cannot be read ({type(err).__name__}: {err}); the Parquet file is damaged") from None
        rows = batch.to_pylist()
        yield rows, [f"row {seen + i + 1}" for i in range(len(rows))]
        seen += len(rows)


def _csv_chunks(file: Path, chunk_rows: int) -> Iterator[tuple[list[dict], list[str]]]:
    # The csv module keeps every cell a string ("42" stays text), which is what the formats expect.
    # strict: a quote left open or text after a closing quote is an error, not a row that swallows the rest.
    with open(file, "rb") as handle:
        reader = csv.reader(_csv_lines(handle, file), strict=True)
        rows: list[dict] = []
        places: list[str] = []
        try:
            header = next(reader, [])
            if repeated := sorted({name for name in header if header.count(name) > 1}):
                raise DataError(f"{file}:1: the header names {repeated} more than once; a row could keep only one of them; rename the columns")
            for cells in reader:
                if not cells:  # a blank line
                    continue
                if len(cells) != len(header):
                    raise DataError(
                        f"{file}:{reader.line_num}: row has {len(cells)} cells but the header has {len(header)} {header}; "
                        "quote cells that hold commas, or complete the row"
                    )
                rows.append(dict(zip(header, cells)))
                places.append(f"line {reader.line_num}")
                if len(rows) == chunk_rows:
                    yield rows, places
                    rows, places = [], []
        except csv.Error as err:
            raise DataError(f"{file}:{reader.line_num}: not valid CSV ({err}); close the quote, or quote the whole cell") from None
        if rows:
            yield rows, places


def _csv_lines(handle, file: Path) -> Iterator[str]:
    # Decoded line by line, so that a bad byte is reported on its own line.
    for number, raw in enumerate(handle, start=1):
        yield decode_line(raw[len(BOM) :] if number == 1 and raw.startswith(BOM) else raw, file, number)


def _hf_dir_chunks(path: Path, split: str, chunk_rows: int) -> Iterator[tuple[list[dict], list[str]]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # a broken state.json or missing Arrow files: one clear message
        raise DataError(
            f"{path}: looks like a Hugging Face dataset directory but cannot be loaded ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            "save it again with save_to_disk, or point at its data files"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: the dataset has splits {sorted(loaded)}, not '{split}'; set hf_split")
        loaded = loaded[split]
    yield from _dataset_chunks(loaded, chunk_rows)


def _hub_chunks(source: SourceConfig, chunk_rows: int) -> Iterator[RowChunk]:
    import datasets

    name, _, config = source.path[3:].partition(":")
    if not name:
        raise DataError(f"{source.path}: names no dataset; write hf:<name>[:<config>], e.g. hf:openai/gsm8k:main")
    try:
        loaded = datasets.load_dataset(name, config or None, split=source.hf_split)
    except Exception as err:  # offline, unknown name, missing split: one clear message
        raise DataError(
            f"{source.path}: datasets.load_dataset('{name}', split='{source.hf_split}') failed "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); offline, save it with save_to_disk and give that directory"
        ) from None
    next_row = 0
    for rows, places in _dataset_chunks(loaded, chunk_rows):
        yield RowChunk(source.path, rows, list(range(next_row, next_row + len(rows))), places)
        next_row += len(rows)


def _dataset_chunks(dataset, chunk_rows: int) -> Iterator[tuple[list[dict], list[str]]]:
    # The dataset's Arrow table is memory-mapped; only one chunk becomes Python objects at a time.
    for start in range(0, len(dataset), chunk_rows):
        rows = dataset[start : start + chunk_rows]
        count = len(next(iter(rows.values()))) if rows else 0
        yield [{k: v[i] for k, v in rows.items()} for i in range(count)], [f"row {start + i + 1}" for i in range(count)]


def parse_example(source: SourceConfig, row: dict[str, Any], file: str, place: str) -> Example:
    """The prompt and response of one row, checked: every required field is there and has the right type."""
    roles = FORMAT_FIELDS[source.format]

    def field(role: str) -> Any:
        column = source.column(role)
        if column not in row or row[column] is None:
            if (source.format, role) in OPTIONAL_FIELDS:
                return ""
            raise DataError(
                f"{file}: {place}: field '{column}' is missing (format {source.format} reads it as '{role}'); "
                f"the row has fields {sorted(row)}. Map it with fields: {{{role}: <column>}} or fix the row"
            )
        value = row[column]
        expected = list if role == "messages" else str
        if not isinstance(value, expected):
            raise DataError(
                f"{file}: {place}: field '{column}' is a {type(value).__name__} ({_short(value)}), expected a "
                f"{'list of {role, content} messages' if expected is list else 'string'}; the row has fields {sorted(row)}"
            )
        return value

    values = {role: field(role) for role in roles}
    messages = None
    if source.format in ("prompt_completion", "fields"):
        prompt, response = values["prompt"], values["completion"]
    elif source.format == "alpaca":
        prompt = values["instruction"] + (f"\n\n{values['input']}" if values["input"] else "")
        response = values["output"]
    elif source.format == "question_answer":
        prompt, response = values["question"], values["answer"]
    elif source.format == "text":
        prompt, response = "", values["text"]
    else:
        messages = _checked_messages(values["messages"], file, place, source.column("messages"))
        prompt = next((m["content"] for m in messages if m["role"] == "user"), "")
        response = messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else ""
    merged = {**row, **values, "prompt": prompt, "response": response}
    return Example(prompt=prompt, response=response, messages=messages, values=merged)


def _checked_messages(messages: list, file: str, place: str, column: str) -> list[dict[str, str]]:
    for index, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)):
            raise DataError(
                f"{file}: {place}: {column}[{index}] = {_short(message)} is not a {{role: str, content: str}} message"
            )
    return messages


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
