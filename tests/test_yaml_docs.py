"""Every YAML the project shows a user loads as written through the real loader (YAML 1.2), and the
YAML 1.1 traps that used to bite read as a user means them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from schema.fleet import FleetFile
from schema.job import JobConfig
from schema.loading import load_fleet, load_job, load_tasks
from schema.problems import ConfigError
from schema.tasks import TasksFile
from schema.yamlfile import read_yaml_text

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```yaml\n(.*?)```", re.S)
MINIMAL_DATA = {"train": {"path": "data/train.jsonl"}}


def yaml_blocks() -> list[tuple[str, str]]:
    blocks = []
    for doc in DOCS:
        for index, match in enumerate(BLOCK.finditer(doc.read_text())):
            blocks.append((f"{doc.name}#{index + 1}", match.group(1)))
    return blocks


@pytest.mark.parametrize(("where", "text"), yaml_blocks(), ids=[where for where, _ in yaml_blocks()])
def test_every_yaml_block_of_the_docs_validates(where, text):
    data, _ = read_yaml_text(text, where)
    assert isinstance(data, dict), f"{where}: a YAML block of the docs is not a mapping"
    if "jobs" in data:
        FleetFile.model_validate(data)
    elif "tasks" in data or ("forgetting" in data and "prompts" in (data.get("forgetting") or {})):
        TasksFile.model_validate(data)
    else:  # a job file, or a fragment of one (the sections a passage talks about): validated inside a job
        JobConfig.model_validate({"data": MINIMAL_DATA, **data})


def test_the_docs_show_yaml():
    assert len(yaml_blocks()) >= 2


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_file_loads(path):
    data, _ = read_yaml_text(path.read_text(), str(path))
    if "jobs" in data:
        loaded = load_fleet(path)
        assert loaded.problems == [] and loaded.config is not None
    elif "tasks" in data or "forgetting" in data and "model" not in data:
        load_tasks(path)
    else:
        loaded = load_job(path)
        assert loaded.problems == []


def job_text(extra: str) -> str:
    return "data: {train: {path: data/train.jsonl}}\n" + extra


@pytest.mark.parametrize(
    ("extra", "check"),
    [
        ("forgetting: {lwf: {weight: 0.5, temperature: 1.0, on: task}}\n", lambda c: c.forgetting.lwf.on == "task"),
        ("forgetting:\n  lwf: {on: rehearsal}\n", lambda c: c.forgetting.lwf.on == "rehearsal"),
        ("optim: {lr: 1e-3}\n", lambda c: c.optim.lr == 0.001),
        ("optim: {lr: 1.0e-3}\n", lambda c: c.optim.lr == 0.001),
        ("train: {max_steps: 010}\n", lambda c: c.train.max_steps == 10),  # YAML 1.1 read 8 (octal)
    ],
)
def test_yaml_1_1_traps_read_as_meant(tmp_path, extra, check):
    path = tmp_path / "job.yaml"
    path.write_text(job_text(extra))
    loaded = load_job(path)
    assert loaded.problems == [] and check(loaded.config)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ("train: {max_steps: yes}\n", ["train.max_steps = 'yes'", "whole number"]),  # YAML 1.1 read True, then 1
        ("train: {max_steps: true}\n", ["train.max_steps = True", "not true/false"]),
        ("train: {max_steps: 1:30}\n", ["train.max_steps = '1:30'"]),  # YAML 1.1 read 90
        ("optim: {lr: '1e-3'}\n", ["optim.lr = '1e-3'", "without quotes"]),
        ("train: {grad_checkpointing: maybe}\n", ["train.grad_checkpointing = 'maybe'"]),
        ("train: {seed: 1}\ntrain: {seed: 2}\n", [":3:", "'train' is written twice", "lines 2 and 3"]),
        ("optim: {lr: 1.0e-3, lr: 2.0e-3}\n", ["'lr' is written twice"]),
        ("on: task\n", ["on = 'task'", "Extra inputs"]),  # a stray `on:` key is a key, not True
    ],
)
def test_yaml_traps_that_are_errors_name_the_field(tmp_path, extra, words):
    path = tmp_path / "job.yaml"
    path.write_text(job_text(extra))
    try:
        loaded = load_job(path)
        message = str(ConfigError(loaded.problems))
        assert loaded.problems, "accepted"
    except ConfigError as err:
        message = str(err)
    for word in words:
        assert word in message, (word, message)
