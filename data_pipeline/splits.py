"""Deterministic train/validation/test splits by hashing example content.

Templates that rephrase one example (T0/P3 style) wrap the same passage in different words, put it
first or last, or swap what is asked and what is answered. So a row's key is not its text but a
sketch of its *uncommon* words: of the words (prompt and response) found in fewer than
COMMON_SHARE of the source's rows, the SKETCH_WORDS with the smallest hash. Template wording repeats
across a template's rows, so it is common and drops out; the sketch then picks the same words of the
example's own content under every template, even when a template adds a few words of its own.
Measured on ../shared/data/t0 (ag_news, imdb, paws, samsum, glue_mrpc, quarel): every template's
rows map into the same set of keys, so no rephrasing gets a key of its own. Templates that add content
of their own (a random candidate answer in social_i_qa, concept lists in common_gen) still give some
rephrasings their own key.
The word statistics come from one pass over the whole source (a fixed-size hashed count, so memory
does not grow with the source): the split is a deterministic function of the source's content.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Iterable
from typing import Any

import numpy as np

from data_pipeline.errors import DataError

SPLITS = ("train", "validation", "test")
COMMON_SHARE = 0.02  # below the share of rows of any one template of a 50-template source
SKETCH_WORDS = 2  # 1 merges unrelated examples often; 3+ lets a template's own rare word change the key more often
BUCKETS = 1 << 20  # hashed word counts: 4 MiB whatever the vocabulary; a collision only drops a word from keys
_WORD = re.compile(r"\w+", re.UNICODE)


def words_of(values: dict[str, Any]) -> list[str]:
    """Lower-cased words of the row's prompt and response (or of every chat message)."""
    texts = [values[k] for k in ("prompt", "response") if isinstance(values.get(k), str)]
    messages = values.get("messages")
    if isinstance(messages, list):
        texts = [m["content"] for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str)]
    return [w for text in texts for w in _WORD.findall(text.lower())]


def _buckets(words: Iterable[str]) -> np.ndarray:
    return np.fromiter((zlib.crc32(w.encode()) % BUCKETS for w in words), dtype=np.int64)


class WordStatistics:
    """How many rows of a source contain each (hashed) word."""

    def __init__(self) -> None:
        self.rows = 0
        self.counts = np.zeros(BUCKETS, dtype=np.int32)

    def add(self, values: dict[str, Any]) -> None:
        self.rows += 1
        self.counts[np.unique(_buckets(set(words_of(values))))] += 1

    def common(self) -> np.ndarray:
        """Boolean mask over buckets: words in at least COMMON_SHARE of the rows (and in more than 2)."""
        return self.counts >= max(3, COMMON_SHARE * self.rows)


def content_key(values: dict[str, Any], split_key: str = "auto", common: np.ndarray | None = None) -> str:
    """The text that decides a row's split. 'auto': the SKETCH_WORDS uncommon words of smallest hash
    (all words count as uncommon when `common` is not given, or when it leaves none); a column name:
    that column, normalised."""
    if split_key != "auto":
        if split_key not in values:
            raise DataError(f"split_key '{split_key}' is not a field of the row; the row has fields {sorted(values)}")
        return " ".join(_WORD.findall(str(values[split_key]).lower()))
    words = sorted(set(words_of(values)))
    buckets = _buckets(words)
    if common is not None and words:
        uncommon = [(zlib.crc32(w.encode()), w) for w, bucket in zip(words, buckets) if not common[bucket]]
        if uncommon:
            return " ".join(w for _, w in sorted(uncommon)[:SKETCH_WORDS])
    return " ".join(w for _, w in sorted((zlib.crc32(w.encode()), w) for w in words)[:SKETCH_WORDS])


def split_of_key(key: str, fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)) -> str:
    """'train', 'validation' or 'test' for a content key; the same key always lands in the same split."""
    point = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64
    bound = 0.0
    for name, share in zip(SPLITS, fractions):
        bound += share
        if point < bound:
            return name
    return SPLITS[-1]


class ContentSplitter:
    """Assigns the rows of one source to splits by content, given the source's word statistics."""

    def __init__(self, fractions: tuple[float, float, float], split_key: str, statistics: WordStatistics | None):
        self.fractions = fractions
        self.split_key = split_key
        self.common = statistics.common() if statistics is not None else None

    def split_of(self, values: dict[str, Any]) -> str:
        return split_of_key(content_key(values, self.split_key, self.common), self.fractions)


def source_splitter(source) -> ContentSplitter:
    """The splitter for a source; with split_key 'auto' it first reads the source once for word statistics."""
    from data_pipeline.sources import iter_chunks, parse_example

    statistics = None
    if source.split_key == "auto":
        statistics = WordStatistics()
        for chunk in iter_chunks(source):
            for row, place in zip(chunk.rows, chunk.places):
                statistics.add(parse_example(source, row, chunk.file, place).values)
    return ContentSplitter(source.split_fractions, source.split_key, statistics)


def split_rows(source) -> dict[str, list[int]]:
    """The source's row indices (0-based, across its files in order) in each split: the splits helper
    for looking at or exporting a split; training uses SourceConfig.split."""
    from data_pipeline.sources import iter_chunks, parse_example

    splitter = source_splitter(source)
    found: dict[str, list[int]] = {name: [] for name in SPLITS}
    for chunk in iter_chunks(source):
        for row, index, place in zip(chunk.rows, chunk.source_rows, chunk.places):
            found[splitter.split_of(parse_example(source, row, chunk.file, place).values)].append(index)
    return found
