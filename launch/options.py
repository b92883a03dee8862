"""Options that take several values, `--adapters A B C`, which click options cannot (each takes one)."""

from __future__ import annotations

import re

import click
import typer
from typer.core import TyperCommand

NUMBER = re.compile(r"-\d|-\.\d")
LIST_OPTIONS = ("--adapters", "--weights")


def join_option_values(args: list[str], list_options: tuple[str, ...]) -> list[str]:
    """`--adapters A B C` as `--adapters A,B,C`: the values after a list option, up to the next option,
    joined with commas (a negative number is a value, not an option)."""
    joined: list[str] = []
    tokens = iter(args)
    pending: list[str] | None = None
    for token in tokens:
        if pending is not None and (not token.startswith("-") or NUMBER.match(token)):
            pending.append(token)
            continue
        if pending:
            joined.append(",".join(pending))
        pending = [] if token in list_options else None
        joined.append(token)
        if token == "--":  # everything after it is positional
            joined.extend(tokens)
            break
    if pending:
        joined.append(",".join(pending))
    return joined


def refuse_empty_list_options(args: list[str], list_options: tuple[str, ...]) -> None:
    """A list option followed by another option or nothing: click would take the next option's name as
    its value (`--adapters --out mix` reads as --adapters '--out', then reports --out missing)."""
    for position, token in enumerate(args):
        if token == "--":
            return
        following = args[position + 1] if position + 1 < len(args) else None
        if token in list_options and (following is None or (following.startswith("-") and not NUMBER.match(following))):
            raise typer.BadParameter(f"needs at least one value, e.g. {token} A B", param_hint=f"'{token}'")


class ListOptionsCommand(TyperCommand):
    """A command whose --adapters and --weights take several values (`--weights 0.5 0.3 0.2`), as click
    options take one each; the comma-joined and repeated forms work as well."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        refuse_empty_list_options(args, LIST_OPTIONS)
        return super().parse_args(ctx, join_option_values(args, LIST_OPTIONS))


def split_list_option(values: list[str]) -> list[str]:
    """The items of a list option as given: `A B C`, `A,B,C` or repeated, in order."""
    return [item for value in values for item in value.split(",") if item]
