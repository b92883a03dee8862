"""Job config: YAML + --set overrides, validated with errors that name file, line, field, value and fix."""

from __future__ import annotations

import json

import pytest
from schema.yamlfile import dump_yaml, read_yaml_text
from typer.testing import CliRunner

from launch.cli import app
from schema.problems import ConfigError
from schema.job import JobConfig
from schema.loading import apply_overrides, load_job_config
from schema.fleet import deep_merge

GOOD = """\
model: smollm2-135m
quant: {bits: 4, type: nf4, double_quant: true}
lora: {r: 16, alpha: 16, dropout: 0.05, targets: attn}
optim: {name: paged_adamw_8bit, lr: 2.0e-4, schedule: cosine, warmup_ratio: 0.03, max_grad_norm: 1.0}
train: {max_steps: 200, micro_batch: 8, grad_accum: 4, seq_len: 512, grad_checkpointing: true, seed: 42}
data:
  train: {path: data/train.jsonl, format: prompt_completion}
  eval:  {path: data/val.jsonl, format: prompt_completion}
eval: {every: 50}
checkpoint: {every: 50, keep: 2}
output_dir: runs/demo/job
"""


def test_the_issue_example_validates_and_round_trips(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(GOOD)
    config = load_job_config(path)
    assert config.quant.bits == 4 and config.lora.targets == "attn" and config.train.grad_accum == 4
    assert JobConfig.model_validate(read_yaml_text(config.to_yaml(), "test")[0]) == config
    assert JobConfig.model_validate_json(config.model_dump_json()) == config


def test_set_overrides_parse_values_as_yaml(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(GOOD)
    config = load_job_config(path, ["train.max_steps=7", "optim.lr=1e-3", "lora.targets=[q_proj, v_proj]", "train.grad_checkpointing=false"])
    assert (config.train.max_steps, config.optim.lr, config.lora.targets, config.train.grad_checkpointing) == (7, 1e-3, ["q_proj", "v_proj"], False)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["train.max_steps"])


def test_every_problem_is_listed_with_file_line_field_value_and_fix(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(GOOD.replace("type: nf4", "type: nf5").replace("r: 16,", "r: 0,").replace("seed: 42", "seed: 42, epochs: 3"))
    with pytest.raises(ConfigError) as err:
        load_job_config(path)
    message = str(err.value)
    assert f"{path}:2: quant.type = 'nf5'" in message and "one of 'nf4' or 'fp4'" in message
    assert f"{path}:3: lora.r = 0" in message and "greater than or equal to 1" in message
    assert f"{path}:5: train.epochs = 3" in message and "remove it or correct its spelling" in message


def test_missing_required_field_is_named(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model: smollm2-135m\n")
    with pytest.raises(ConfigError, match=r"data = \(missing\).*add this field"):
        load_job_config(path)


def test_deep_merge_merges_mappings_and_replaces_the_rest():
    merged = deep_merge({"train": {"max_steps": 100, "seq_len": 256}, "lora": {"targets": ["q_proj"]}}, {"train": {"max_steps": 5}, "lora": {"targets": ["v_proj"]}})
    assert merged == {"train": {"max_steps": 5, "seq_len": 256}, "lora": {"targets": ["v_proj"]}}


def test_cli_rejects_bad_input_before_anything_is_written(tmp_path):
    runner = CliRunner()
    out_dir = tmp_path / "never"
    path = tmp_path / "job.yaml"
    path.write_text(GOOD.replace("runs/demo/job", str(out_dir)).replace("name: paged_adamw_8bit", "name: sgd"))
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 2
    assert "optim.name = 'sgd'" in result.output and not out_dir.exists()

    result = runner.invoke(app, ["train", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "no such job file" in result.output


def test_cli_reports_a_bad_jsonl_row_with_file_and_line(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n{not json\n")
    path = tmp_path / "job.yaml"
    path.write_text(
        dump_yaml(
            {"model": str(tiny_model_dir), "data": {"train": {"path": str(data)}}, "output_dir": str(tmp_path / "out"), "train": {"max_steps": 1}}
        )
    )
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2
    assert str(data) in result.output and "line 2" in result.output
    assert not (tmp_path / "out").exists()

    data.write_text(json.dumps({"prompt": "a", "answer": "b"}) + "\n")
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2 and "completion" in result.output and "answer" in result.output
