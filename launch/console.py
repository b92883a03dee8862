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


def options_error(err) -> str:
    """A pydantic error on a command's options, phrased as the options the user typed. An error on the
    options together (no field) is the message alone: the input would be every option at once."""
    return "; ".join(
        f"--{'.'.join(str(p) for p in e['loc']).replace('_', '-')} = {e.get('input')!r}: {e['msg']}" if e["loc"] else e["msg"].removeprefix("Value error, ")
        for e in err.errors()
    )
