"""`lorafleet report`: which job of a fleet won, and what each setting cost (RUN_DIR/report/)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from launch.console import errors, fail


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report_command(
        run_dir: Path = typer.Argument(..., help="A fleet's output_dir (holds fleet.json) or a job's output_dir (holds config.yaml).", metavar="RUN_DIR"),
    ) -> None:
        """Which job won, and what each setting cost: RUN_DIR/report/ (report.md with a table, the winners and
        plots; report.json; report.csv). Works on a running fleet, and on one job's output_dir."""
        from launch.report import write_report  # loads matplotlib: only when the command runs
        from schema.problems import ConfigError

        try:
            directory, report = write_report(run_dir)
        except ConfigError as err:
            fail(err)
        for warning in report["warnings"]:
            errors.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
        console = Console()
        for criterion, text in (("eval_loss", "lowest eval loss"), ("task_gain", "highest task gain over the base")):
            best = report["winners"][criterion]
            if best is not None:
                tied = f", tied with {', '.join(best['tied_with'])}" if best["tied_with"] else ""
                console.print(f"{text}: [bold]{escape(best['label'])}[/]: {best['value']:.4g} ({best['state']}{escape(tied)})", highlight=False, soft_wrap=True)
        console.print(f"report: {directory / 'report.md'}", highlight=False, soft_wrap=True)
