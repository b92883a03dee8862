"""The `lorafleet` command line."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from launch.config import ConfigError, load_job_config
from launch.console import fail

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train many QLoRA adapters in parallel, without forgetting.")
console = Console(stderr=True)


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
    fleet_file: Path = typer.Option(Path("examples/fleet_demo.yaml"), help="The demo fleet."),
    set_: list[str] = typer.Option([], "--set", help="Override a fleet-file field (repeatable)."),
) -> None:
    """Generate the demo data and train the demo fleet: two SmolLM2-135M QLoRA adapters on two tasks,
    on an embedded local Ray cluster. The summary shows each job's eval loss before -> after."""
    from launch import cli_fleet
    from launch.demo_data import write_demo_data

    write_demo_data(Path("examples/data"))
    cli_fleet.run(fleet_file, address=None, max_concurrent=None, num_cpus=None, set_=set_)


# Commands of the other rooms register themselves here.
from launch import cli_fleet; cli_fleet.register(app)  # noqa: E402,E702
from launch import cli_eval; cli_eval.register(app)  # noqa: E402,E702
from launch import cli_compose; cli_compose.register(app)  # noqa: E402,E702

def main() -> None:
    app(prog_name="lorafleet")


if __name__ == "__main__":
    sys.exit(main())
