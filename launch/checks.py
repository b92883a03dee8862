"""A fleet file checked whole before Ray starts: every job (trainer.checks), the compositions, the run
directory, and (for a cluster known in advance) whether each job fits on some node."""

from __future__ import annotations

from pathlib import Path

from schema.loading import LoadedFleet, load_fleet
from schema.outputs import is_ours
from schema.problems import ConfigError, Problem
from trainer.checks import check_entry, tasks_file_problems


def load_checked_fleet(path: str | Path, overrides: list[str] | None = None, nodes: list | None = None, deep: bool = True) -> LoadedFleet:
    """Load a fleet file and check everything about it; raises ConfigError listing every problem of every
    job with its file and line. `nodes` (cluster.capacity.NodeCapacity) adds the capacity check."""
    loaded = load_fleet(path, overrides)
    problems = fleet_problems(loaded, nodes, deep)
    if problems or loaded.config is None:
        raise ConfigError(problems, title="invalid fleet file")
    return loaded


def fleet_problems(loaded: LoadedFleet, nodes: list | None = None, deep: bool = True) -> list[Problem]:
    """The schema's problems and every check's, for every job (those that did not validate as far as
    their sections allow), the compositions, the run directory and the capacity."""
    problems: list[Problem] = list(loaded.problems)
    if (run_dir := run_dir_problem(loaded.output_dir)) is not None:
        problems.append(loaded.placement.locate(run_dir))
    for entry in loaded.entries:
        problems.extend(check_entry(entry, deep=deep))
    if loaded.config is not None:
        problems.extend(loaded.placement.locate(p) for p in compose_problems(loaded))
    if nodes is not None:
        problems.extend(capacity_problems(loaded, nodes))
    return problems


def run_dir_problem(output_dir: Path) -> Problem | None:
    """Why a fleet may not write into `output_dir`: a file, or a directory holding anything but an earlier
    run of a fleet (fleet.json) or job directories that lorafleet wrote (a run stopped before its fleet.json)."""
    if output_dir.exists() and not output_dir.is_dir():
        return Problem.at(("output_dir",), str(output_dir), "is an existing file, not a directory", "choose a directory path")
    if not output_dir.is_dir() or is_ours(output_dir):
        return None
    foreign = sorted(entry.name for entry in output_dir.iterdir() if not (entry.is_dir() and is_ours(entry)))
    if not foreign:
        return None
    shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
    return Problem.at(
        ("output_dir",),
        str(output_dir),
        f"is a directory that lorafleet did not write (it holds {shown} and no fleet.json); lorafleet never replaces files it did not write",
        "choose a new or empty directory",
    )


def compose_problems(loaded: LoadedFleet) -> list[Problem]:
    """Problems the compose: section's schema cannot see: an adapter that is neither a job of the fleet
    nor an existing PEFT directory, a repeated name, a learn.tasks file that does not read."""
    compositions = loaded.config.compose
    # Every job the file names counts, valid or not: a composition of an invalid job is that job's problem.
    job_names = list(dict.fromkeys(entry.raw["name"] for entry in loaded.entries if isinstance(entry.raw.get("name"), str)))
    problems = []
    names = [c.name for c in compositions]
    for index, composition in enumerate(compositions):
        if names.count(composition.name) > 1 and names.index(composition.name) < index:
            problems.append(Problem.at(("compose", index, "name"), composition.name, "is used twice; each composition needs its own name (it is its directory)", "rename one"))
        for position, adapter in enumerate(composition.adapters):
            if adapter not in job_names and not (Path(adapter) / "adapter_config.json").is_file():
                problems.append(
                    Problem.at(
                        ("compose", index, "adapters", position),
                        adapter,
                        f"is neither a job of this fleet ({', '.join(job_names)}) nor a PEFT adapter directory",
                        "fix the name or the path",
                    )
                )
        if composition.learn is not None:
            tasks = composition.learn.tasks
            if not tasks.is_file():
                problems.append(Problem.at(("compose", index, "learn", "tasks"), str(tasks), "no such tasks file", "give the path of a tasks YAML"))
            else:
                problems.extend(tasks_file_problems(tasks))
    return problems


def capacity_problems(loaded: LoadedFleet, nodes: list) -> list[Problem]:
    """One problem per job that no node of the cluster could ever hold (a job whose config did not
    validate is checked when its resources section does)."""
    from pydantic import ValidationError

    from cluster.capacity import unsatisfiable
    from schema.job import ResourcesConfig

    sized = []
    for entry in loaded.entries:
        try:
            sized.append((entry, entry.config.resources if entry.config else ResourcesConfig.model_validate(entry.raw.get("resources"))))
        except ValidationError:
            continue
    problems = []
    for position, field, reason, fix in unsatisfiable([resources for _, resources in sized], nodes):
        entry, resources = sized[position]
        problems.append(entry.placement.locate(Problem.at(("resources", field), getattr(resources, field), reason, fix)))
    return problems
