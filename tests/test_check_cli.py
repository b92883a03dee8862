"""`lorafleet check` on fleet files written as a user writes them: the data it counts, the pack groups it
shows, and the problems it lists (exit 2) — all without loading a model or starting Ray."""

from __future__ import annotations

import ray
from typer.testing import CliRunner

from launch.cli import app

FLEET = """\
name: checked
defaults:
  model: {model}
  train: {{max_steps: 4, micro_batch: 2, seq_len: 64, dtype: fp32}}
  data:
    train: {{path: {train}}}
resources: {{gpus_per_job: 1, cpus_per_job: 1}}
packing: {{max_adapters: 3}}
jobs:
  - name: low_rank
    lora: {{r: 4}}
  - name: high_lr
    optim: {{lr: 1.0e-3}}
  - name: long_rows
    train: {{seq_len: 128}}
  - name: solo
    packing: false
  - name: dora
    lora: {{dora: true}}
output_dir: {run_dir}
"""


def check(*args: str):
    return CliRunner().invoke(app, ["check", *args], env={"COLUMNS": "200"}, catch_exceptions=False)


def test_check_counts_the_data_and_shows_which_jobs_share_a_base(tmp_path, tiny_model_dir, toy_data):
    path = tmp_path / "fleet.yaml"
    path.write_text(FLEET.format(model=tiny_model_dir, train=toy_data["train"], run_dir=tmp_path / "run"))
    result = check(str(path))
    assert result.exit_code == 0, result.output
    assert "no problems" in result.output and not ray.is_initialized()
    rows = sum(1 for line in toy_data["train"].read_text().splitlines() if line.strip())
    assert f"{rows:,}" in result.output  # the training file's rows, counted
    lines = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") >= 6}
    # Rank and lr may differ inside a pack; seq_len may not; packing: false and DoRA train alone.
    assert "A (2 jobs)" in lines["low_rank"] and "A (2 jobs)" in lines["high_lr"]
    assert "B (1 jobs)" in lines["long_rows"]
    assert "alone" in lines["solo"] and "alone" in lines["dora"]
    assert "packs of up to 3 adapters" in result.output
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_check_lists_every_problem_with_its_line_and_exits_2(tmp_path, tiny_model_dir, toy_data):
    path = tmp_path / "fleet.yaml"
    text = FLEET.format(model=tiny_model_dir, train=toy_data["train"], run_dir=tmp_path / "run")
    text = text.replace("lora: {r: 4}", "lora: {r: 0}").replace("name: solo", "name: low_rank")
    path.write_text(text)
    result = check(str(path))
    assert result.exit_code == 2, result.output
    assert f"{path.name}:11" in result.output and "lora.r" in result.output  # the line of `lora: {r: 0}`
    assert "already the name of" in result.output and f"{path.name}:16" in result.output
