"""The compose / restore / plr commands end to end on the tiny Llama, and the fleet `compose:` schema."""

from __future__ import annotations

import json

from pathlib import Path

import pytest
from schema.yamlfile import dump_yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from schema.compose import ComposeConfig
from conftest import addition_rows, write_jsonl
from launch.cli import app
from test_compose import make_adapter, one_thread  # noqa: F401  (autouse: one torch thread)

runner = CliRunner()


@pytest.fixture(scope="module")
def two_adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return [
        make_adapter(tiny_model_dir, root / "a", seed=1, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
        make_adapter(tiny_model_dir, root / "b", seed=2, r=4, lora_alpha=4, target_modules=["v_proj", "o_proj"]),
    ]


@pytest.fixture
def tasks_file(tmp_path):
    data = write_jsonl(tmp_path / "add.jsonl", addition_rows(12, seed=5))
    path = tmp_path / "tasks.yaml"
    path.write_text(dump_yaml({"tasks": [
        {"name": "add", "path": str(data), "metric": "exact_match", "n": 4, "template": "none", "max_new_tokens": 3},
        {"name": "add_loss", "path": str(data), "metric": "loss", "n": 4, "template": "none"},
    ]}))
    return path


def test_compose_command_writes_adapter_and_record(two_adapters, tmp_path):
    out = tmp_path / "mix"
    result = runner.invoke(app, ["compose", "--adapters", f"{two_adapters[0]},{two_adapters[1]}", "--weights", "0.5,0.25", "--method", "ties", "--density", "0.5"])
    assert result.exit_code == 2 and "--out" in result.output  # --out is required
    # The form the docs show: several values after one option.
    result = runner.invoke(app, ["compose", "--adapters", str(two_adapters[0]), str(two_adapters[1]),
                                 "--weights", "0.5", "0.25", "--method", "ties", "--density", "0.5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "compose.json").read_text())
    assert record["method"] == "ties" and record["weights"] == [0.5, 0.25] and record["density"] == 0.5
    assert [spec["path"] for spec in record["inputs"]] == [str(a) for a in two_adapters]
    assert 0 < record["retained_energy"] <= 1
    # Repeated options give the same composition.
    again = tmp_path / "again"
    result = runner.invoke(app, ["compose", "--adapters", str(two_adapters[0]), "--adapters", str(two_adapters[1]),
                                 "--weights", "0.5,0.25", "--method", "ties", "--density", "0.5", "--out", str(again)])
    assert result.exit_code == 0, result.output
    assert json.loads((again / "compose.json").read_text())["weights"] == [0.5, 0.25]
    bad = runner.invoke(app, ["compose", "--adapters", f"{two_adapters[0]},{two_adapters[1]}", "--weights", "1", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "1 weights for 2 adapters" in bad.output
    assert "'adapters'" not in bad.output  # the message, not a dump of every option
    assert not (tmp_path / "bad").exists()


def test_list_options_take_several_values():
    from launch.options import join_option_values

    options = ("--adapters", "--weights")
    assert join_option_values(["--adapters", "a", "b", "c", "--weights", "0.5", "-0.25", ".1", "--method", "ties"], options) == [
        "--adapters", "a,b,c", "--weights", "0.5,-0.25,.1", "--method", "ties"]
    assert join_option_values(["--adapters", "a,b", "--adapters", "c", "--out", "x"], options) == ["--adapters", "a,b", "--adapters", "c", "--out", "x"]
    # An option without values stays so, for click to report; after "--" nothing is joined.
    assert join_option_values(["--adapters", "--out", "x"], options) == ["--adapters", "--out", "x"]
    assert join_option_values(["--weights", "1", "--", "--weights", "2", "3"], options) == ["--weights", "1", "--", "--weights", "2", "3"]


def test_compose_learned_from_a_tasks_file(two_adapters, tasks_file, tmp_path):
    out = tmp_path / "learned"
    result = runner.invoke(app, ["compose", "--adapters", f"{two_adapters[0]},{two_adapters[1]}", "--method", "learned",
                                 "--tasks", str(tasks_file), "--examples", "8", "--steps", "5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "compose.json").read_text())
    assert record["method"] == "learned" and record["learned"]["steps"] == 5 and record["learned"]["average"] == "example"
    assert record["weights"] == record["learned"]["weights"] and record["weights"] != [0.5, 0.5]
    bad_average = runner.invoke(app, ["compose", "--adapters", f"{two_adapters[0]},{two_adapters[1]}", "--method", "learned",
                                      "--tasks", str(tasks_file), "--average", "batch", "--out", str(tmp_path / "y")])
    assert bad_average.exit_code == 2 and "average" in bad_average.output and "'batch'" in bad_average.output
    assert not (tmp_path / "y").exists()
    missing = runner.invoke(app, ["compose", "--adapters", str(two_adapters[0]), "--method", "learned", "--out", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "--tasks" in missing.output


def test_restore_and_plr_commands(two_adapters, tasks_file, tmp_path):
    result = runner.invoke(app, ["restore", str(two_adapters[0]), "--base-precision", "16", "--merge", "--out", str(tmp_path / "m16")])
    assert result.exit_code == 0, result.output
    assert "into_dequant_nf4" in result.output and (tmp_path / "m16" / "config.json").is_file()
    bad = runner.invoke(app, ["restore", str(two_adapters[0]), "--base-precision", "2", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "not one of 16, 8, 4" in bad.output
    result = runner.invoke(app, ["plr", str(two_adapters[0]), "--tasks", str(tasks_file), "--out", str(tmp_path / "plr")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "plr" / "plr.json").read_text())
    assert list(report["columns"]) == ["4-bit", "8-bit", "16-bit"]
    losses = [report["columns"][c]["adapter"]["eval/add_loss/loss"] for c in report["columns"]]
    assert all(loss > 0 for loss in losses) and len(set(losses)) == 3  # three different bases
    assert len(report["quantization_error"]) == 14
    assert report["quantization_error_summary"]["rel_err_8bit_mean"] < report["quantization_error_summary"]["rel_err_4bit_mean"]


def test_compose_section_schema():
    config = ComposeConfig.model_validate({"name": "mix", "adapters": ["gsm8k", "ag_news"], "method": "ties", "weights": [1, 0.5]})
    assert config.density == 0.5 and config.learn is None
    with pytest.raises(ValidationError, match="2 weights for 3 adapters"):
        ComposeConfig.model_validate({"name": "mix", "adapters": ["a", "b", "c"], "weights": [1, 2]})
    with pytest.raises(ValidationError, match="needs a `learn` section"):
        ComposeConfig.model_validate({"name": "mix", "adapters": ["a"], "method": "learned"})
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ComposeConfig.model_validate({"name": "mix", "adapters": ["a"], "densty": 0.3})


def test_compose_section_problems_are_found_before_jobs_run(two_adapters, tmp_path, toy_data):
    from launch.checks import compose_problems
    from schema.loading import load_fleet

    def fleet(compose: list[dict]) -> Path:
        path = tmp_path / "fleet.yaml"
        path.write_text(dump_yaml({
            "name": "f", "defaults": {"data": {"train": {"path": str(toy_data["train"])}}},
            "jobs": [{"name": "job-a"}, {"name": "job-b"}], "output_dir": str(tmp_path / "run"), "compose": compose,
        }))
        return path

    good = {"name": "mix", "adapters": ["job-a", str(two_adapters[1])]}
    assert compose_problems(load_fleet(fleet([good]))) == []
    typo = {"name": "mix", "adapters": ["job-c"]}
    learned = {"name": "fit", "adapters": ["job-a"], "method": "learned", "learn": {"tasks": str(tmp_path / "none.yaml")}}
    path = fleet([good, typo, learned, good])
    loaded = load_fleet(path)
    problems = [str(loaded.placement.locate(p)) for p in compose_problems(loaded)]
    assert any("compose.1.adapters.0 = 'job-c': is neither a job of this fleet (job-a, job-b)" in p for p in problems), problems
    assert any("compose.2.learn.tasks" in p and "no such tasks file" in p for p in problems), problems
    assert any("compose.1.name = 'mix': is used twice" in p for p in problems), problems
    assert all(p.startswith(f"{path}:") for p in problems)


