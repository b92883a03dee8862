"""Bad input surfaces as one DataError naming file, line or row, field, value and the fields that exist,
before training starts, never as a bare KeyError."""

from __future__ import annotations

import json

import pytest
from conftest import addition_rows, write_jsonl
from pydantic import ValidationError
from tiny import make_tokenizer

from data_pipeline import DataError, build_train_stream, validate_data
from schema.data import DataConfig
from data_pipeline.cache import data_cache_root


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def config_for(path, **source) -> DataConfig:
    return DataConfig(train={"path": str(path), **source}, template="none")


def test_unparsable_json_line_names_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "broken.jsonl"
    lines = [json.dumps(r) for r in addition_rows(5)]
    lines.insert(3, '{"prompt": "unterminated')
    path.write_text("\n".join(lines) + "\n")
    for attempt in (lambda: validate_data(config_for(path)), lambda: build_train_stream(config_for(path), tokenizer, seq_len=64, micro_batch=1, seed=0)):
        with pytest.raises(DataError, match=r"broken\.jsonl:4: line 4 is not valid JSON"):
            attempt()


def test_missing_field_names_file_row_field_and_existing_fields(tmp_path):
    rows = addition_rows(4)
    rows[2] = {"prompt": "what is 1 plus 1?", "answer": " 2"}
    path = write_jsonl(tmp_path / "missing.jsonl", rows)
    with pytest.raises(DataError) as caught:
        validate_data(config_for(path))
    message = str(caught.value)
    assert "missing.jsonl: line 3: field 'completion' is missing" in message
    assert "['answer', 'prompt']" in message and "fields: {completion: <column>}" in message


def test_wrongly_typed_field_names_the_value(tmp_path):
    rows = addition_rows(3) + [{"prompt": "what is 1 plus 1?", "completion": 2}]
    path = write_jsonl(tmp_path / "typed.jsonl", rows)
    with pytest.raises(DataError, match=r"typed\.jsonl: line 4: field 'completion' is a int \(2\), expected a string"):
        validate_data(config_for(path))


def test_malformed_chat_message(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}])
    with pytest.raises(DataError, match=r"chat\.jsonl: line 1: messages\[1\] = \{'role': 'assistant'\} is not a \{role: str, content: str\} message"):
        validate_data(DataConfig(train={"path": str(path), "format": "chat"}))


def test_template_placeholder_the_rows_lack(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", addition_rows(3))
    config = DataConfig(train={"path": str(path)}, template="Question: {question}\nAnswer: ")
    with pytest.raises(DataError, match=r"t\.jsonl: line 1: the template .* names \{question\}, which the row lacks; the row has fields \['completion', 'prompt'\]"):
        validate_data(config)


def test_missing_paths_and_empty_globs(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.jsonl: no such file or directory"):
        validate_data(config_for(tmp_path / "nothere.jsonl"))
    with pytest.raises(DataError, match=r"the glob matches no files"):
        validate_data(config_for(tmp_path / "shard-*.jsonl"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        validate_data(config_for(tmp_path / "notes.txt"))


def test_empty_completions_are_dropped_counted_and_fail_above_the_fraction(tmp_path, tokenizer):
    rows = addition_rows(40)
    rows[5]["completion"] = ""
    rows[9]["completion"] = "   "
    path = write_jsonl(tmp_path / "empty.jsonl", rows)
    stream = build_train_stream(DataConfig(train={"path": str(path)}, template="none", max_bad_frac=0.1), tokenizer, seq_len=64, micro_batch=1, seed=0)
    counts = stream.caches[0].counts
    assert (counts["rows"], counts["kept"], counts["dropped_empty"]) == (40, 38, 2)
    assert {5, 9}.isdisjoint(stream.caches[0].source_rows.tolist())
    assert stream.stats()["data/dropped_frac"] == pytest.approx(2 / 40)
    with pytest.raises(DataError, match=r"2 of 40 rows \(5\.0%\).*2 empty dropped.*max_bad_frac=0\.04.*empty\.jsonl: line 6"):
        build_train_stream(DataConfig(train={"path": str(path)}, template="none", max_bad_frac=0.04), tokenizer, seq_len=64, micro_batch=1, seed=0)


@pytest.mark.parametrize("overlong", ["drop", "truncate"])
def test_overlong_examples_are_dropped_or_truncated(tmp_path, tokenizer, overlong):
    rows = addition_rows(20)
    rows[3]["completion"] = " " + " plus ".join(["1"] * 40)  # long answer: truncation keeps labelled tokens
    rows[7]["prompt"] = "what is " + "1 plus " * 40 + "1?"  # long question: nothing labelled would survive
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    config = DataConfig(train={"path": str(path)}, template="none", overlong=overlong, max_bad_frac=0.1)
    stream = build_train_stream(config, tokenizer, seq_len=48, micro_batch=1, seed=0)
    counts = stream.caches[0].counts
    expected = (18, 2, 0) if overlong == "drop" else (19, 1, 1)
    assert (counts["kept"], counts["dropped_overlong"], counts["truncated"]) == expected
    assert 7 not in stream.caches[0].source_rows.tolist()
    assert int(stream.caches[0].lengths.max()) <= 48
    with pytest.raises(DataError, match=r"2 of 20 rows .* longer than seq_len=48.*long\.jsonl: line 8"):
        build_train_stream(config.model_copy(update={"max_bad_frac": 0.05}), tokenizer, seq_len=48, micro_batch=1, seed=0)


def test_truncation_keeps_the_first_seq_len_tokens(tmp_path, tokenizer):
    rows = addition_rows(20)
    rows[0]["completion"] = " " + " ".join(str(i) for i in range(60))
    path = write_jsonl(tmp_path / "longanswer.jsonl", rows)
    stream = build_train_stream(DataConfig(train={"path": str(path)}, template="none", max_bad_frac=0.1), tokenizer, seq_len=40, micro_batch=1, seed=0)
    cache = stream.caches[0]
    assert cache.counts["truncated"] == 1 and cache.counts["kept"] == 20
    ids, mask = cache.example(int((cache.source_rows == 0).nonzero()[0][0]))
    full = tokenizer(rows[0]["prompt"], add_special_tokens=False)["input_ids"] + tokenizer(rows[0]["completion"], add_special_tokens=False)["input_ids"]
    assert ids.tolist() == full[:40] and mask.sum() > 0


def test_bad_row_in_a_worker_process_is_a_data_error(tmp_path, tokenizer):
    rows = addition_rows(9000)
    rows[8500] = {"prompt": "x", "target": "y"}  # in the third chunk, tokenised by a worker
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    config = DataConfig(train={"path": str(path)}, template="none", num_proc=2)
    with pytest.raises(DataError, match=r"big\.jsonl: line 8501: field 'completion' is missing"):
        build_train_stream(config, tokenizer, seq_len=64, micro_batch=1, seed=0)
    assert not list(data_cache_root().glob(".tmp-*"))  # the half-written cache was removed


def test_config_mistakes_are_caught_by_the_schema(tmp_path):
    with pytest.raises(ValidationError, match="roles \\['answer'\\] that format 'prompt_completion' does not have"):
        DataConfig(train={"path": "x.jsonl", "fields": {"answer": "a"}})
    with pytest.raises(ValidationError, match="must be three non-negative shares summing to 1"):
        DataConfig(train={"path": "x.jsonl", "split": "train", "split_fractions": [0.5, 0.2, 0.2]})
    with pytest.raises(ValidationError, match="neither auto, chat, none, a named template"):
        DataConfig(train={"path": "x.jsonl"}, template="no placeholders here")
    with pytest.raises(ValidationError, match="train lists no sources"):
        DataConfig(train=[])
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        DataConfig(train={"path": "x.jsonl", "wieght": 2})


def test_hub_dataset_unreachable_offline_is_explained(monkeypatch):
    import datasets
    import huggingface_hub

    # The libraries read HF_HUB_OFFLINE when first imported; set their flags so no network is tried.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"hf:nobody/no-such-set: datasets\.load_dataset\('nobody/no-such-set', split='train'\) failed .*save it with save_to_disk"):
        validate_data(DataConfig(train={"path": "hf:nobody/no-such-set"}))


def test_chat_template_that_rejects_a_row_names_the_row(tmp_path):
    tokenizer = make_tokenizer()
    # Like many real templates: roles must alternate user/assistant.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    conversation = [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}, {"role": "assistant", "content": "yes"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation}])
    with pytest.raises(DataError, match=r"chat\.jsonl: line 1: the tokenizer's chat template rejects this row \(TemplateError: roles must alternate\)"):
        build_train_stream(DataConfig(train={"path": str(path), "format": "chat"}), tokenizer, seq_len=64, micro_batch=1, seed=0)
