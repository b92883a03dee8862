"""The one way lorafleet writes a file or a directory: complete or not at all, readable by everyone.

- A file is written to a temp file beside it, fsynced, made 0644, and renamed over the target:
  readers never see half a file.
- A directory is filled under a temp name, every file in it fsynced and made 0644 (safetensors and
  mkdtemp create 0600/0700), the directory itself fsynced, then renamed into place. An existing
  directory at the target is moved aside first and removed only after the new one is in place, so a
  crash leaves the old or the new, never neither. Callers decide whether a target may be replaced
  (see `schema.outputs`); this module only makes the replacement safe.
- JSON is strict: NaN and infinities are written as null, so every other tool can read the file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

FILE_MODE, DIR_MODE = 0o644, 0o755


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def strict_json(data: Any) -> Any:
    """`data` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: strict_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(v) for v in data]
    return data


def json_text(data: Any, indent: int | None = 1) -> str:
    return json.dumps(strict_json(data), indent=indent, allow_nan=False, default=str) + "\n"


def write_json_atomic(path: str | Path, data: Any, indent: int | None = 1) -> Path:
    return write_text_atomic(path, json_text(data, indent))


def _seal(root: Path) -> None:
    """fsync every file under `root` and give files 0644 and directories 0755."""
    for directory, _, files in os.walk(root):
        os.chmod(directory, DIR_MODE)
        for name in files:
            file = Path(directory) / name
            os.chmod(file, FILE_MODE)
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_directory(target: str | Path, fill: Callable[[Path], Any], replace: bool = True) -> Path:
    """Build a directory with `fill(tmp_dir)` and rename it to `target`.

    With `replace=False` an existing target is kept (another process built the same cache entry first)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        fill(staging)
        _seal(staging)
        if not replace:
            try:
                staging.rename(target)
            except OSError:  # another process put an identical entry there first
                if not target.exists():
                    raise
            return target
        retired = target.with_name(f"{staging.name}-old")
        if target.exists():
            target.rename(retired)
        staging.rename(target)
        _fsync_dir(target.parent)
        shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
