"""Reading job, fleet and tasks files into validated configs, every problem located.

Each loader returns the config and its `Placement`: how a field of that config maps back to the
file and line where the user wrote it (for a fleet job: the job's own entry, the defaults, or the
fleet's resources; for a `--set` override: that option). The checks that run later on the disk
(`trainer.checks`) report fields, and the placement turns them into `file:line` problems.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from schema.fleet import RUN_DIR_ENTRIES, FleetConfig, FleetFile, deep_merge
from schema.job import JobConfig
from schema.problems import MISSING, ConfigError, Problem, show_value
from schema.tasks import TasksFile
from schema.yamlfile import Locations, parse_yaml_value, read_yaml_file


@dataclass
class Placement:
    """Where the fields of one config were written."""

    locations: Locations
    origin: Callable[[tuple], tuple] = lambda location: location  # a field of the config -> its path in the file
    overrides: dict[tuple, str] = field(default_factory=dict)  # path in the file -> the `--set` that replaced it
    job: str | None = None
    raw: Any = None  # the file's data, to write a path as the file does (one mapping for a one-item list)

    def locate(self, problem: Problem) -> Problem:
        jobs = problem.jobs or ((self.job,) if self.job else ())
        if problem.file:  # located already (a row of a data file, a line of a tasks file)
            return replace(problem, jobs=jobs)
        path = _as_written(self.raw, self.origin(problem.location))
        for prefix, option in self.overrides.items():
            written_by_option = prefix[: len(path)] == path and not self.locations.has(path)  # a section the --set created
            if path[: len(prefix)] == prefix or written_by_option:
                return replace(problem, file=option, line=None, field=_dotted(path), jobs=jobs)
        return replace(problem, file=self.locations.file, line=self.locations.line(path), field=_dotted(path), jobs=jobs)


@dataclass
class JobEntry:
    """One job as read: its merged mapping, where its fields were written, and its config when it validated."""

    label: str
    placement: Placement
    raw: dict[str, Any]
    config: JobConfig | None


@dataclass
class LoadedJob:
    entry: JobEntry
    problems: list[Problem]  # what the schema found; checks on the disk come later (trainer.checks)

    @property
    def config(self) -> JobConfig:
        if self.entry.config is None:
            raise ConfigError(self.problems, title="invalid job config")
        return self.entry.config

    @property
    def placement(self) -> Placement:
        return self.entry.placement


@dataclass
class LoadedFleet:
    config: FleetConfig | None  # the jobs that validated (None when none did)
    placement: Placement  # the fleet file itself (compose, resources, output_dir)
    entries: list[JobEntry]
    problems: list[Problem]
    output_dir: Path

    @property
    def jobs(self) -> dict[str, Placement]:
        return {entry.config.name: entry.placement for entry in self.entries if entry.config is not None}


def _as_written(raw: Any, path: tuple) -> tuple:
    """`path` as the file writes it: a list index where the file has a single mapping (which the schema
    reads as a one-item list, as `data.train: {path: ...}`) is dropped."""
    written: list = []
    node = raw
    for part in path:
        if isinstance(part, int) and isinstance(node, dict):
            continue
        written.append(part)
        node = node.get(part) if isinstance(node, dict) else (node[part] if isinstance(node, list) and isinstance(part, int) and part < len(node) else None)
    return tuple(written)


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> tuple[dict[str, Any], dict[tuple, str]]:
    """`--set a.b.c=value` overrides applied to a copy of `raw`; values are YAML (3, 1e-4, true, [q_proj])."""
    result = deep_merge(raw, {})
    replaced: dict[tuple, str] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        option = f"--set {item}"
        if not sep or not key.strip():
            raise ConfigError(Problem("expected KEY=VALUE", file=option, fix="write it as --set train.max_steps=50"))
        parts = key.strip().split(".")
        if "" in parts:
            raise ConfigError(Problem(f"the key {key.strip()!r} has an empty part between dots", file=option, fix="write it as section.field, e.g. train.max_steps"))
        try:
            value = parse_yaml_value(text, option)
        except ConfigError as err:
            message = err.problems[0].message
            raise ConfigError(Problem(f"the value {text!r} is not valid YAML ({message})", file=option, fix="quote it, or complete the brackets")) from None
        node: Any = result
        path: tuple = ()
        for depth, part in enumerate(parts):
            if isinstance(node, list):  # a number is a position in a list; in a mapping every key is a name
                if not part.isdigit() or int(part) >= len(node):
                    positions = f"use a position from 0 to {len(node) - 1}" if node else "the list is empty"
                    raise ConfigError(Problem(f"'{_dotted(path)}' is a list; {part!r} is not one of its positions", file=option, fix=positions))
                part = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(Problem(f"'{_dotted(path)}' is not a section, so it has no '{part}'", file=option))
            path += (part,)
            if depth == len(parts) - 1:
                node[part] = value
            else:
                if isinstance(node, dict) and node.get(part) is None:  # absent, or written empty (`lora:`)
                    node[part] = {}
                node = node[part]
        replaced[path] = option
    return result, replaced


# -- validation errors as problems ------------------------------------------------------------------

_UNION_TAG = re.compile(r"^(?:[a-z-]+\[.*\]|str|int|float|bool|none)$")


def validation_problems(err: ValidationError, model: type[BaseModel], prefix: tuple = ()) -> list[Problem]:
    """One Problem per error, with the field path, the value, the message and a fix."""
    problems = []
    for error in _without_other_union_branches(err.errors()):
        location = tuple(p for p in error["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p)))
        message = _READABLE_MESSAGES.get(error["type"], error["msg"].removeprefix("Value error, "))
        value = MISSING if error["type"] == "missing" else (None if error["type"] == "value_error" and not location else show_value(error.get("input")))
        problems.append(Problem(message, location=prefix + location, value=value, fix=_fix_for(error, model, location)))
    return problems


# pydantic's wording where it names Python classes ("instance of LoraConfig", "<class 'pathlib.Path'>").
_READABLE_MESSAGES = {
    "model_type": "Input should be a section: a mapping of its fields",
    "model_attributes_type": "Input should be a section: a mapping of its fields",
    "path_type": "Input should be a path (text)",
}


def _without_other_union_branches(errors: list[dict]) -> list[dict]:
    """For a field typed as a union (`targets: preset | list`), only the errors of the branch the
    user meant: a list for a list, the others for anything else."""
    groups: dict[tuple, list[dict]] = {}
    kept = []
    for error in errors:
        loc = error["loc"]
        tag_at = next((i for i, part in enumerate(loc) if isinstance(part, str) and _UNION_TAG.match(part)), None)
        if tag_at is None:
            kept.append(error)
        else:
            groups.setdefault(tuple(loc[:tag_at]), []).append(error)
    for base, group in groups.items():
        tag = lambda e: e["loc"][len(base)]  # noqa: E731
        value = group[0]["input"] if len(group[0]["loc"]) == len(base) + 1 else None
        if isinstance(value, (list, dict)) or any(len(e["loc"]) > len(base) + 1 for e in group):
            wanted = [e for e in group if str(tag(e)).startswith(("list", "dict", "tuple"))]
        else:
            wanted = [e for e in group if not e["type"].endswith("_type")]
        kept.extend(wanted or group)
    return kept


def _fix_for(error: dict, model: type[BaseModel], location: tuple) -> str:
    kind, value, context = error["type"], error.get("input"), error.get("ctx") or {}
    if kind == "missing":
        return "add this field"
    if kind == "extra_forbidden":
        known = _fields_at(model, location[:-1])
        close = difflib.get_close_matches(str(location[-1]), known, n=1) if known else []
        return f"did you mean '{close[0]}'? otherwise remove it" if close else "remove it or correct its spelling" + (
            f"; the fields here are {', '.join(known)}" if known else ""
        )
    if kind == "literal_error":
        return f"use one of {context.get('expected')}"
    if kind in ("int_type", "float_type", "int_parsing", "float_parsing"):
        number = "a whole number" if kind.startswith("int") else "a number"
        if isinstance(value, bool):
            return f"write {number}, not true/false"
        if isinstance(value, str):
            return f"write {number} without quotes" + (" (YAML 1.2 reads 1e-3, 0.001 and 1.0e-3 as numbers)" if kind.startswith("float") else "")
        return f"write {number}"
    if kind == "int_from_float":
        return "write a whole number"
    if kind == "finite_number":
        return "write a finite number (.inf, .nan and overflowing literals such as 1e999 are refused)"
    if kind == "string_pattern_mismatch":
        return "use letters, digits, '_', '.' and '-', starting with a letter or digit"
    if kind in ("bool_type", "bool_parsing"):
        return "write true or false"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        sign = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        limit = next(iter(context.values()), None)
        return f"use a value {sign} {limit}"
    if kind == "list_type" and location[-2:] == ("data", "train"):
        return "give a list of sources, or one {path: ..., format: ...} mapping"
    if kind in ("model_type", "model_attributes_type"):
        known = _fields_at(model, location)
        return "write its fields as `key: value` lines under it, or as {key: value}" + (f"; its fields are {', '.join(known)}" if known else "")
    if kind == "dict_type":
        return "write `key: value` pairs (as lines under it, or as {key: value})"
    if kind in ("list_type", "tuple_type"):
        return "write a list: [a, b], or one `- item` line per item"
    if kind in ("too_short", "too_long"):
        bound = context.get("min_length") if kind == "too_short" else context.get("max_length")
        return f"give {'at least' if kind == 'too_short' else 'at most'} {bound} item{'s' if bound != 1 else ''}"
    if kind == "string_type":
        return "write text (in quotes if it would otherwise read as a number, true/false or null)"
    if kind == "string_too_long":
        return f"shorten it to at most {context.get('max_length')} characters"
    if kind == "path_type":
        return "write the path as text"
    return ""


def _fields_at(model: type[BaseModel], path: tuple) -> list[str]:
    """The field names of the section at `path` (empty when it is not a section)."""
    current: Any = model
    for part in path:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return []
        current = _section_type(current.model_fields[part].annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or name for name, f in current.model_fields.items()]
    return []


def _section_type(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, (types.UnionType,)) or typing.get_origin(annotation) is not None:
        for arg in typing.get_args(annotation):
            found = _section_type(arg)
            if found is not None:
                return found
    return None


# -- job files ---------------------------------------------------------------------------------------


def load_job(path: str | Path, overrides: list[str] | None = None) -> LoadedJob:
    """Read, override and validate a job YAML. Schema problems are returned, not raised, so that the
    checks of what did validate (its data, say) can be reported with them."""
    raw, locations = read_yaml_file(path, "job file")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(Problem(f"the top level must be a mapping of config keys, got a {type(raw).__name__}", file=str(path), line=1, fix="write `key: value` lines"))
    if "jobs" in raw:  # `lorafleet train fleet.yaml`: say so, rather than list its keys as unknown
        raise ConfigError(
            Problem("is a fleet file (it has `jobs:`), not a job file", file=str(path), line=locations.line(("jobs",)), fix=f"run it with `lorafleet run {path}`")
        )
    raw, replaced = apply_overrides(raw, overrides or [])
    placement = Placement(locations, overrides=replaced, raw=raw)
    try:
        return LoadedJob(JobEntry(str(raw.get("name", "job")), placement, raw, JobConfig.model_validate(raw)), [])
    except ValidationError as err:
        return LoadedJob(JobEntry(str(raw.get("name", "job")), placement, raw, None), [placement.locate(p) for p in validation_problems(err, JobConfig)])


def load_job_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """A job file's config; raises ConfigError listing every schema problem."""
    return load_job(path, overrides).config


# -- fleet files -------------------------------------------------------------------------------------


def load_fleet(path: str | Path, overrides: list[str] | None = None) -> LoadedFleet:
    """Read a fleet file, merge each job over the defaults and validate them all. A broken envelope
    (name, jobs, output_dir, compose) raises ConfigError; the jobs' own problems are returned with the
    jobs that validated, so that the checks on the disk can run on those and be reported together."""
    raw, locations = read_yaml_file(path, "fleet file")
    if not isinstance(raw, dict):
        found = "the file is empty" if raw is None else f"got a {type(raw).__name__}"
        raise ConfigError(
            Problem(
                f"the top level must be a mapping (name, defaults, resources, jobs, output_dir); {found}",
                file=str(path),
                line=1,
                fix="write `name:`, `jobs:` and `output_dir:` lines",
            )
        )
    if "jobs" not in raw and "data" in raw:  # `lorafleet run job.yaml`
        raise ConfigError(
            Problem(
                "is a job file (it has `data:` and no `jobs:`), not a fleet file",
                file=str(path),
                line=locations.line(("data",)),
                fix=f"train it with `lorafleet train {path}`, or list it under `jobs:` in a fleet file",
            )
        )
    raw, replaced = apply_overrides(raw, overrides or [])
    placement = Placement(locations, overrides=replaced, raw=raw)
    try:
        envelope = FleetFile.model_validate(raw)
    except ValidationError as err:
        raise ConfigError([placement.locate(p) for p in validation_problems(err, FleetFile)], title="invalid fleet file") from None

    problems: list[Problem] = []
    entries: list[JobEntry] = []
    seen: dict[str, int] = {}
    for index, job_raw in enumerate(envelope.jobs):
        name = job_raw.get("name")
        label = name if isinstance(name, str) else f"#{index + 1}"
        job_placement = Placement(locations, origin=_origin_in_fleet(raw, index), overrides=replaced, job=label, raw=raw)
        if name is None:
            problems.append(job_placement.locate(Problem("every job needs a name", location=("name",), value=MISSING, fix="add `name:`")))
            entries.append(JobEntry(label, job_placement, deep_merge(envelope.defaults, job_raw), None))
            continue
        for owner, where in ((job_raw, ("jobs", index)), (envelope.defaults, ("defaults",))):
            if "output_dir" in owner:
                problems.append(
                    placement.locate(
                        Problem.at(
                            where + ("output_dir",),
                            owner["output_dir"],
                            "a fleet job always writes to <fleet output_dir>/<job name>",
                            fix="remove it; set the fleet's output_dir instead",
                        )
                    ).with_jobs(label)
                )
        # Names are compared ignoring case: on macOS and Windows `Math` and `math` would share one directory.
        folded = name.casefold() if isinstance(name, str) else None
        if folded in seen:
            first = envelope.jobs[seen[folded]]["name"]
            same = f"already the name of jobs.{seen[folded]}" if first == name else f"differs from the name {first!r} of jobs.{seen[folded]} only in case"
            problems.append(job_placement.locate(Problem.at(("name",), name, same, fix="give every job a unique name")))
        elif folded is not None:
            seen[folded] = index
        if folded in RUN_DIR_ENTRIES:
            problems.append(
                job_placement.locate(
                    Problem.at(("name",), name, f"is the name of the run directory's own {folded!r}", fix=f"choose a name other than {', '.join(RUN_DIR_ENTRIES)}")
                )
            )
        merged = deep_merge(envelope.defaults, job_raw)
        merged["resources"] = envelope.resources.model_dump()
        for layer in (envelope.defaults.get("resources"), job_raw.get("resources")):
            # A non-mapping replaces the defaults so that validation reports it where it was written.
            merged["resources"] = deep_merge(merged["resources"], layer) if isinstance(layer, dict) else (layer if layer is not None else merged["resources"])
        merged["output_dir"] = str(envelope.output_dir / str(name))
        try:
            job = JobConfig.model_validate(merged)
        except ValidationError as err:
            problems.extend(job_placement.locate(p) for p in validation_problems(err, JobConfig))
            job = None
        if folded in seen and seen[folded] != index:
            job = None  # a repeated name: only the first of them runs
        entries.append(JobEntry(label, job_placement, merged, job))
    valid = [entry.config for entry in entries if entry.config is not None]
    fleet = FleetConfig(
        name=envelope.name, jobs=valid, resources=envelope.resources, output_dir=envelope.output_dir, compose=envelope.compose,
        packing=envelope.packing, backfill=envelope.backfill,
    ) if valid else None
    return LoadedFleet(fleet, placement, entries, problems, envelope.output_dir)


def load_fleet_config(path: str | Path, overrides: list[str] | None = None) -> FleetConfig:
    """A fleet file's config; raises ConfigError listing every schema problem of every job."""
    loaded = load_fleet(path, overrides)
    if loaded.problems or loaded.config is None:
        raise ConfigError(loaded.problems, title="invalid fleet file")
    return loaded.config


def _has(raw: Any, location: tuple) -> bool:
    for part in location:
        if isinstance(raw, dict) and part in raw:
            raw = raw[part]
        elif isinstance(raw, list) and isinstance(part, int) and part < len(raw):
            raw = raw[part]
        else:
            return False
    return True


def _origin_in_fleet(raw: dict, index: int) -> Callable[[tuple], tuple]:
    """Where in the fleet file a merged job's field came from: the job, the defaults, or the fleet resources.
    A field no layer writes (a missing one) is placed on the job's own entry."""

    def origin(location: tuple) -> tuple:
        candidates = [("jobs", index) + location, ("defaults",) + location]
        if location and location[0] == "resources":
            candidates.append(location)
        for depth in range(len(location), -1, -1):  # the deepest prefix some layer writes
            for candidate in candidates:
                prefix = candidate[: len(candidate) - len(location) + depth]
                if depth and _has(raw, prefix):
                    return candidate
        return candidates[0]

    return origin


# -- tasks files -------------------------------------------------------------------------------------


def load_tasks(path: str | Path) -> TasksFile:
    """Read and validate a tasks YAML (its rows are read later, by trainer.checks or the evaluation)."""
    return load_tasks_placed(path)[0]


def load_tasks_placed(path: str | Path) -> tuple[TasksFile, Placement]:
    """A tasks file validated, and where its fields are written (to place the problems of its rows)."""
    raw, locations = read_yaml_file(path, "tasks file")
    if isinstance(raw, list):  # a bare list of tasks is accepted
        raw = {"tasks": raw}
        locations = Locations(locations.file, {("tasks",) + k: v for k, v in locations.lines.items()})
    if not isinstance(raw, dict):
        found = "the file is empty" if raw is None else f"got a {type(raw).__name__}"
        raise ConfigError(
            Problem(f"the top level must be a mapping with `tasks` (and optionally `forgetting`); {found}", file=str(path), line=1, fix="write a `tasks:` list")
        )
    placement = Placement(locations, raw=raw)
    try:
        return TasksFile.model_validate(raw), placement
    except ValidationError as err:
        raise ConfigError([placement.locate(p) for p in validation_problems(err, TasksFile)], title=f"invalid tasks file {path}") from None

