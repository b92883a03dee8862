"""lorafleet data_pipeline: sources -> templates -> Arrow token cache -> sharded, mixed, packed batches.

Public API: validate_data (cheap checks before any model loads), build_train_stream (the infinite,
resumable batch stream), build_eval_batches (a finite, deterministic list), DataError, and the
content-hash split helpers split_rows, split_of_key and content_key.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

from transformers import PreTrainedTokenizerBase

from data_pipeline.cache import TokenCache, data_cache_root, open_token_cache
from data_pipeline.config import NAMED_TEMPLATES, PLACEHOLDER, DataConfig, MixConfig, SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.sources import iter_chunks, parse_example, resolve_files
from data_pipeline.splits import content_key, split_of_key, split_rows
from data_pipeline.stream import TrainStream, pack_rows

__all__ = [
    "DataConfig",
    "DataError",
    "MixConfig",
    "SourceConfig",
    "TrainStream",
    "build_eval_batches",
    "build_train_stream",
    "content_key",
    "split_of_key",
    "split_rows",
    "validate_data",
]


def validate_data(data: DataConfig) -> None:
    """Every source exists, every row parses, and every field the format and template need is there with
    the right type. Raises DataError naming file, line or row, field and the fields that exist. A source
    that passed once (same files, sizes, mtimes and settings) is not scanned again."""
    sources = list(data.train) + ([data.eval] if data.eval else [])
    for source in sources:
        marker = _validated_marker(source, data.template)
        if marker is not None and marker.is_file():
            continue
        template = source.template or data.template
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
            marker.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=marker.parent, delete=False) as handle:
                handle.write(json.dumps({"source": source.path, "rows": seen}))
            os.replace(handle.name, marker)


def _validated_marker(source: SourceConfig, template: str):
    if source.path.startswith("hf:"):
        return None
    files = resolve_files(source)
    stamp = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    payload = json.dumps([stamp, source.model_dump(mode="json"), template], sort_keys=True)
    return data_cache_root() / "validated" / hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


def _open(data: DataConfig, source: SourceConfig, tokenizer: PreTrainedTokenizerBase, seq_len: int) -> TokenCache:
    return open_token_cache(
        source,
        tokenizer,
        template=data.template,
        seq_len=seq_len,
        overlong=data.overlong,
        max_bad_frac=data.max_bad_frac,
        num_proc=data.num_proc,
    )


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def build_train_stream(
    data: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seq_len: int,
    micro_batch: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> TrainStream:
    """The infinite, resumable stream of training batches for this rank (tokenising sources into the cache
    on first use). Each batch: input_ids, labels (-100 on prompt, padding and each example's first token),
    position_ids (restarting at 0 per packed example), attention_mask (1 on real tokens; give it to the
    model in padded mode only), rehearsal_mask (True on tokens of rehearsal-role examples); all
    [micro_batch, seq_len] when packed, [micro_batch, longest rounded up to 8] when padded."""
    caches = [_open(data, source, tokenizer, seq_len) for source in data.train]
    return TrainStream(
        data, caches, seq_len=seq_len, micro_batch=micro_batch, seed=seed, pad_id=_pad_id(tokenizer), rank=rank, world_size=world_size
    )


def build_eval_batches(
    data: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seq_len: int,
    micro_batch: int,
    source: SourceConfig | None = None,
) -> list[dict]:
    """Every example of `source` (default data.eval) once, in file order, packed (or padded) as training
    is: deterministic and finite. The last batch may have fewer rows."""
    source = source or data.eval
    if source is None:
        raise DataError("no eval source: set data.eval: {path: ..., format: ...}")
    cache = _open(data, source, tokenizer, seq_len)
    rows: list[list[tuple[int, int]]] = []
    if data.packing == "packed":
        row, used = [], 0
        for index in range(len(cache)):
            length = int(cache.lengths[index])
            if used + length > seq_len:
                rows.append(row)
                row, used = [], 0
            row.append((0, index))
            used += length
        rows.append(row)
    else:
        rows = [[(0, index)] for index in range(len(cache))]
    rehearsal = [source.role == "rehearsal"]
    pad_id = _pad_id(tokenizer)
    return [
        pack_rows(rows[i : i + micro_batch], [cache], rehearsal, seq_len, pad_id, data.packing == "padded")
        for i in range(0, len(rows), micro_batch)
    ]
