"""Hand-made cases for the text metrics and the tasks-file schema (no model involved)."""

from __future__ import annotations

import pytest
from conftest import write_jsonl

from schema.problems import ConfigError as TasksFileError
from trainer.evaluation.metrics import contains, exact_match, extract_numbers, gsm8k_correct, gsm8k_gold, label_correct, normalize_label, predict_label
from trainer.checks import load_tasks_file
from data_pipeline.rows import task_rows


@pytest.mark.parametrize(
    ("text", "numbers"),
    [
        ("She has 1,234 apples.", [1234]),
        ("It is -5 degrees, then 3-4 hours", [-5, 3, 4]),
        ("Total: -1,000 dollars", [-1000]),
        ("costs $18.00.", [18]),
        ("12.5 then 7.", [12.5, 7]),
        ("no number at all", []),
        ("<<48/2=24>> 24", [48, 2, 24, 24]),
    ],
)
def test_extract_numbers(text, numbers):
    assert extract_numbers(text) == numbers


def test_gsm8k_gold_follows_the_hash_marks():
    assert gsm8k_gold("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == 72
    assert gsm8k_gold("#### 1,234") == 1234
    assert gsm8k_gold("#### -3") == -3
    assert gsm8k_gold("the answer is 9") == 9  # no marker: the last number
    assert gsm8k_gold("no answer") is None


@pytest.mark.parametrize(
    ("output", "gold", "correct"),
    [
        ("72", "#### 72", True),
        ("The answer is 72.", "#### 72", True),
        ("72 clips, because 48 + 24 = 72", "#### 72", True),  # first and last
        ("She sold 48 in April and 24 in May, so 72", "#### 72", True),  # last only
        ("72 is wrong; 48 + 20 = 68", "#### 72", True),  # first only
        ("48 + 24 = 72, I think 70", "#### 72", False),  # only a middle one
        ("I made 1,234 dollars", "#### 1234", True),  # commas
        ("It fell to -3 degrees", "#### -3", True),  # negative
        ("It fell 3 degrees", "#### -3", False),  # sign matters
        ("72.5", "#### 72", False),  # a decimal is not the integer
        ("I do not know", "#### 72", False),  # no number at all
        ("", "#### 0", False),
    ],
)
def test_gsm8k_first_or_last_integer(output, gold, correct):
    assert gsm8k_correct(output, gold) is correct


def test_exact_match_and_contains_normalise_whitespace():
    assert exact_match("  SELECT *\n FROM t ", "SELECT * FROM t")
    assert not exact_match("SELECT * FROM t;", "SELECT * FROM t")
    assert not exact_match("select * from t", "SELECT * FROM t")  # case is kept: SQL literals differ by case
    assert contains("The query is:\n SELECT  *   FROM\tt; done", "SELECT * FROM t")
    assert not contains("SELECT * FROM u", "SELECT * FROM t")
    assert contains("anything", "")  # an empty gold is in every output


def test_label_normalisation_and_matching():
    assert normalize_label("  Positive.\n") == "positive"
    labels = ["Positive", "Negative"]
    assert predict_label(" positive!", labels) == "Positive"
    assert predict_label("Negative, clearly", labels) == "Negative"
    assert predict_label("not sure", labels) is None
    # "Yes" must not match "Yesterday": the label has to end at a word boundary.
    assert predict_label("Yesterday was fine", ["Yes", "No"]) is None
    # The longest matching label wins ("not equivalent" over a shorter prefix match).
    assert predict_label("Not equivalent.", ["not", "not equivalent", "equivalent"]) == "not equivalent"
    # Free-form answers of chat models: the one label named as whole words counts; two named is no answer.
    assert predict_label("The review is positive.", labels) == "Positive"
    assert predict_label("The review is positive, but also negative", labels) is None
    assert predict_label("They are not equivalent sentences", ["equivalent", "not equivalent"]) == "not equivalent"
    assert predict_label("It is unpositive", labels) is None
    assert label_correct("YES", "Yes", ["Yes", "No"])
    assert not label_correct("No", "Yes", ["Yes", "No"])
    assert not label_correct("Maybe", "Yes", ["Yes", "No"])


def test_tasks_file_errors_name_file_line_field_and_fix(tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "a", "completion": "b"}])
    bad = tmp_path / "tasks.yaml"
    bad.write_text(f"tasks:\n  - name: sentiment\n    path: {data}\n    metric: acc\n    colour: red\n")
    with pytest.raises(TasksFileError) as err:
        load_tasks_file(bad)
    message = str(err.value)
    assert f"{bad}:4: tasks.0.metric = 'acc'" in message and "use one of" in message
    assert f"{bad}:5: tasks.0.colour = 'red'" in message and "remove it or correct its spelling" in message

    bad.write_text(f"tasks:\n  - name: qa\n    path: {data}\n    metric: exact_match\n    labels: [a]\n")
    with pytest.raises(TasksFileError, match="labels are used by metric 'label' only"):
        load_tasks_file(bad)


def test_task_data_errors_name_row_and_existing_fields(tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "a", "completion": "b"}, {"question": "c", "answer": "d"}])
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(f"tasks:\n  - {{name: t, path: {data}, metric: exact_match}}\n")
    with pytest.raises(ValueError, match=r"rows.jsonl': line 2: field 'prompt' is missing .*\['answer', 'question'\]"):
        load_tasks_file(tasks)
    tasks.write_text(f"tasks:\n  - {{name: t, path: {tmp_path / 'nope.jsonl'}, metric: exact_match}}\n")
    with pytest.raises(ValueError, match="nope.jsonl': no such file"):
        load_tasks_file(tasks)


def test_task_rows_filter_split_and_sample(tmp_path):
    rows = [{"prompt": f"review {i}", "completion": "Yes" if i % 2 else "No", "template": "a" if i < 30 else "b"} for i in range(40)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(
        f"tasks:\n  - {{name: t, path: {data}, metric: label, where: {{template: a}}, n: 10, seed: 3}}\n"
        f"  - {{name: held, path: {data}, metric: label, split: test, split_fractions: [0.5, 0.0, 0.5], n: null}}\n"
    )
    chosen = task_rows(load_tasks_file(tasks).tasks[0])
    assert len(chosen) == 10 and all(ex.fields["template"] == "a" for ex in chosen)
    assert [ex.prompt for ex in chosen] == [ex.prompt for ex in task_rows(load_tasks_file(tasks).tasks[0])]  # seeded
    held = task_rows(load_tasks_file(tasks).tasks[1])
    assert 5 < len(held) < 35  # about half, chosen by content hash
    # The held-out rows are exactly the data pipeline's test split of the same source: never trained on.
    from schema.data import SourceConfig
    from data_pipeline.splits import split_rows

    pipeline = split_rows(SourceConfig(path=str(data), split_fractions=(0.5, 0.0, 0.5)))
    assert sorted(ex.prompt for ex in held) == sorted(rows[i]["prompt"] for i in pipeline["test"])


def test_job_checks_its_tasks_file_before_anything_runs(tmp_path, make_job):
    from trainer.checks import check_job

    data = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "a", "completion": "b"}])
    good = tmp_path / "good.yaml"
    good.write_text(f"tasks:\n  - {{name: t, path: {data}, metric: contains}}\n")
    job = make_job(eval={"tasks": str(good)})
    assert job.eval.tasks == good and check_job(job) == []
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"tasks:\n  - name: t\n    path: {data}\n    metric: contains\n    max_new_tokens: 0\n")
    problems = [str(p) for p in check_job(make_job(eval={"tasks": str(bad)}))]
    assert any(f"{bad}:5: tasks.0.max_new_tokens = 0: Input should be greater than or equal to 1" in p for p in problems), problems
