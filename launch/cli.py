"""The `lorafleet` command line.

Each command imports what it needs when it runs, so `--help`, `status` and `check` answer without
loading torch, transformers or Ray.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

import trainer  # noqa: F401  (light; installs the filter for bitsandbytes' import-time notice before anything imports it)
from launch.console import fail

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train many QLoRA adapters in parallel, without forgetting.")

# How --help names what an option takes: words, not typer's Python annotations (<list[str]>, <bool>).
READABLE_TYPES = {"str": "TEXT", "int": "INTEGER", "float": "NUMBER", "path": "PATH", "file": "FILE", "directory": "DIR"}


def _readable_type(parameter, ctx) -> str | None:
    if parameter.metavar is not None:
        return parameter.metavar
    if getattr(parameter, "is_flag", False):
        return None  # a flag takes no value
    label = type(parameter).display_type(parameter, ctx).strip("<>")
    many = label.startswith("list[")
    word = READABLE_TYPES.get(label.removeprefix("list[").removesuffix("]").lower(), label.upper())
    return word + ("..." if many else "")


typer.core.TyperOption.display_type_rich = _readable_type
typer.core.TyperArgument.display_type_rich = _readable_type

EXIT_JOB_FAILED, EXIT_INTERRUPTED = 1, 130


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"lorafleet {version('lorafleet')}")
        except PackageNotFoundError:
            typer.echo("lorafleet (not installed as a package)")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Train many QLoRA adapters in parallel, without forgetting."""


@app.command()
def train(
    job_file: Path = typer.Argument(..., help="Job YAML.", metavar="JOB.yaml"),
    set_: list[str] = typer.Option([], "--set", help="Override a field, e.g. --set train.max_steps=50 (repeatable).", metavar="KEY=VALUE"),
) -> None:
    """Train one adapter job (resumes if its output_dir holds a checkpoint)."""
    from schema.problems import ConfigError
    from trainer.checks import load_checked_job

    try:
        config = load_checked_job(job_file, set_)
    except ConfigError as err:
        fail(err)
    from trainer.errors import JobError, JobInterrupted
    from trainer.loop import run_job

    try:
        result = run_job(config)
    except JobError as err:
        fail(err, code=EXIT_JOB_FAILED)
    except JobInterrupted as err:
        fail(err, code=EXIT_INTERRUPTED)
    from rich.console import Console

    Console().print(training_summary(result))


def training_summary(result):
    """What a finished job amounts to, in a few lines: steps, tokens, time, eval loss before -> after, the
    task and forgetting metrics, and where the adapter is."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="trained", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    resumed = f" (resumed at step {result.resumed_from_step})" if result.resumed_from_step else ""
    minutes, seconds = divmod(int(round(result.wall_time_s)), 60)
    table.add_row("steps", f"{result.steps}{resumed}")
    table.add_row("tokens", f"{result.tokens:,} in {minutes}:{seconds:02d} ({result.tokens / max(result.wall_time_s, 1e-9):,.0f} tokens/s)")
    if result.eval_loss is not None:
        before = f"{result.initial_eval_loss:.4f} -> " if result.initial_eval_loss is not None else ""
        chosen = f" (step {result.selected_step}, the lowest)" if result.selected_step else ""
        table.add_row("eval loss", f"{before}{result.eval_loss:.4f}{chosen}")
    for name, value in sorted(result.metrics.items(), key=lambda kv: (kv[0].startswith("eval/forgetting/"), kv[0])):
        if name != "eval/loss":
            table.add_row(escape(name.removeprefix("eval/")), f"{value:.4g}")
    table.add_row("adapter", escape(str(result.adapter_dir)))
    return table


@app.command()
def check(
    config_file: Path = typer.Argument(..., help="A fleet or job YAML.", metavar="FLEET_OR_JOB.yaml"),
    set_: list[str] = typer.Option([], "--set", help="Override a field, as for run and train (repeatable).", metavar="KEY=VALUE"),
    show_config: bool = typer.Option(True, "--config/--no-config", help="Print each job's resolved config."),
) -> None:
    """A dry run: every job's resolved config, its data (rows and tokens), where it would run, and every
    problem. Loads no model and starts nothing."""
    from launch.cli_check import check_command

    check_command(config_file, set_, show_config)


@app.command()
def demo(
    fleet_file: Path = typer.Option(Path("examples/fleet_demo.yaml"), help="The demo fleet.", metavar="FLEET.yaml"),
    set_: list[str] = typer.Option([], "--set", help="Override a fleet-file field (repeatable).", metavar="KEY=VALUE"),
) -> None:
    """Generate the demo data and train the demo fleet on an embedded local Ray cluster. The summary
    shows each job's eval loss before -> after."""
    from launch import cli_fleet
    from launch.demo_data import write_demo_data

    write_demo_data(Path("examples/data"))
    cli_fleet.run(fleet_file, address=None, max_concurrent=None, num_cpus=None, set_=set_)


# Commands of the other rooms register themselves here.
from launch import cli_fleet; cli_fleet.register(app)  # noqa: E402,E702
from launch import cli_eval; cli_eval.register(app)  # noqa: E402,E702
from launch import cli_compose; cli_compose.register(app)  # noqa: E402,E702
from launch import cli_report; cli_report.register(app)  # noqa: E402,E702
from launch import cli_generate; cli_generate.register(app)  # noqa: E402,E702


def main() -> None:
    """The console entry point: records the command line for the model cards of the adapters it trains."""
    import os
    import shlex

    os.environ.setdefault("LORAFLEET_COMMAND", shlex.join(["lorafleet", *sys.argv[1:]]))
    app(prog_name="lorafleet")


if __name__ == "__main__":
    sys.exit(main())
