"""The Arrow token cache: reused on the second run (and says so), keyed by everything that changes
tokens, written atomically (a crash leaves no half cache), read memory-mapped."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import addition_rows, write_jsonl
from tiny import make_tokenizer

from data_pipeline import DataError, build_train_stream
from schema.data import DataConfig


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLEET_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "data"


def committed(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.iterdir() if not p.name.startswith(".")) if cache_dir.exists() else []


def test_second_run_reuses_the_cache_and_says_so(tmp_path, tokenizer, private_cache, caplog):
    path = write_jsonl(tmp_path / "t.jsonl", addition_rows(30))
    config = DataConfig(train={"path": str(path)}, template="none")
    first = build_train_stream(config, tokenizer, seq_len=64, micro_batch=2, seed=0)
    tokens_file = first.caches[0].directory / "tokens.arrow"
    written_at = tokens_file.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="lorafleet.data"):
        second = build_train_stream(config, tokenizer, seq_len=64, micro_batch=2, seed=0)
    assert (first.caches[0].hit, second.caches[0].hit) == (False, True)
    assert any("data cache hit" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    assert tokens_file.stat().st_mtime_ns == written_at
    assert len(committed(private_cache)) == 1
    # Each input of the key makes a new entry: seq_len, template, and the source bytes.
    build_train_stream(config, tokenizer, seq_len=80, micro_batch=2, seed=0)
    build_train_stream(config.model_copy(update={"template": "chat"}), tokenizer, seq_len=64, micro_batch=2, seed=0)
    write_jsonl(path, addition_rows(30, seed=9))
    build_train_stream(config, tokenizer, seq_len=64, micro_batch=2, seed=0)
    assert len(committed(private_cache)) == 4


def test_failed_build_leaves_no_cache(tmp_path, tokenizer, private_cache):
    rows = addition_rows(5000)  # two chunks: the first is written before the bad row is read
    path = tmp_path / "t.jsonl"
    write_jsonl(path, rows)
    with open(path, "a") as handle:
        handle.write("{not json\n")
    with pytest.raises(DataError, match=r"t\.jsonl:5001"):
        build_train_stream(DataConfig(train={"path": str(path)}, template="none"), tokenizer, seq_len=64, micro_batch=2, seed=0)
    assert committed(private_cache) == [] and not list(private_cache.glob(".tmp-*"))


def build_in_this_process(path: str) -> None:
    build_train_stream(DataConfig(train={"path": path}, template="none"), make_tokenizer(), seq_len=64, micro_batch=2, seed=0)


def build_logging_to(path: str, log_file: str) -> None:
    logger = logging.getLogger("lorafleet.data")
    logger.setLevel(logging.INFO)
    logger.addHandler(logging.FileHandler(log_file))
    build_in_this_process(path)


def test_a_crash_mid_write_leaves_no_half_cache(tmp_path, tokenizer, private_cache):
    path = write_jsonl(tmp_path / "big.jsonl", addition_rows(30_000))
    # A forked child (no re-import) builds the cache and is SIGKILLed once the staging file has data.
    process = multiprocessing.get_context("fork").Process(target=build_in_this_process, args=(str(path),))
    process.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.is_alive():
            partial = list(private_cache.glob(".tmp-*/tokens.arrow")) if private_cache.exists() else []
            if partial and partial[0].stat().st_size > 0:
                break
            time.sleep(0.01)
        assert process.is_alive(), "the build finished before it could be interrupted"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.join()
    assert process.exitcode == -signal.SIGKILL
    assert committed(private_cache) == []  # only the staging directory of the dead process
    stream = build_train_stream(DataConfig(train={"path": str(path)}, template="none"), tokenizer, seq_len=64, micro_batch=2, seed=0)
    assert not stream.caches[0].hit and len(stream.caches[0]) == 30_000


def test_cache_is_read_memory_mapped(tmp_path, tokenizer, private_cache):
    path = write_jsonl(tmp_path / "t.jsonl", addition_rows(3000))
    config = DataConfig(train={"path": str(path)}, template="none")
    build_train_stream(config, tokenizer, seq_len=64, micro_batch=2, seed=0)
    before = pa.total_allocated_bytes()
    stream = build_train_stream(config, tokenizer, seq_len=64, micro_batch=2, seed=0)
    for _ in range(20):
        next(stream)
    assert pa.total_allocated_bytes() == before  # no Arrow buffer was copied into memory
    ids, _ = stream.caches[0].example(0)
    assert not ids.flags.owndata and not ids.flags.writeable  # a view of the read-only map


def test_ranks_opening_one_source_at_once_tokenise_it_once(tmp_path, tokenizer, private_cache):
    path = write_jsonl(tmp_path / "t.jsonl", addition_rows(20_000))
    context = multiprocessing.get_context("fork")
    logs = [tmp_path / f"rank{rank}.log" for rank in range(2)]
    ranks = [context.Process(target=build_logging_to, args=(str(path), str(log))) for log in logs]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join()
    assert [p.exitcode for p in ranks] == [0, 0]
    said = sorted("built" if "data cache built" in log.read_text() else "hit" if "data cache hit" in log.read_text() else "?" for log in logs)
    assert said == ["built", "hit"]  # one rank tokenised, the other waited and reused its cache
    (entry,) = committed(private_cache)
    assert not list(private_cache.glob(".tmp-*"))
    stream = build_train_stream(DataConfig(train={"path": str(path)}, template="none"), tokenizer, seq_len=64, micro_batch=2, seed=0)
    assert stream.caches[0].hit and stream.caches[0].directory == entry
