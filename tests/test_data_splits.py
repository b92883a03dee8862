"""Content-hash splits: deterministic, close to the asked fractions, rephrasings of one example never
straddle splits, and a source's three splits partition its rows."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from conftest import SHARED_DATA, write_jsonl
from tiny import make_tokenizer

from data_pipeline import build_eval_batches, content_key, split_of_key
from schema.data import DataConfig
from data_pipeline.sources import iter_chunks, parse_example
from data_pipeline.splits import WordStatistics


def test_split_is_a_function_of_content_with_the_asked_fractions():
    keys = [f"passage number {i} about something" for i in range(20_000)]
    splits = [split_of_key(k, (0.8, 0.1, 0.1)) for k in keys]
    assert splits == [split_of_key(k, (0.8, 0.1, 0.1)) for k in keys]  # deterministic
    shares = Counter(splits)
    assert shares["train"] / len(keys) == pytest.approx(0.8, abs=0.01)
    assert shares["validation"] / len(keys) == pytest.approx(0.1, abs=0.01)
    assert shares["test"] / len(keys) == pytest.approx(0.1, abs=0.01)


def test_rephrasings_of_one_passage_share_a_key():
    rng = random.Random(0)
    vocabulary = [f"w{i}" for i in range(3000)]
    passages = [" ".join(rng.sample(vocabulary, 30)) for _ in range(60)]
    summaries = [" ".join(rng.sample(vocabulary, 5)) for _ in range(60)]
    rows = []
    for passage, summary in zip(passages, summaries):
        rows.append({"prompt": f"{passage}\nWhat label best describes this news article?", "response": summary})
        rows.append({"prompt": f"Summarize the following article. {passage.upper()}", "response": summary})
        rows.append({"prompt": f"Write an article that matches this summary: {summary}", "response": passage})
    statistics = WordStatistics()
    for row in rows:
        statistics.add(row)
    keys = [content_key(row, "auto", statistics.common()) for row in rows]
    assert all(keys[i] == keys[i + 1] == keys[i + 2] for i in range(0, len(rows), 3))
    assert len(set(keys)) == 60  # distinct examples keep distinct keys
    # Without the statistics the template wording is part of the key and the rephrasings fall apart.
    plain = [content_key(row) for row in rows]
    assert sum(plain[i] == plain[i + 1] == plain[i + 2] for i in range(0, len(rows), 3)) <= 40


def test_a_sources_splits_partition_its_rows(tmp_path):
    rows = [{"prompt": f"{'what is' if i % 2 else 'compute'} {i // 2} plus 1?\npassage {i // 2} of the data set", "completion": f" {i // 2 + 1}"} for i in range(400)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    tokenizer = make_tokenizer()
    found = {}
    for split in ("train", "validation", "test"):
        source = {"path": str(path), "split": split, "split_fractions": [0.6, 0.2, 0.2]}
        config = DataConfig(train=source, eval=source, template="none")
        batches = build_eval_batches(config, tokenizer, seq_len=64, micro_batch=8)
        found[split] = sum(int((b["position_ids"] == 0).sum()) - int(((b["position_ids"] == 0) & (b["input_ids"] == tokenizer.pad_token_id)).sum()) for b in batches)
    assert sum(found.values()) == 400
    assert 0.5 < found["train"] / 400 < 0.7 and found["validation"] > 40 and found["test"] > 40
    # The two phrasings of a passage (rows 2k and 2k+1) always land in the same split.
    chunk = next(iter_chunks(DataConfig(train={"path": str(path)}).train[0]))
    by_passage = {}
    for row in chunk.rows:
        by_passage.setdefault(row["prompt"].split("\n")[1], set()).add(split_of_key(content_key(row), (0.6, 0.2, 0.2)))
    assert all(len(s) == 1 for s in by_passage.values())


@pytest.mark.skipif(not (SHARED_DATA / "t0").is_dir(), reason="../shared/data/t0 is absent")
@pytest.mark.parametrize("name", ["ag_news", "samsum"])  # samsum has a template that swaps prompt and response
def test_t0_rephrasings_of_one_example_share_a_key(name):
    source = DataConfig(train={"path": str(SHARED_DATA / "t0" / f"{name}.jsonl")}).train[0]
    values = [parse_example(source, row, chunk.file, place).values for chunk in iter_chunks(source) for row, place in zip(chunk.rows, chunk.places)]
    statistics = WordStatistics()
    for row in values:
        statistics.add(row)
    keys_by_template: dict[str, set[str]] = {}
    for row in values:
        keys_by_template.setdefault(row["template"], set()).add(content_key(row, "auto", statistics.common()))
    templates = len(keys_by_template)
    assert templates >= 7
    # Each template phrases the same ~200 examples: if any rephrasing got a key of its own, there would be
    # more keys in all than in the largest template.
    assert len(set().union(*keys_by_template.values())) == max(len(k) for k in keys_by_template.values())
    assert max(len(k) for k in keys_by_template.values()) > 0.95 * len(values) / templates
