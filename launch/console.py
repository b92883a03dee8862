"""How every lorafleet command reports bad input: one red line on stderr, then exit code 2."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

EXIT_BAD_INPUT = 2
errors = Console(stderr=True)


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)
