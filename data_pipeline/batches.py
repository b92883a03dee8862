"""Turning data sources into the batches a job trains and evaluates on."""

from __future__ import annotations

from typing import TYPE_CHECKING

from data_pipeline.cache import TokenCache, open_token_cache
from data_pipeline.errors import DataError
from data_pipeline.stream import TrainStream, pack_rows
from schema.data import DataConfig, SourceConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


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
