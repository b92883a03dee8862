"""FleetConfig: many jobs in one file, each deep-merged over shared defaults, validated all at once.

Validation collects every problem of every job before reporting, so a fleet file is fixed in one
round, not one error per launch. Each line names the file and YAML line, the job, the field, the
value and the fix.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cluster.capacity import NodeCapacity, unsatisfiable
from cluster.config import ResourcesConfig
from compositor.config import ComposeConfig, compose_problems
from launch.config import (
    ConfigError,
    JobConfig,
    apply_overrides,
    deep_merge,
    format_validation_error,
    read_yaml,
    yaml_line,
)
from trainer.checkpoint import results_changing_differences

STRICT = ConfigDict(extra="forbid", validate_assignment=True)
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class FleetFile(BaseModel):
    """The fleet file as written: jobs are still raw mappings (they are validated after merging)."""

    model_config = STRICT
    name: str = Field(pattern=NAME_PATTERN, description="Fleet name, shown in the live view, fleet.json and TensorBoard.")
    defaults: dict[str, Any] = Field(default_factory=dict, description="Any job-config keys; each job's own keys are deep-merged over these.")
    resources: ResourcesConfig = Field(
        default_factory=ResourcesConfig, description="Default resources of every job; a job's `resources` overrides them field by field."
    )
    jobs: list[dict[str, Any]] = Field(min_length=1, description="The jobs, queued in this order; each needs a unique `name`.")
    output_dir: Path = Field(description="Run directory: one sub-directory per job (named after it), plus fleet.json and tb/fleet/.")
    compose: list[ComposeConfig] = Field(
        default_factory=list, description="Adapter compositions run after the jobs finish; each writes <output_dir>/compose/<name>."
    )


class FleetConfig(BaseModel):
    """A validated fleet: every job is a complete JobConfig whose output_dir is `output_dir/<job name>`."""

    model_config = STRICT
    name: str = Field(pattern=NAME_PATTERN, description="Fleet name, shown in the live view, fleet.json and TensorBoard.")
    jobs: list[JobConfig] = Field(min_length=1, description="Fully merged job configs, in queue order.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="The fleet-wide default resources (used to count slots).")
    output_dir: Path = Field(description="Run directory holding the job directories, fleet.json and tb/fleet/.")
    compose: list[ComposeConfig] = Field(default_factory=list, description="Compositions of the jobs' adapters, run after the jobs finish.")


def load_fleet_config(
    path: str | Path, overrides: list[str] | None = None, nodes: list[NodeCapacity] | None = None
) -> FleetConfig:
    """Read and validate a fleet file. Raises ConfigError listing every problem of every job.

    `overrides` (`--set a.b=v`) apply to the fleet file, e.g. `defaults.train.max_steps=10`.
    `nodes`, when known before Ray starts (an embedded cluster), adds the check that every job fits
    on some node; against an existing cluster call `capacity_problems` after connecting.
    """
    path = Path(path)
    raw, node = read_yaml(path)
    raw = apply_overrides(raw, overrides or [])
    source = str(path)
    try:
        envelope = FleetFile.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"invalid fleet file ({_count(err.error_count())}):\n  " + "\n  ".join(format_validation_error(err, source, node))) from None

    problems = _Problems()
    jobs: list[JobConfig] = []
    sized: list[tuple[int, str, ResourcesConfig]] = []  # every job whose resources are valid, for the capacity check
    seen: dict[str, int] = {}
    for index, job_raw in enumerate(envelope.jobs):
        job_name = job_raw.get("name")
        label = f"'{job_name}'" if isinstance(job_name, str) else f"#{index + 1}"
        if job_name is None:
            problems.add(label, f"{_where(source, node, ('jobs', index))}: jobs.{index}.name = (missing): every job needs a name (fix: add `name:`)")
            continue
        for owner, where in ((job_raw, ("jobs", index)), (envelope.defaults, ("defaults",))):
            if "output_dir" in owner:
                problems.add(
                    label,
                    f"{_where(source, node, where + ('output_dir',))}: {'.'.join(map(str, where))}.output_dir = {owner['output_dir']!r}: "
                    f"a fleet job always writes to <fleet output_dir>/<job name> (fix: remove it; set the fleet's output_dir instead)",
                )
        if isinstance(job_name, str) and job_name in seen:
            problems.add(
                label,
                f"{_where(source, node, ('jobs', index, 'name'))}: jobs.{index}.name = {job_name!r}: "
                f"already the name of jobs.{seen[job_name]} (fix: give every job a unique name)",
            )
        elif isinstance(job_name, str):
            seen[job_name] = index
        merged = deep_merge(envelope.defaults, job_raw)
        merged["resources"] = envelope.resources.model_dump()
        for layer in (envelope.defaults.get("resources"), job_raw.get("resources")):
            # A non-mapping replaces the defaults so that validation reports it where it was written.
            merged["resources"] = deep_merge(merged["resources"], layer) if isinstance(layer, dict) else (layer if layer is not None else merged["resources"])
        merged["output_dir"] = str(envelope.output_dir / str(job_name))
        try:
            sized.append((index, str(job_name), ResourcesConfig.model_validate(merged["resources"])))
        except ValidationError:
            pass  # reported with the job's other schema errors below
        # Data paths are checked on the merged mapping, so a missing file is reported even beside schema errors.
        for line in _data_problems(merged, raw, index, source, node):
            problems.add(label, line)
        try:
            job = JobConfig.model_validate(merged)
        except ValidationError as err:
            for line in _job_errors(err, raw, index, source, node):
                problems.add(label, line)
            continue
        drift = _drift_problem(job)
        if drift:
            problems.add(label, f"{_where(source, node, ('jobs', index))}: {drift}")
        jobs.append(job)

    if nodes is not None:
        for line in _capacity_lines(sized, nodes, source, node, raw):
            problems.add(None, line)
    for line in compose_problems(envelope.compose, [str(job.get("name")) for job in envelope.jobs]):
        problems.add(None, f"{_where(source, node, ('compose',))}: {line}")
    if problems:
        raise ConfigError(f"invalid fleet file ({_count(len(problems))}):\n  " + "\n  ".join(problems.lines()))
    return FleetConfig(name=envelope.name, jobs=jobs, resources=envelope.resources, output_dir=envelope.output_dir, compose=envelope.compose)


class _Problems:
    """Problem lines in order; one written in the defaults and shared by several jobs is listed once, naming them all."""

    def __init__(self) -> None:
        self._labels: dict[str, list[str]] = {}

    def add(self, job_label: str | None, line: str) -> None:
        labels = self._labels.setdefault(line, [])
        if job_label is not None:
            labels.append(job_label)

    def __len__(self) -> int:
        return len(self._labels)

    def lines(self) -> list[str]:
        out = []
        for line, labels in self._labels.items():
            where, _, rest = line.partition(": ")
            if labels:
                rest = f"{'job' if len(labels) == 1 else 'jobs'} {', '.join(labels)}: {rest}"
            out.append(f"{where}: {rest}")
        return out


def capacity_problems(jobs: list[JobConfig], nodes: list[NodeCapacity], source: str = "fleet") -> list[str]:
    """One line per job of a validated fleet that no node of the cluster could ever hold."""
    return _capacity_lines([(i, job.name, job.resources) for i, job in enumerate(jobs)], nodes, source, None, {})


def _capacity_lines(
    sized: list[tuple[int, str, ResourcesConfig]], nodes: list[NodeCapacity], source: str, node: yaml.Node | None, raw: dict
) -> list[str]:
    lines = []
    for position, field, reason in unsatisfiable([resources for _, _, resources in sized], nodes):
        index, name, resources = sized[position]
        location = _origin(raw, index, ("resources", field))
        lines.append(f"{_where(source, node, location)}: job '{name}': {'.'.join(map(str, location))} = {getattr(resources, field)!r}: {reason}")
    return lines


def _count(n: int) -> str:
    return f"{n} problem" + ("s" if n != 1 else "")


def _where(source: str, node: yaml.Node | None, location: tuple) -> str:
    line = yaml_line(node, location)
    return f"{source}:{line}" if line else source


def _has(raw: Any, location: tuple) -> bool:
    for part in location:
        if isinstance(raw, dict) and part in raw:
            raw = raw[part]
        elif isinstance(raw, list) and isinstance(part, int) and part < len(raw):
            raw = raw[part]
        else:
            return False
    return True


def _origin(raw: dict, index: int, location: tuple) -> tuple:
    """Where in the fleet file a merged job's field came from: the job, the defaults, or the fleet resources."""
    candidates = [("jobs", index) + location, ("defaults",) + location]
    if location and location[0] == "resources":
        candidates.append(location)
    for candidate in candidates:
        if _has(raw, candidate):
            return candidate
    return candidates[0]


def _job_errors(err: ValidationError, raw: dict, index: int, source: str, node: yaml.Node | None) -> list[str]:
    """format_validation_error's lines, each located where its value was written (job, defaults or resources)."""
    problems = err.errors()
    by_prefix: dict[tuple, list[str]] = {}
    lines = []
    for position, problem in enumerate(problems):
        location = tuple(problem["loc"])
        origin = _origin(raw, index, location)
        prefix = origin[: len(origin) - len(location)]
        if prefix not in by_prefix:
            by_prefix[prefix] = format_validation_error(err, source, node, prefix)
        lines.append(by_prefix[prefix][position])
    return lines


def _data_problems(merged: dict, raw: dict, index: int, source: str, node: yaml.Node | None) -> list[str]:
    """Data sources that name nothing on disk (a file, a directory, or a glob matching at least one file)."""
    data = merged.get("data") if isinstance(merged.get("data"), dict) else {}
    train = data.get("train")
    sources: list[tuple[tuple, Any]] = []
    if isinstance(train, dict):  # one mapping stands for a one-element list
        sources.append((("data", "train", "path"), train.get("path")))
    elif isinstance(train, list):
        sources.extend((("data", "train", i, "path"), s.get("path")) for i, s in enumerate(train) if isinstance(s, dict))
    if isinstance(data.get("eval"), dict):
        sources.append((("data", "eval", "path"), data["eval"].get("path")))
    found = []
    for location, data_path in sources:
        if not isinstance(data_path, str) or Path(data_path).exists() or glob.glob(data_path):
            continue  # a missing or mistyped path is the schema's to report
        origin = _origin(raw, index, location)
        found.append(
            f"{_where(source, node, origin)}: {'.'.join(map(str, origin))} = {data_path!r}: no such file, directory or glob match "
            f"(relative paths start at {Path.cwd()}) (fix: correct the path)"
        )
    return found


def _drift_problem(job: JobConfig) -> str | None:
    """A job directory that already holds a run of a different config would be resumed or skipped wrongly."""
    saved_path = job.output_dir / "config.yaml"
    if not saved_path.is_file():
        return None
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except yaml.YAMLError:
        return f"{saved_path} is not valid YAML (fix: delete {job.output_dir} to start the job afresh)"
    current = job.model_dump(mode="json")
    differences = results_changing_differences(saved, current)
    if not differences:
        return None
    return (
        f"output_dir {job.output_dir} holds a run of a different config ({'; '.join(differences[:3])}"
        f"{'; ...' if len(differences) > 3 else ''}) (fix: restore those values, rename the job, or delete {job.output_dir})"
    )
