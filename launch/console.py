"""How every lorafleet command reports bad input: red lines on stderr, one per problem, then exit code 2."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

EXIT_BAD_INPUT = 2
errors = Console(stderr=True)


def fail(message: str | BaseException, code: int = EXIT_BAD_INPUT) -> NoReturn:
    # Escaped: a message quotes values like [q_proj], which rich would otherwise read as markup.
    errors.print(f"[bold red]error:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def options_error(err, model: type, renamed: dict[str, str] | None = None) -> str:
    """A pydantic error on a command's options (validated as `model`), phrased as the options the user
    typed: `--lambda`, not `lambda_`; `--average`, not `learn.average`; `--weights value 2`; each with its
    fix. `renamed` maps a field to the option that sets it. An error on the options together (no field)
    is the message alone: the input would be every option at once."""
    from schema.loading import validation_problems

    lines = []
    for problem in validation_problems(err, model):
        fix = f" (fix: {problem.fix})" if problem.fix else ""
        names = [str(part) for part in problem.location if not isinstance(part, int)]
        if not names:
            lines.append(problem.message + fix)
            continue
        option = "--" + (renamed or {}).get(names[-1], names[-1]).rstrip("_").replace("_", "-")
        positions = [part for part in problem.location if isinstance(part, int)]
        subject = option + (f" value {positions[0] + 1}" if positions else "")
        lines.append(f"{subject} = {problem.value}: {problem.message}{fix}")
    return "; ".join(lines)
