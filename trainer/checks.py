"""Everything about a job that can be checked before a model loads, found all at once.

`check_job` reads the disk (data rows, tasks files, prompts, the model's module names) but loads no
weights and starts nothing; it returns Problems located by field (the loader's Placement adds file
and line). `lorafleet train`, `run` and `check` call it before any Ray actor or model exists.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from data_pipeline.errors import DataError
from schema.jobdir import JobDir
from schema.job import TARGET_PRESETS, JobConfig
from schema.data import DataConfig
from schema.loading import JobEntry, Placement, load_job, load_tasks_placed
from schema.outputs import output_problem
from schema.problems import ConfigError, Problem
from schema.tasks import TasksFile
from trainer.specs import ModelSpecError, group_size_problem, linear_layers, locate_model


def check_job(config: JobConfig, *, deep: bool = True) -> list[Problem]:
    """Every problem of `config` that the schema cannot see. `deep` also reads every data row."""
    problems: list[Problem] = []
    problems += _output_problems(config)
    problems += _model_problems(config)
    if deep:
        problems += data_problems(config)
    if config.eval.tasks is not None:
        if not config.eval.tasks.is_file():
            problems.append(Problem.at(("eval", "tasks"), str(config.eval.tasks), "no such tasks file", "give the path of a tasks YAML"))
        else:
            problems += tasks_file_problems(config.eval.tasks)
    rehearsal = config.forgetting.rehearsal
    if rehearsal is not None:
        from data_pipeline.rows import read_prompts

        try:
            read_prompts(rehearsal.prompts, rehearsal.format)
        except DataError as err:
            message = str(err).removeprefix(f"{rehearsal.prompts}: ")  # the problem names the path already
            problems.append(Problem.at(("forgetting", "rehearsal", "prompts"), str(rehearsal.prompts), message, "give a readable prompts file"))
    return problems


def _output_problems(config: JobConfig) -> list[Problem]:
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        return [Problem.at(("output_dir",), str(out), "is an existing file, not a directory", "choose a directory path for output_dir")]
    # A job resumes in a directory it wrote (overwrite=True lets ours pass); anything else there stays untouched.
    if (foreign := output_problem(out, overwrite=True, location=("output_dir",))) is not None:
        return [foreign]
    job_dir = JobDir(out)
    try:
        diffs = job_dir.differences(config.model_dump(mode="json"))
    except ConfigError as err:
        return [Problem.at(("output_dir",), str(out), f"holds an unreadable earlier run ({err.problems[0]})", f"move {out} aside to start afresh")]
    if diffs:
        shown = "; ".join(diffs[:3]) + ("; ..." if len(diffs) > 3 else "")
        return [
            Problem.at(
                ("output_dir",),
                str(out),
                f"holds a run of a different config ({shown})",
                f"restore those values, rename the job, or move {out} aside",
            )
        ]
    return []


def _model_problems(config: JobConfig) -> list[Problem]:
    try:
        source = locate_model(config.model)
    except ModelSpecError as err:
        return [Problem.at(("model",), config.model, str(err))]
    if not source.ready:  # a GGUF not converted yet, or a hub id: its modules are checked when it loads
        return []
    layers = linear_layers(source.local)
    problems = []
    if config.quant.method == "hqq" and config.quant.bits != 16 and (problem := group_size_problem(layers, config.quant.group_size)):
        problems.append(Problem.at(("quant", "group_size"), config.quant.group_size, problem))
    targets = config.lora.targets
    wanted = TARGET_PRESETS[targets] if isinstance(targets, str) else list(targets)
    if isinstance(wanted, str):  # all-linear: whatever the model has
        return problems
    names = list(layers.inputs)
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
    missing = [t for t in wanted if not any(name == t or name.endswith("." + t) for name in names)]
    if not missing:
        return problems
    return problems + [
        Problem.at(
            ("lora", "targets"),
            targets,
            f"the model has no linear module named {', '.join(repr(m) for m in missing)}; its linear modules are {', '.join(leaves)}",
            "name some of those, or use a preset (qv, attn, all-linear)",
        )
    ]


def data_problems(config: JobConfig) -> list[Problem]:
    """One problem per data source that is missing, unreadable, or has a row the format or template cannot use."""
    from data_pipeline.validation import validate_source

    problems = []
    data = config.data
    sources = [(("data", "train", i), s) for i, s in enumerate(data.train)] + ([(("data", "eval"), data.eval)] if data.eval else [])
    for location, source in sources:
        try:
            validate_source(source, data.template, data.max_bad_frac)
        except DataError as err:
            # The message starts with the path when it is about the path itself; the problem names it already.
            message = str(err).removeprefix(f"{source.path}: ")
            problems.append(Problem.at(location + ("path",), source.path, message, "fix the file or its rows, or the source's path, format, fields or template"))
    return problems


def tasks_file_problems(path: Path) -> list[Problem]:
    """Problems of a tasks file: its schema (file:line), then every task's rows and the probe's prompts."""
    try:
        tasks, placement = load_tasks_placed(path)
    except ConfigError as err:
        return err.problems
    return _rows_problems(tasks, placement)


def _rows_problems(tasks: TasksFile, placement: Placement) -> list[Problem]:
    """Each task whose rows do not read, and a probe whose prompts do not, at the line of its path."""
    from data_pipeline.rows import probe_prompts, task_rows

    problems = []
    for index, task in enumerate(tasks.tasks):
        try:
            task_rows(task)
        except DataError as err:
            # The problem names the task and its path already; the message need not repeat them.
            message = str(err).removeprefix(f"task '{task.name}': ").removeprefix(f"{task.path}: ")
            problems.append(Problem.at(("tasks", index, "path"), str(task.path), message, "fix the task's path, format, fields or where"))
    if tasks.forgetting is not None:
        try:
            probe_prompts(tasks.forgetting)
        except DataError as err:
            message = str(err).removeprefix(f"{tasks.forgetting.prompts}: ")
            problems.append(Problem.at(("forgetting", "prompts"), str(tasks.forgetting.prompts), message, "fix forgetting.prompts or its format"))
    return [placement.locate(problem) for problem in problems]


def load_tasks_file(path: str | Path) -> TasksFile:
    """A tasks file validated and its rows read (cheap), so a missing field or file fails here, before any
    model loads. Raises ConfigError listing every problem."""
    tasks, placement = load_tasks_placed(path)
    problems = _rows_problems(tasks, placement)
    if problems:
        raise ConfigError(problems, title=f"invalid tasks file {path}")
    return tasks


def check_entry(entry: JobEntry, deep: bool = True) -> list[Problem]:
    """The disk checks of one job as read from a file, located. A job whose config did not validate is
    checked as far as its sections allow: the data section when that validates on its own."""
    if entry.config is not None:
        return [entry.placement.locate(p) for p in check_job(entry.config, deep=deep)]
    try:
        data = DataConfig.model_validate(entry.raw.get("data"))
    except ValidationError:
        return []  # the schema problems already cover the data section
    problems = data_problems(JobConfig.model_construct(data=data)) if deep else []
    return [entry.placement.locate(p) for p in problems]


def load_checked_job(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """A job file loaded, validated and checked against the disk; raises ConfigError listing every
    problem with its file and line."""
    loaded = load_job(path, overrides)
    problems = loaded.problems + check_entry(loaded.entry)
    if problems:
        raise ConfigError(problems, title="invalid job")
    return loaded.config
