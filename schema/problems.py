"""Problem: one thing wrong with what a user gave us, located and named, with its fix.

Every check of every room returns Problems instead of raising at the first one, so a command can
show all of them at once. A Problem prints as `file:line: [job 'x': ]field = value: message (fix: ...)`.
A check that knows the field but not the file (a data file that fails to parse, found while checking
a job) leaves `file` empty; the loader that read the config fills it in with `Placement.locate`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

MISSING = "(missing)"
_MAX_VALUE_CHARS = 80


def show_value(value: Any) -> str:
    """A value as the user would recognise it, cut to one readable line."""
    text = repr(str(value)) if hasattr(value, "__fspath__") else repr(value)
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 3] + "..."


@dataclass(frozen=True)
class Problem:
    message: str
    location: tuple[str | int, ...] = ()  # field path inside the config, e.g. ("lora", "r")
    value: str | None = None  # shown value (see show_value); None when there is nothing to show
    fix: str = ""
    file: str = ""
    line: int | None = None
    field: str | None = None  # the path as written in the file, when it differs from `location` (a fleet job's field in `defaults`)
    jobs: tuple[str, ...] = ()  # the fleet jobs it concerns

    @classmethod
    def at(cls, location: tuple, value: Any, message: str, fix: str = "", **where: Any) -> Problem:
        return cls(message=message, location=tuple(location), value=show_value(value), fix=fix, **where)

    @property
    def dotted(self) -> str:
        return self.field if self.field is not None else ".".join(str(p) for p in self.location)

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.file and self.line else self.file
        head = f"{where}: " if where else ""
        if self.jobs:
            shown = [j if j.startswith("#") else repr(j) for j in self.jobs]  # "#4": the fourth job, which has no name
            head += f"{'job' if len(self.jobs) == 1 else 'jobs'} {', '.join(shown)}: "
        subject = self.dotted
        if subject and self.value is not None:
            subject = f"{subject} = {self.value}"
        body = f"{subject}: {self.message}" if subject else self.message
        return head + body + (f" (fix: {self.fix})" if self.fix else "")

    def with_jobs(self, *jobs: str) -> Problem:
        return replace(self, jobs=tuple(jobs))


class ConfigError(ValueError):
    """Input that cannot run. Carries every problem found; prints one per line."""

    def __init__(self, problems: list[Problem] | Problem | str, title: str = ""):
        if isinstance(problems, str):
            problems = [Problem(problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems = list(problems)
        self.title = title
        super().__init__(str(self))

    def __str__(self) -> str:
        lines = [str(p) for p in merge_shared(self.problems)]
        if not self.title and len(lines) == 1:
            return lines[0]
        count = f"{len(lines)} problem" + ("s" if len(lines) != 1 else "")
        return f"{self.title or 'invalid input'} ({count}):\n  " + "\n  ".join(lines)


def merge_shared(problems: list[Problem]) -> list[Problem]:
    """One line for a problem that several fleet jobs share (written once, in `defaults`), naming all of them."""
    merged: dict[tuple, Problem] = {}
    for problem in problems:
        key = (problem.file, problem.line, problem.dotted, problem.value, problem.message, problem.fix)
        if key in merged:
            jobs = merged[key].jobs + tuple(j for j in problem.jobs if j not in merged[key].jobs)
            merged[key] = replace(merged[key], jobs=jobs)
        else:
            merged[key] = problem
    return list(merged.values())
