"""Self-generated rehearsal: the base answers general prompts once, the answers are cached and shared,
and the data pipeline mixes them in as a rehearsal source."""

from __future__ import annotations

import json

import pytest
import torch
from schema.yamlfile import dump_yaml
from conftest import write_jsonl
from typer.testing import CliRunner

from data_pipeline import build_train_stream
from schema.data import DataConfig
from schema.job import QuantConfig, RehearsalConfig
from trainer.evaluation.generation import generate
from data_pipeline.encoding import render_prompt
from trainer.models import load_base_model, load_tokenizer
from trainer.prior import ensure_prior_dataset, generate_prior_rows, with_prior_rehearsal

GENERAL = [
    {"instruction": "Write a number", "instances": [{"input": "", "output": "7"}]},
    {"instruction": "What is the sum", "instances": [{"input": "12 and 7", "output": "19"}]},
    {"instruction": "reverse the word", "instances": [{"input": "abc", "output": "cba"}]},
    {"instruction": "answer the question", "instances": [{"input": "what is 3 plus 4", "output": "7"}]},
]
QUANT = QuantConfig(bits=4)


@pytest.fixture
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "general.jsonl", GENERAL)


@pytest.fixture(scope="module")
def tiny_base(tiny_model_dir):
    return load_base_model(str(tiny_model_dir), QUANT, dtype=torch.float32, device=torch.device("cpu"))


def test_prior_rows_are_the_base_models_greedy_answers(tiny_model_dir, tiny_base, prompts_file):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    settings = RehearsalConfig(prompts=prompts_file, template="chat", max_new_tokens=6)
    path = ensure_prior_dataset(str(tiny_model_dir), settings, quant=QUANT, model=tiny_base, tokenizer=tokenizer)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    prompts = ["Write a number", "What is the sum\n\n12 and 7", "reverse the word\n\nabc", "answer the question\n\nwhat is 3 plus 4"]
    answers = generate(tiny_base, tokenizer, [render_prompt(tokenizer, "chat", p) for p in prompts], max_new_tokens=6)
    assert rows == [{"prompt": p, "completion": a} for p, a in zip(prompts, answers) if a.strip()]
    meta = json.loads((path.parent / "prior.json").read_text())
    assert meta["prompts"] == 4 and meta["rows"] == len(rows) and meta["quant"]["bits"] == 4

    # Cached: a second job with the same base and settings gets the same file without generating
    # (the model it passes is never touched), and the ratio does not change the key.
    again = ensure_prior_dataset(
        str(tiny_model_dir), settings.model_copy(update={"ratio": 0.5}), quant=QUANT, dtype=torch.float32, model=object(), tokenizer=tokenizer
    )
    assert again == path
    # Anything that changes the answers gives another dataset.
    longer = ensure_prior_dataset(
        str(tiny_model_dir), settings.model_copy(update={"max_new_tokens": 3}), quant=QUANT, model=tiny_base, tokenizer=tokenizer
    )
    assert longer != path and longer.is_file()
    assert not list(path.parent.parent.glob(".*"))  # no staging directories left behind


def test_sampled_prior_is_seeded(tiny_model_dir, tiny_base, prompts_file):
    tokenizer = load_tokenizer(str(tiny_model_dir))

    def rows(seed):
        settings = RehearsalConfig(prompts=prompts_file, template="none", max_new_tokens=8, temperature=1.0, seed=seed)
        return generate_prior_rows(tiny_base, tokenizer, ["Write a number", "the sum of"], settings)

    assert rows(1) == rows(1)
    assert rows(1) != rows(2)


def test_prior_source_mixes_in_at_the_ratio(tiny_model_dir, tiny_base, prompts_file, toy_data):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    settings = RehearsalConfig(prompts=prompts_file, template="chat", max_new_tokens=12, ratio=0.25)
    path = ensure_prior_dataset(str(tiny_model_dir), settings, quant=QUANT, model=tiny_base, tokenizer=tokenizer)
    data = DataConfig.model_validate({"train": [{"path": str(toy_data["train"]), "format": "prompt_completion", "template": "none"}], "mix": {"by": "tokens", "window": 4}})
    mixed = with_prior_rehearsal(data, path, settings)
    task, prior = mixed.train
    assert (task.weight, task.role) == (pytest.approx(0.75), "task")
    assert (prior.weight, prior.role, prior.template, prior.path) == (0.25, "rehearsal", "chat", str(path))
    stream = build_train_stream(mixed, tokenizer, seq_len=64, micro_batch=2, seed=0)
    labelled = rehearsal = 0
    for _, batch in zip(range(16), stream):
        response = batch["labels"] != -100
        labelled += int(response.sum())
        rehearsal += int((response & batch["rehearsal_mask"]).sum())
    assert rehearsal > 0
    # The configured share counts all tokens; the labelled share differs by the prompt lengths, so loose.
    assert 0.05 < rehearsal / labelled < 0.6


def test_rehearsal_config_errors_before_any_model_loads(tmp_path, make_job):
    from schema.problems import ConfigError
    from trainer.checks import load_checked_job as load_job_config

    job = make_job()
    raw = job.model_dump(mode="json")
    raw["forgetting"] = {"rehearsal": {"prompts": str(tmp_path / "missing.jsonl"), "ratio": 0.2}}
    job_file = tmp_path / "job.yaml"
    job_file.write_text(dump_yaml(raw))
    with pytest.raises(ConfigError, match=r"forgetting.rehearsal.*missing.jsonl"):
        load_job_config(job_file)
    raw["forgetting"] = {"rehearsal": {"prompts": str(write_jsonl(tmp_path / "p.jsonl", GENERAL)), "ratio": 1.5}}
    job_file.write_text(dump_yaml(raw))
    with pytest.raises(ConfigError, match=r"forgetting.rehearsal.ratio = 1.5"):
        load_job_config(job_file)


def test_prior_cli_writes_a_dataset(tiny_model_dir, prompts_file, tmp_path):
    from launch.cli import app

    out = tmp_path / "prior"
    result = CliRunner().invoke(
        app, ["prior", "--model", str(tiny_model_dir), "--prompts", str(prompts_file), "--out", str(out), "--max-new-tokens", "5", "--template", "chat"]
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    meta = json.loads((out / "prior.json").read_text())
    assert meta["rows"] == len(rows) > 0 and {"prompt", "completion"} == set(rows[0])
    bad = CliRunner().invoke(app, ["prior", "--model", str(tiny_model_dir), "--prompts", str(tmp_path / "none.txt"), "--out", str(out)])
    assert bad.exit_code == 2 and "none.txt" in bad.output
