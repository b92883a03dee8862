"""The `lorafleet` command line."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from launch.config import ConfigError, load_job_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train many QLoRA adapters in parallel, without forgetting.")
console = Console(stderr=True)


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def train(
    job_file: Path = typer.Argument(..., help="Job YAML."),
    set_: list[str] = typer.Option([], "--set", help="Override a field, e.g. --set train.max_steps=50 (repeatable)."),
) -> None:
    """Train one adapter job (resumes if its output_dir holds a checkpoint)."""
    try:
        config = load_job_config(job_file, set_)
    except ConfigError as err:
        fail(str(err))
    from trainer import JobError, run_job

    try:
        result = run_job(config)
    except JobError as err:
        fail(str(err))
    console.print(f"adapter: {result.adapter_dir}")


# Commands of the other rooms register themselves here.

def main() -> None:
    app(prog_name="lorafleet")


if __name__ == "__main__":
    sys.exit(main())
