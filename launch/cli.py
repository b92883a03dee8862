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


@app.command()
def demo(
    job_file: Path = typer.Option(Path("examples/job.yaml"), help="The demo job."),
    set_: list[str] = typer.Option([], "--set", help="Override a field (repeatable)."),
) -> None:
    """Train the demo adapter (SmolLM2-135M QLoRA on generated arithmetic) and show eval loss before and after."""
    from rich.table import Table

    from launch.demo_data import write_demo_data

    write_demo_data(Path("examples/data"))
    config = load_job_config(job_file, set_)
    from trainer import run_job

    result = run_job(config)
    table = Table(title=f"demo: {config.name}")
    for column in ("eval loss before", "eval loss after", "steps", "tokens", "wall time (s)"):
        table.add_column(column, justify="right")
    table.add_row(f"{result.initial_eval_loss:.4f}", f"{result.eval_loss:.4f}", str(result.steps), str(result.tokens), f"{result.wall_time_s:.0f}")
    Console().print(table)
    console.print(f"adapter: {result.adapter_dir}  (TensorBoard: lorafleet tb {config.output_dir} or tensorboard --logdir {config.output_dir}/tb)")


# Commands of the other rooms register themselves here.
from launch import cli_fleet; cli_fleet.register(app)  # noqa: E402,E702
from launch import cli_eval; cli_eval.register(app)  # noqa: E402,E702

def main() -> None:
    app(prog_name="lorafleet")


if __name__ == "__main__":
    sys.exit(main())
