"""Fleet files: merging over defaults, and validation that lists every problem before Ray starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from schema.yamlfile import dump_yaml
from typer.testing import CliRunner

from cluster.capacity import NodeCapacity, job_shape, unsatisfiable
from schema.job import ResourcesConfig
from launch.cli import app
from schema.problems import ConfigError
from launch.checks import load_checked_fleet
from schema.loading import load_fleet_config


def write_fleet(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    return path


def test_jobs_merge_over_defaults_and_fleet_resources(tmp_path, toy_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fleet = load_fleet_config(
        write_fleet(
            tmp_path,
            f"""
name: demo
defaults:
  model: smollm2-135m
  lora: {{r: 4, alpha: 8}}
  train: {{max_steps: 7, seq_len: 64}}
  data: {{train: {{path: {toy_data['train']}}}}}
resources: {{gpus_per_job: 1, cpus_per_job: 1, max_failures: 3}}
jobs:
  - name: one
  - name: two
    lora: {{r: 8}}
    train: {{max_steps: 9}}
    resources: {{gpus_per_job: 2}}
output_dir: runs/demo
""",
        )
    )
    one, two = fleet.jobs
    assert (one.lora.r, one.lora.alpha, one.train.max_steps, one.train.seq_len) == (4, 8.0, 7, 64)
    assert (two.lora.r, two.lora.alpha, two.train.max_steps, two.train.seq_len) == (8, 8.0, 9, 64)
    assert (one.resources.gpus_per_job, two.resources.gpus_per_job) == (1, 2)
    assert two.resources.max_failures == 3 and two.resources.cpus_per_job == 1
    assert one.output_dir == Path("runs/demo/one") and two.output_dir == Path("runs/demo/two")
    assert fleet.output_dir == Path("runs/demo")


BAD_FLEET = """name: demo
defaults:
  lora: {{r: 0}}
  data: {{train: {{path: {train}}}}}
resources: {{gpus_per_job: 1, cpus_per_job: 1}}
jobs:
  - name: math
    lora: {{r: 8}}
  - name: news
    lora: {{r: 8, alpah: 3}}
    data: {{train: {{path: missing.jsonl}}}}
    resources: {{gpus_per_job: 2, cpus_per_job: 4}}
  - name: math
    lora: {{r: 8}}
    train: {{max_steps: -1}}
  - lora: {{r: 8}}
  - name: plain
output_dir: runs/demo
"""


def test_bad_fleet_lists_every_problem_with_job_field_and_line(tmp_path, toy_data):
    path = write_fleet(tmp_path, BAD_FLEET.format(train=toy_data["train"]))
    with pytest.raises(ConfigError) as caught:
        load_checked_fleet(path, nodes=[NodeCapacity("local", cpus=2, gpus=0)])
    lines = str(caught.value).splitlines()[1:]
    expected = [
        f"{path}:10: job 'news': jobs.1.lora.alpah = 3: Extra inputs are not permitted",
        f"{path}:11: job 'news': jobs.1.data.train.path = 'missing.jsonl': no such file or directory",
        f"{path}:13: job 'math': jobs.2.name = 'math': already the name of jobs.0",
        f"{path}:15: job 'math': jobs.2.train.max_steps = -1: Input should be greater than or equal to 1",
        f"{path}:16: job #4: jobs.3.name = (missing): every job needs a name",
        # Written once in the defaults; only the job that does not override it is named.
        f"{path}:3: job 'plain': defaults.lora.r = 0: Input should be greater than or equal to 1",
        f"{path}:12: job 'news': jobs.1.resources.cpus_per_job = 4: needs 2 x 4 CPUs on one node, but the largest node has 2",
    ]
    for start in expected:
        assert sum(line.strip().startswith(start) for line in lines) == 1, (start, lines)
    assert len(lines) == len(expected)
    assert str(caught.value).startswith(f"invalid fleet file ({len(expected)} problems)")


def test_output_dir_in_a_job_is_refused(tmp_path, toy_data):
    path = write_fleet(
        tmp_path,
        f"name: f\njobs:\n  - name: a\n    output_dir: elsewhere\n    data: {{train: {{path: {toy_data['train']}}}}}\noutput_dir: runs/f\n",
    )
    with pytest.raises(ConfigError, match=r"fleet.yaml:4: job 'a': jobs.0.output_dir = 'elsewhere': a fleet job always writes to"):
        load_fleet_config(path)


def test_envelope_errors_name_their_lines(tmp_path):
    path = write_fleet(tmp_path, "name: bad name\njobs: []\noutputdir: x\n")
    with pytest.raises(ConfigError) as caught:
        load_fleet_config(path)
    text = str(caught.value)
    assert f"{path}:1: name = 'bad name': String should match pattern" in text
    assert f"{path}:2: jobs = []: List should have at least 1 item" in text
    assert f"{path}:3: outputdir = 'x': Extra inputs are not permitted (fix: did you mean 'output_dir'? otherwise remove it)" in text
    assert "output_dir = (missing): Field required (fix: add this field)" in text


def test_changed_config_of_an_existing_job_directory_is_refused(tmp_path, toy_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = f"name: f\ndefaults: {{data: {{train: {{path: {toy_data['train']}}}}}}}\njobs:\n  - name: a\noutput_dir: runs/f\n"
    job = load_fleet_config(write_fleet(tmp_path, text)).jobs[0]
    job.output_dir.mkdir(parents=True)
    saved = job.model_dump(mode="json")
    saved["lora"]["r"] = 4
    (job.output_dir / "config.yaml").write_text(dump_yaml(saved))
    with pytest.raises(ConfigError, match=r"job 'a': jobs.0.output_dir = 'runs/f/a': holds a run of a different config \(lora.r: the saved run has 4, this config has 16\)"):
        load_checked_fleet(write_fleet(tmp_path, text))
    saved["lora"]["r"] = 16
    saved["checkpoint"]["every"] = 3  # result-neutral: a resume may change it
    (job.output_dir / "config.yaml").write_text(dump_yaml(saved))
    assert load_checked_fleet(write_fleet(tmp_path, text)).config.jobs[0].lora.r == 16


def test_cli_reports_a_bad_fleet_before_ray_starts(tmp_path, toy_data):
    import ray

    path = write_fleet(tmp_path, BAD_FLEET.format(train=toy_data["train"]))
    result = CliRunner().invoke(app, ["run", str(path), "--num-cpus", "2"])
    assert result.exit_code == 2
    assert "invalid fleet file (7 problems)" in result.output
    assert "jobs.1.resources.cpus_per_job = 4" in result.output
    assert not ray.is_initialized()


def test_shapes_and_capacity():
    two_gpus = ResourcesConfig(gpus_per_job=2, cpus_per_job=3)
    assert job_shape(two_gpus, cluster_has_gpus=True).bundles() == [{"CPU": 3.0, "GPU": 1.0}] * 2
    assert job_shape(two_gpus, cluster_has_gpus=False).bundles() == [{"CPU": 3.0}] * 2
    assert job_shape(ResourcesConfig(gpus_per_job=0), cluster_has_gpus=True).bundles() == [{"CPU": 1.0}]
    nodes = [NodeCapacity("a", cpus=8, gpus=1), NodeCapacity("b", cpus=8, gpus=1)]
    # 2 GPUs exist in all, but never on one node: a 2-GPU job could never start.
    assert unsatisfiable([ResourcesConfig(gpus_per_job=1), two_gpus], nodes) == [
        (1, "gpus_per_job", "needs 2 GPUs on one node, but the largest node has 1", "ask for at most 1")
    ]
    assert unsatisfiable([two_gpus], [NodeCapacity("c", cpus=6, gpus=2)]) == []
    assert unsatisfiable([two_gpus], [NodeCapacity("c", cpus=5, gpus=2)])[0][1] == "cpus_per_job"


def test_cli_fails_fast_on_an_address_where_no_cluster_listens(tmp_path, toy_data):
    import socket

    import ray

    with socket.socket() as probe:  # a port that was free a moment ago: nobody listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = write_fleet(tmp_path, f"name: f\ndefaults: {{data: {{train: {{path: {toy_data['train']}}}}}}}\njobs: [{{name: a}}]\noutput_dir: {tmp_path / 'run'}\n")
    result = CliRunner().invoke(app, ["run", str(path), "--address", f"127.0.0.1:{port}"])
    assert result.exit_code == 2
    assert f"could not join the Ray cluster at '127.0.0.1:{port}': nothing answers" in result.output
    assert not ray.is_initialized()


def test_ten_different_problems_are_all_reported_before_ray_starts(tmp_path, toy_data, tiny_model_dir):
    """Config, data, tasks, compose and resources problems together, each with file, line, field, value and fix."""
    import ray

    missing_field = tmp_path / "rows.jsonl"
    missing_field.write_text('{"prompt": "Q: 1+1?", "answer": " 2"}\n')
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(f"tasks:\n  - name: t\n    path: {toy_data['eval']}\n    metric: accuracy\n")
    text = f"""name: ten
defaults:
  model: {tiny_model_dir}
  data: {{train: {{path: {toy_data['train']}}}}}
jobs:
  - name: config
    lora: {{r: 0}}
    optim: {{lrr: 0.1}}
    train: {{max_steps: ten}}
  - name: paths
    data: {{train: {{path: {tmp_path / 'nope.jsonl'}}}}}
  - name: rows
    data: {{train: {{path: {missing_field}}}}}
  - name: targets
    lora: {{targets: [no_such_module]}}
  - name: tasks
    eval: {{tasks: {tasks}}}
  - name: big
    resources: {{gpus_per_job: 2, cpus_per_job: 4}}
  - name: rows
compose:
  - {{name: mix, adapters: [config, nobody]}}
output_dir: {tmp_path / 'run'}
"""
    path = write_fleet(tmp_path, text)
    result = CliRunner().invoke(app, ["run", str(path), "--num-cpus", "2"])
    assert result.exit_code == 2 and not ray.is_initialized()
    lines = [line.strip() for line in result.output.splitlines()[1:] if line.strip()]
    expected = [
        ("jobs.0.lora.r = 0", ":7:"),
        ("jobs.0.optim.lrr = 0.1", ":8:"),
        ("jobs.0.train.max_steps = 'ten'", ":9:"),
        ("jobs.1.data.train.path", ":11:"),
        ("jobs.2.data.train.path", ":13:"),
        ("jobs.3.lora.targets = ['no_such_module']", ":15:"),
        ("tasks.0.metric = 'accuracy'", f"{tasks}:4:"),
        ("jobs.5.resources.cpus_per_job = 4", ":19:"),
        ("jobs.6.name = 'rows'", ":20:"),
        ("compose.0.adapters.1 = 'nobody'", ":22:"),
    ]
    assert result.output.startswith("error: invalid fleet file (10 problems)"), result.output
    for field, where in expected:
        matching = [line for line in lines if field in line]
        assert len(matching) == 1, (field, lines)
        assert where in matching[0] and "(fix: " in matching[0], matching[0]
