"""Rows of evaluation tasks and general prompts, read exactly as training sources are read."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from data_pipeline.errors import DataError
from data_pipeline.sources import BOM, decode_line, iter_chunks, parse_example
from data_pipeline.splits import source_splitter
from schema.data import SourceConfig
from schema.tasks import EvalTaskConfig, ForgettingProbeConfig, RowFormat

ROW_FORMATS: tuple[str, ...] = get_args(RowFormat)


@dataclass
class TaskExample:
    """One evaluation row: the prompt text (before the template), the reference answer, and the row's
    values (its columns plus role names, for {column} templates)."""

    prompt: str
    reference: str
    fields: dict[str, Any]


def row_source(path: Path, row_format: str, fields: dict[str, str] | None = None) -> SourceConfig:
    """The data-pipeline view of an evaluation file (self_instruct rows are read as plain rows)."""
    if row_format not in ROW_FORMATS:  # a command's --format, which no schema has checked
        raise DataError(f"{path}: format {row_format!r} is not one of {', '.join(ROW_FORMATS)}; give the row layout of the file")
    pipeline_format = "prompt_completion" if row_format == "self_instruct" else row_format
    return SourceConfig(path=str(path), format=pipeline_format, fields=fields or {})


def read_examples(path: Path, row_format: str, fields: dict[str, str] | None = None) -> Iterator[TaskExample]:
    """Every row of `path` (file, glob or directory, as for a data source) as a TaskExample; a bad row raises
    DataError naming the file, the line or row, and the field."""
    source = row_source(path, row_format, fields)
    for chunk in iter_chunks(source):
        for row, place in zip(chunk.rows, chunk.places):
            if row_format == "self_instruct":
                yield self_instruct_example(row, chunk.file, place)
            else:
                parsed = parse_example(source, row, chunk.file, place)
                yield TaskExample(parsed.prompt, parsed.response, parsed.values)


def self_instruct_example(row: dict[str, Any], file: str, place: str) -> TaskExample:
    instances = row.get("instances")
    if not isinstance(row.get("instruction"), str) or not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
        raise DataError(
            f"{file}: {place}: format self_instruct needs 'instruction' (text) and 'instances' (a list of {{input, output}}); "
            f"the row has fields {sorted(row)}. Choose the format that matches the file"
        )
    first = instances[0]
    extra = str(first.get("input") or "").strip()
    prompt = row["instruction"].strip() + (f"\n\n{extra}" if extra else "")
    return TaskExample(prompt, str(first.get("output", "")), {**row, "prompt": prompt})


def select(examples: list[TaskExample], n: int | None, seed: int | None) -> list[TaskExample]:
    if seed is not None:
        examples = examples[:]
        random.Random(seed).shuffle(examples)
    return examples if n is None else examples[:n]


def task_rows(task: EvalTaskConfig) -> list[TaskExample]:
    """The task's rows after `where`, the content-hash split, the seeded shuffle and `n`."""
    # The same splitter a training source with these settings uses, so held-out rows are never trained on.
    split = {"split": task.split, "split_fractions": task.split_fractions, "split_key": task.split_key}
    source = row_source(task.path, task.format, task.fields).model_copy(update=split)
    splitter = source_splitter(source) if task.split else None
    examples = []
    for example in read_examples(task.path, task.format, task.fields):
        if any(str(example.fields.get(key)) != value for key, value in task.where.items()):
            continue
        if splitter is not None and splitter.split_of(example.fields) != task.split:
            continue
        examples.append(example)
    if not examples:
        raise DataError(
            f"task '{task.name}': {task.path} has no rows" + (f" matching where={task.where}" if task.where else "")
            + (f" in split '{task.split}'" if task.split else "")
        )
    return select(examples, task.n, task.seed)


def read_prompts(path: Path, row_format: str = "self_instruct") -> list[str]:
    """Prompt texts from a .txt file (one per line) or a data file in `row_format` (its references are ignored)."""
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise DataError(f"{path}: no such prompts file (relative paths start at {Path.cwd()}); correct the path")
        prompts = [line.strip() for number, raw in enumerate(path.read_bytes().removeprefix(BOM).splitlines(), 1) if (line := decode_line(raw, path, number)).strip()]
    else:
        prompts = [example.prompt for example in read_examples(path, row_format)]
    if not prompts:
        raise DataError(f"{path}: holds no prompts; add prompts, one per line (.txt) or one per row")
    return prompts


def probe_prompts(probe: ForgettingProbeConfig) -> list[str]:
    prompts = read_prompts(probe.prompts, probe.format)
    if probe.seed is not None:
        random.Random(probe.seed).shuffle(prompts)
    return prompts[: probe.n]
