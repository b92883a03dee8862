"""Every format, file type and template: the right text goes in, prompt tokens are masked, the response
and its EOS are labelled."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl
from tiny import make_tokenizer

from data_pipeline import build_eval_batches, validate_data
from schema.data import DataConfig
from schema.data import NAMED_TEMPLATES

SEQ_LEN = 256


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def examples_of(batches, tokenizer):
    """(full text, labelled text) of every example in the batches, split at position-id restarts."""
    found = []
    for batch in batches:
        for ids, labels, positions in zip(batch["input_ids"], batch["labels"], batch["position_ids"]):
            starts = [i for i, p in enumerate(positions.tolist()) if p == 0] + [len(positions)]
            for start, end in zip(starts, starts[1:]):
                chunk_ids = ids[start:end]
                if (chunk_ids == tokenizer.pad_token_id).all():
                    continue
                kept = [int(t) for t, l in zip(chunk_ids, labels[start:end]) if l != -100]
                found.append((tokenizer.decode(chunk_ids), tokenizer.decode(kept), chunk_ids.tolist(), labels[start:end].tolist()))
    return found


def eval_examples(tmp_path, tokenizer, source: dict, **data):
    config = DataConfig(train=[source], eval=source, **data)
    validate_data(config)
    return examples_of(build_eval_batches(config, tokenizer, seq_len=SEQ_LEN, micro_batch=4), tokenizer)


def test_prompt_completion_with_chat_template_masks_the_prompt(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "what is 2 plus 3?", "completion": " 5"}, {"prompt": "reverse ab", "completion": " ba"}])
    found = eval_examples(tmp_path, tokenizer, {"path": str(path), "format": "prompt_completion"})
    assert [labelled for _, labelled, _, _ in found] == [" 5<|im_end|>", " ba<|im_end|>"]
    full, _, ids, labels = found[0]
    assert full == "<|im_start|>user\nwhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n 5<|im_end|>"
    response_start = labels.index(next(l for l in labels if l != -100))
    assert all(l == -100 for l in labels[:response_start])  # the whole prompt is masked
    assert labels[response_start:] == ids[response_start:]  # response and EOS are labelled
    assert ids[-1] == tokenizer.eos_token_id


def test_alpaca_with_and_without_input(tmp_path, tokenizer):
    rows = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "output": "hi"},  # input missing is allowed in alpaca
    ]
    path = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    found = eval_examples(tmp_path, tokenizer, {"path": str(path), "format": "alpaca"}, template="alpaca")
    expected_prompt = NAMED_TEMPLATES["alpaca"].replace("{prompt}", "Add the numbers.\n\n2 and 3")
    assert found[0][0] == expected_prompt + "5<|im_end|>"
    assert found[0][1] == "5<|im_end|>"
    assert found[1][0] == NAMED_TEMPLATES["alpaca"].replace("{prompt}", "Say hi.") + "hi<|im_end|>"


def test_chat_labels_every_assistant_turn_only(tmp_path, tokenizer):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is 1 plus 1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "and 2 plus 2?"},
        {"role": "assistant", "content": "4"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    (full, labelled, _, _), = eval_examples(tmp_path, tokenizer, {"path": str(path), "format": "chat"})
    assert full == tokenizer.apply_chat_template(messages, tokenize=False).rstrip("\n")
    assert labelled == "2<|im_end|>4<|im_end|>"


def test_question_answer_with_explicit_template(tmp_path, tokenizer):
    rows = [{"question": "Tom has 3 apples and eats 1. How many are left?", "answer": "3 - 1 = <<3-1=2>>2\n#### 2"}]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    template = "Answer the following math question.\n\nQuestion: {question}\n\nAnswer: "
    (full, labelled, _, _), = eval_examples(tmp_path, tokenizer, {"path": str(path), "format": "question_answer"}, template=template)
    assert full == template.format(question=rows[0]["question"]) + rows[0]["answer"] + "<|im_end|>"
    assert labelled == rows[0]["answer"] + "<|im_end|>"


def test_text_format_labels_everything_but_the_first_token(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "the sum of the number is the answer"}])
    (full, labelled, ids, labels), = eval_examples(tmp_path, tokenizer, {"path": str(path), "format": "text"})
    assert full == "the sum of the number is the answer<|im_end|>"
    assert labels[0] == -100 and labels[1:] == ids[1:]


def test_field_mapping_and_template_none(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "mapped.jsonl", [{"query": "upper abc", "target": " ABC", "extra": 1}])
    source = {"path": str(path), "format": "fields", "fields": {"prompt": "query", "completion": "target"}}
    (full, labelled, _, _), = eval_examples(tmp_path, tokenizer, source, template="none")
    assert (full, labelled) == ("upper abc ABC<|im_end|>", " ABC<|im_end|>")


ROWS = [{"prompt": f"what is {i} plus 1?", "completion": f" {i + 1}"} for i in range(12)]


def write_as(kind: str, directory):
    directory.mkdir()
    if kind == "jsonl":
        write_jsonl(directory / "d.jsonl", ROWS)
        return directory / "d.jsonl"
    if kind == "json":
        (directory / "d.json").write_text(json.dumps(ROWS))
        return directory / "d.json"
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(ROWS), directory / "d.parquet")
        return directory / "d.parquet"
    if kind == "csv":
        with open(directory / "d.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["prompt", "completion"])
            writer.writeheader()
            writer.writerows(ROWS)
        return directory / "d.csv"
    if kind == "glob":
        write_jsonl(directory / "part-0.jsonl", ROWS[:5])
        write_jsonl(directory / "part-1.jsonl", ROWS[5:])
        return directory / "part-*.jsonl"
    if kind == "directory":
        write_jsonl(directory / "a.jsonl", ROWS[:7])
        pq.write_table(pa.Table.from_pylist(ROWS[7:]), directory / "b.parquet")
        return directory
    if kind == "hf_dir":
        import datasets

        datasets.Dataset.from_list(ROWS).save_to_disk(str(directory / "ds"))
        return directory / "ds"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "glob", "directory", "hf_dir"])
def test_every_file_kind_reads_the_same_examples(tmp_path, tokenizer, kind):
    path = write_as(kind, tmp_path / kind)
    found = eval_examples(tmp_path, tokenizer, {"path": str(path)}, template="none")
    assert [full for full, _, _, _ in found] == [r["prompt"] + r["completion"] + "<|im_end|>" for r in ROWS]
