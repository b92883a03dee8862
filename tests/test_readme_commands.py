"""Every `lorafleet` command line in the README's and docs' shell blocks names a real command and real
options, with values of the right type: the CLI parses each one as written (nothing runs). The slow test
runs the README from a fresh clone, command after command, the way a new user would."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer

from launch.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCK = re.compile(r"```(?:bash|sh|console)\n(.*?)```", re.S)


def shell_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, command) of every line of the file's bash blocks."""
    text = path.read_text()
    found = []
    for block in SHELL_BLOCK.finditer(text):
        first_line = text.count("\n", 0, block.start(1)) + 1
        for offset, line in enumerate(block.group(1).splitlines()):
            if line.strip():
                found.append((first_line + offset, line.strip()))
    return found


LORAFLEET_LINES = [
    pytest.param(line, id=f"{path.name}:{number}")
    for path in DOCS
    for number, line in shell_lines(path)
    if line.startswith("lorafleet ")
]


def test_the_docs_show_lorafleet_commands():
    assert len(LORAFLEET_LINES) >= 15


@pytest.mark.parametrize("line", LORAFLEET_LINES)
def test_every_documented_command_parses(line):
    group = typer.main.get_command(app)
    args = shlex.split(line, comments=True)[1:]
    parent = click.Context(group, info_name="lorafleet")
    command = group.get_command(parent, args[0])
    assert command is not None, f"{line!r}: no command {args[0]!r}"
    try:
        command.make_context(args[0], args[1:], parent=parent)
    except click.UsageError as err:
        pytest.fail(f"{line!r}: {err.format_message()}")


def readme_commands() -> list[str]:
    """The README's shell lines in order, the two set-up commands first."""
    return [line for _, line in shell_lines(ROOT / "README.md")]


@pytest.mark.slow
def test_the_readme_runs_as_written_from_a_fresh_clone(tmp_path):
    """`git clone`, then every line of the README's shell blocks, in order, each exiting 0 (the ones that
    serve forever, `lorafleet tb`, must still be serving after 20 s). Takes about half an hour on 2 cores."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    # The clone shares this checkout's venv: installing one is what `make` does, and is tested by CI.
    os.symlink(ROOT / ".venv", clone / ".venv")
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}", "COLUMNS": "160"}
    for line in readme_commands():
        command = line.split("#")[0].strip()
        if command.startswith("lorafleet tb"):
            server = subprocess.Popen(shlex.split(command) + ["--port", "6123"], cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            try:
                assert server.wait(timeout=20) is None
            except subprocess.TimeoutExpired:
                pass  # still serving, as it should
            finally:
                server.terminate()
                server.wait(timeout=30)
            continue
        done = subprocess.run(command, shell=True, cwd=clone, env=env, capture_output=True, text=True, timeout=3600)
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert (clone / "runs" / "fleet_demo" / "report" / "report.md").is_file()
    assert sys.executable  # the suite's own interpreter ran the parse test above; this one ran the CLI
