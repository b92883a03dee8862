"""Where a command may write: never over a file or directory that lorafleet did not write.

A directory is ours when it holds the marker file of one of our outputs (a job's config.yaml or
final.json, a composition's compose.json, a restore's restore.json, a fleet's fleet.json, a report's
report.json, a PLR run's plr.json, an evaluation's matrix.json, a prior dataset's prior.json). A command replaces one of ours only when asked to (--overwrite);
anything else in the way is refused with a named problem, before any work starts.
"""

from __future__ import annotations

from pathlib import Path

from schema.problems import Problem

OUTPUT_MARKERS = ("final.json", "config.yaml", "compose.json", "restore.json", "fleet.json", "report.json", "plr.json", "matrix.json", "prior.json")


def is_ours(directory: Path) -> bool:
    return any((directory / marker).is_file() for marker in OUTPUT_MARKERS)


def output_problem(
    path: str | Path,
    *,
    option: str = "--out",
    overwrite: bool = False,
    inputs: tuple[str | Path, ...] = (),
    location: tuple = (),
) -> Problem | None:
    """Why `path` cannot receive a new output, or None when it can (missing, empty, or ours and `overwrite`)."""
    path = Path(path)
    shown = f"{option} {str(path)!r}" if not location else ""  # a located problem shows the value itself
    resolved = path.resolve()
    for source in inputs:
        source_path = Path(source).resolve()
        if resolved == source_path or source_path.is_relative_to(resolved) or resolved.is_relative_to(source_path):
            return Problem.at(
                location,
                str(path),
                f"{shown + ' ' if shown else ''}is, holds or is inside the input {source}; writing there would destroy it",
                fix="choose an output directory apart from the inputs",
            )
    if path.is_file() or (path.exists() and not path.is_dir()):
        return Problem.at(location, str(path), f"{shown + ' ' if shown else ''}names an existing file, not a directory", fix="choose a directory path")
    if not path.is_dir() or not any(path.iterdir()):
        return None
    if not is_ours(path):
        return Problem.at(
            location,
            str(path),
            f"{shown + ' ' if shown else ''}is a non-empty directory that lorafleet did not write (no {', '.join(OUTPUT_MARKERS[:3])}, ...); "
            "lorafleet never replaces files it did not write",
            fix="choose a new or empty directory",
        )
    if not overwrite:
        return Problem.at(
            location,
            str(path),
            f"{shown + ' ' if shown else ''}already holds an earlier lorafleet output",
            fix="pass --overwrite to replace it, or choose a new directory",
        )
    return None


def cache_root() -> Path:
    """Where lorafleet keeps what it can rebuild: converted models, token caches, rehearsal data.
    $LORAFLEET_CACHE, else ~/.cache/lorafleet."""
    import os

    return Path(os.environ.get("LORAFLEET_CACHE", Path.home() / ".cache" / "lorafleet"))
