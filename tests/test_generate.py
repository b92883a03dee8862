"""`lorafleet generate`: each adapter's answer beside the base's, rendered as the adapter was trained."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from typer.testing import CliRunner

from data_pipeline.encoding import render_prompt
from launch.cli import app
from trainer.evaluation.generation import generate
from trainer.loop import run_job
from trainer.models import load_base_model, load_tokenizer

PROMPT = "Q: What is 12 plus 7? A:"


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory, tiny_model_dir):
    from conftest import addition_rows, write_jsonl
    from schema.job import JobConfig

    root = tmp_path_factory.mktemp("generate")
    data = write_jsonl(root / "train.jsonl", addition_rows(64))
    dirs = []
    for name, template in (("plain", "none"), ("chatty", "chat")):
        config = JobConfig.model_validate({
            "name": name, "model": str(tiny_model_dir), "data": {"train": {"path": str(data)}, "template": template},
            "optim": {"name": "adamw", "lr": 1e-2}, "train": {"max_steps": 6, "micro_batch": 4, "grad_accum": 1, "seq_len": 64, "seed": 3},
            "eval": {"every": 0}, "output_dir": str(root / name),
        })
        dirs.append(run_job(config).adapter_dir)
    return dirs


def test_answers_side_by_side_match_each_model(two_adapters, tiny_model_dir):
    result = CliRunner().invoke(app, ["generate", *map(str, two_adapters), "--prompt", PROMPT, "--max-new-tokens", "5"], terminal_width=200)
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if "base" in line and "plain" in line)
    assert "chatty" in header
    # The same answers, computed directly: the base with adapters off, each adapter with its own template.
    tokenizer = load_tokenizer(str(tiny_model_dir))
    base = load_base_model(str(tiny_model_dir), load_quant(), torch.float32)
    model = PeftModel.from_pretrained(base, str(two_adapters[0]), adapter_name="plain")
    model.eval()
    with model.disable_adapter():
        base_answer = generate(model, tokenizer, [render_prompt(tokenizer, "none", PROMPT)], max_new_tokens=5)[0]
    plain_answer = generate(model, tokenizer, [render_prompt(tokenizer, "none", PROMPT)], max_new_tokens=5)[0]
    for answer in (base_answer.strip(), plain_answer.strip()):
        if answer:
            assert answer[:8] in result.output, (answer, result.output)


def load_quant():
    from schema.job import QuantConfig

    return QuantConfig(bits=4)


def test_bad_requests_are_named(two_adapters, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["generate", str(two_adapters[0])])
    assert result.exit_code == 2 and "exactly one of --prompt" in result.output
    result = runner.invoke(app, ["generate", str(tmp_path), "--prompt", "hi"])
    assert result.exit_code == 2 and "not PEFT adapter directories" in result.output
    result = runner.invoke(app, ["generate", str(two_adapters[0]), "--prompt", "hi", "--base-precision", "2"])
    assert result.exit_code == 2 and "precision" in result.output


def test_the_chat_loop_answers_until_an_empty_line(two_adapters):
    result = CliRunner().invoke(app, ["generate", str(two_adapters[1]), "--interactive", "--max-new-tokens", "3"], input="hello\nagain\n\n")
    assert result.exit_code == 0, result.output
    assert result.output.count("prompt: hello") == 1 and result.output.count("prompt: again") == 1
