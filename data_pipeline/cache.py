"""The Arrow token cache: each source is tokenised once into an Arrow IPC file, then memory-mapped.

Layout: `$LORAFLEET_CACHE/data/<key>/{tokens.arrow, meta.json}`. The key hashes the source bytes, the
tokenizer, the template, seq_len and every setting that changes the tokens. The directory is
written atomically (schema.atomic), so a crash mid-write leaves no half cache.
Reading maps the file: token ids stay in the page cache, never in Python lists.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import multiprocessing
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from data_pipeline.encoding import EncodeCounts, EncodedChunk, Encoder, tokenizer_fingerprint
from data_pipeline.errors import DataError
from data_pipeline.sources import iter_chunks, source_fingerprint
from data_pipeline.splits import source_splitter
from schema.atomic import atomic_directory
from schema.data import SourceConfig
from schema.outputs import cache_root

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("lorafleet.data")
CACHE_FORMAT = 2  # bump when the layout or the tokenisation rules change


def cache_schema(vocab_size: int) -> pa.Schema:
    """Token ids as uint16 when the vocabulary allows (SmolLM2: 49,152), else int32: 3 bytes per token
    with the label mask instead of 5, so the cache and the pages it keeps warm are 40% smaller."""
    id_type = pa.uint16() if vocab_size <= 1 << 16 else pa.int32()
    return pa.schema([("source_row", pa.int64()), ("input_ids", pa.list_(id_type)), ("label_mask", pa.list_(pa.int8()))])


def data_cache_root() -> Path:
    return cache_root() / "data"


def cache_key(source: SourceConfig, tokenizer: PreTrainedTokenizerBase, template: str, seq_len: int, overlong: str) -> str:
    parts = {
        "format": CACHE_FORMAT,
        "bytes": source_fingerprint(source),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": source.template or template,
        "seq_len": seq_len,
        "overlong": overlong,
        "source": source.model_dump(mode="json", include={"format", "fields", "hf_split", "split", "split_fractions", "split_key"}),
    }
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()


class TokenCache:
    """A tokenised source, memory-mapped: example i is (input_ids, label_mask) as numpy views."""

    def __init__(self, directory: Path, hit: bool):
        self.directory = directory
        self.hit = hit
        self.meta = json.loads((directory / "meta.json").read_text())
        self._map = pa.memory_map(str(directory / "tokens.arrow"), "r")
        reader = pa.ipc.open_file(self._map)
        self._ids: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._offsets: list[np.ndarray] = []
        rows: list[np.ndarray] = []
        for index in range(reader.num_record_batches):
            batch = reader.get_batch(index)
            ids_column, mask_column = batch.column("input_ids"), batch.column("label_mask")
            self._offsets.append(ids_column.offsets.to_numpy())
            self._ids.append(ids_column.values.to_numpy(zero_copy_only=True))
            self._masks.append(mask_column.values.to_numpy(zero_copy_only=True))
            rows.append(batch.column("source_row").to_numpy())
        self.source_rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        self.lengths = np.concatenate([np.diff(o) for o in self._offsets]).astype(np.int32) if rows else np.zeros(0, np.int32)
        self._batch_starts = np.cumsum([0] + [len(o) - 1 for o in self._offsets])

    def __len__(self) -> int:
        return len(self.lengths)

    def example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        batch = int(np.searchsorted(self._batch_starts, index, side="right")) - 1
        local = index - int(self._batch_starts[batch])
        offsets = self._offsets[batch]
        start, end = int(offsets[local]), int(offsets[local + 1])
        return self._ids[batch][start:end], self._masks[batch][start:end]

    @property
    def counts(self) -> dict[str, int]:
        return self.meta["counts"]


def open_token_cache(
    source: SourceConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    template: str,
    seq_len: int,
    overlong: str,
    max_bad_frac: float,
    num_proc: int = 1,
) -> TokenCache:
    """The source's token cache, built first if it is not there. Raises DataError on bad rows, or when more
    than max_bad_frac of the rows were dropped or truncated."""
    key = cache_key(source, tokenizer, template, seq_len, overlong)
    directory = data_cache_root() / key
    hit = (directory / "meta.json").is_file()
    if not hit:
        directory.parent.mkdir(parents=True, exist_ok=True)
        # Data-parallel ranks open the same sources at once: one tokenises, the others wait and reuse.
        with open(directory.parent / f".lock-{key}", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            hit = (directory / "meta.json").is_file()
            if not hit:
                _build(source, tokenizer, template, seq_len, overlong, num_proc, directory)
    if hit:
        log.info("data cache hit: %s -> %s (reused, not re-tokenised)", source.path, directory)
    cache = TokenCache(directory, hit=hit)
    _check_bad_fraction(source, cache.meta["counts"], cache.meta["bad_examples"], max_bad_frac, seq_len, overlong)
    if len(cache) == 0:
        raise DataError(f"{source.path}: no usable examples after tokenisation ({cache.meta['counts']}); check format and split")
    return cache


def _check_bad_fraction(source: SourceConfig, counts: dict, examples: dict, max_bad_frac: float, seq_len: int, overlong: str) -> None:
    considered = counts["rows"] - counts["split_out"]
    affected = counts["dropped_empty"] + counts["dropped_overlong"] + counts["truncated"]
    if affected:
        log.warning(
            "%s: %d empty responses dropped, %d overlong (> %d tokens) dropped, %d truncated, of %d rows",
            source.path, counts["dropped_empty"], counts["dropped_overlong"], seq_len, counts["truncated"], considered,
        )
    if considered and affected / considered > max_bad_frac:
        where = "; ".join(examples["empty"][:2] + examples["overlong"][:2])
        raise DataError(
            f"{source.path}: {affected} of {considered} rows ({affected / considered:.1%}) are empty or longer than seq_len={seq_len} "
            f"({counts['dropped_empty']} empty dropped, {counts['dropped_overlong']} overlong dropped, {counts['truncated']} truncated), "
            f"more than data.max_bad_frac={max_bad_frac}. For example: {where}. Clean the data, raise train.seq_len, "
            f"set data.overlong ({overlong} now), or raise data.max_bad_frac"
        )


def _build(source: SourceConfig, tokenizer, template: str, seq_len: int, overlong: str, num_proc: int, directory: Path) -> None:
    splitter = source_splitter(source) if source.split is not None else None
    encoder = Encoder(source, tokenizer, source.template or template, seq_len, overlong, splitter)
    started = time.perf_counter()
    totals = EncodeCounts()

    def fill(staging: Path) -> None:
        schema = cache_schema(len(tokenizer))
        with pa.OSFile(str(staging / "tokens.arrow"), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for encoded in _encoded_chunks(encoder, source, num_proc):
                totals.add(encoded.counts)
                writer.write_batch(_record_batch(encoded, schema))
        meta = {
            "source": source.path,
            "counts": {k: v for k, v in asdict(totals).items() if k != "examples"},
            "bad_examples": totals.examples,
            "seq_len": seq_len,
            "tokenize_s": round(time.perf_counter() - started, 3),
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=1))

    atomic_directory(directory, fill, replace=False)
    log.info(
        "data cache built: %s -> %s (%d rows, %d examples, %d tokens in %.1f s)",
        source.path, directory, totals.rows, totals.kept, totals.tokens, time.perf_counter() - started,
    )


def _record_batch(encoded: EncodedChunk, schema: pa.Schema) -> pa.RecordBatch:
    offsets = pa.array(encoded.offsets, type=pa.int32())
    id_type = schema.field("input_ids").type.value_type
    return pa.record_batch(
        [
            pa.array(encoded.source_rows, type=pa.int64()),
            pa.ListArray.from_arrays(offsets, pa.array(encoded.input_ids.astype(id_type.to_pandas_dtype()), type=id_type)),
            pa.ListArray.from_arrays(offsets, pa.array(encoded.label_mask, type=pa.int8())),
        ],
        schema=schema,
    )


_worker_encoder: Encoder | None = None


def _init_worker(encoder: Encoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder


def _encode_in_worker(chunk) -> EncodedChunk:
    assert _worker_encoder is not None
    return _worker_encoder.encode(chunk)


def _encoded_chunks(encoder: Encoder, source: SourceConfig, num_proc: int) -> Iterator[EncodedChunk]:
    """Encoded chunks in source order. With num_proc > 1, worker processes tokenise while this one reads;
    at most 2 chunks per worker are in flight, so memory stays bounded whatever the source size."""
    if num_proc <= 1:
        for chunk in iter_chunks(source):
            yield encoder.encode(chunk)
        return
    context = multiprocessing.get_context("fork")
    with context.Pool(num_proc, initializer=_init_worker, initargs=(encoder,)) as pool:
        pending: deque = deque()
        for chunk in iter_chunks(source):
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

