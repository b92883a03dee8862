"""Checkpoints: checkpoints/step-N/ holds everything a job needs to continue exactly.

```
step-N/
  adapter/             the adapter weights (PEFT format)
  optimizer.pt         optimizer and schedule state: tensors and numbers only (read with weights_only=True)
  rng.safetensors      torch's RNG states (read without pickle)
  rng.json             Python's and NumPy's RNG states
  trainer_state.json   step, tokens, time, last losses and eval metrics, data position
  manifest.json        size and sha256 of every file above; written last
  shards/              (2-worker jobs) DeepSpeed's ZeRO partitions, also in the manifest
```

A checkpoint appears by one rename of a finished, fsynced temp directory, so a `step-N/` that exists
was complete when written. The manifest catches what happened after: a truncated or altered file makes
the checkpoint corrupt, and a resume moves it aside (to `corrupt-step-N`, never deleted) and takes the
previous one. Nothing is ever unpickled from a checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from schema.atomic import atomic_directory, json_text
from schema.jobdir import JobDir

log = logging.getLogger("lorafleet.trainer")

TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
CORRUPT_PREFIX = "corrupt-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names it and the way out."""


def checkpoint_steps(job_dir: JobDir) -> list[int]:
    """Steps of the complete (manifested) checkpoints, oldest first."""
    if not job_dir.checkpoints.is_dir():
        return []
    steps = []
    for entry in job_dir.checkpoints.iterdir():
        if entry.name.startswith("step-") and (entry / MANIFEST).is_file() and entry.name.removeprefix("step-").isdigit():
            steps.append(int(entry.name.removeprefix("step-")))
    return sorted(steps)


def step_dir(job_dir: JobDir, step: int) -> Path:
    return job_dir.checkpoints / f"step-{step}"


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON) of every RNG a step can draw from."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    numbers = {"python": _to_lists(random.getstate()), "numpy": [kind, keys.tolist(), position, has_gauss, gauss]}
    return tensors, numbers


def restore_rng_state(tensors: dict[str, torch.Tensor], numbers: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda{i}"] for i in range(len(tensors) - 1) if f"cuda{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(_to_tuples(numbers["python"]))
    kind, keys, position, has_gauss, gauss = numbers["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _to_tuples(value: Any) -> Any:
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (directory / MANIFEST).write_text(json.dumps({"format": 1, "files": manifest}, indent=1))


def verify(directory: Path) -> str | None:
    """Why the checkpoint at `directory` cannot be trusted, or None when every file matches its manifest."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its {MANIFEST} is unreadable ({type(err).__name__})"
    for name, expected in manifest.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {expected['bytes']}"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    extra = [str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST and str(p.relative_to(directory)) not in manifest]
    if extra:
        return f"it holds files the manifest does not list ({', '.join(sorted(extra)[:3])})"
    return None


@dataclass
class Resume:
    """The checkpoint a job continues from, and the ones found corrupt on the way (moved aside)."""

    path: Path | None
    corrupt: list[str]

    @property
    def step(self) -> int | None:
        return int(self.path.name.removeprefix("step-")) if self.path is not None else None


def find_resume(job_dir: JobDir) -> Resume:
    """The newest checkpoint that verifies. Newer ones that do not are renamed `corrupt-step-N` (kept,
    for a human to look at) and named in the log."""
    corrupt = []
    for step in reversed(checkpoint_steps(job_dir)):
        path = step_dir(job_dir, step)
        problem = verify(path)
        if problem is None:
            return Resume(path, corrupt)
        aside = job_dir.checkpoints / f"{CORRUPT_PREFIX}{path.name}"
        suffix = 1
        while aside.exists():
            aside, suffix = job_dir.checkpoints / f"{CORRUPT_PREFIX}{path.name}.{suffix}", suffix + 1
        path.rename(aside)
        log.warning("checkpoint %s is corrupt (%s); moved it to %s and trying the one before", path, problem, aside)
        corrupt.append(f"{path}: {problem} (moved to {aside.name})")
    return Resume(None, corrupt)


def save_checkpoint(
    job_dir: JobDir,
    step: int,
    adapter_state: Callable[[Path], None],
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    keep: int,
    extra_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoints/step-<step>/ atomically and keep only the newest `keep`.

    `adapter_state(dir)` writes the adapter (PEFT format) into dir; `extra_files(dir)` lets a distributed
    engine add its own (per-rank) state. A full disk fails with the disk, the space needed and what is
    left intact named."""

    def fill(tmp: Path) -> None:
        adapter_state(tmp / "adapter")
        torch.save(optimizer_state, tmp / "optimizer.pt")
        tensors, numbers = rng_state()
        save_file(tensors, str(tmp / "rng.safetensors"))
        (tmp / "rng.json").write_text(json.dumps(numbers))
        if extra_files is not None:
            extra_files(tmp)
        (tmp / TRAINER_STATE).write_text(json_text({**trainer_state, "step": step}))  # strict: an unknown loss is null
        _write_manifest(tmp)

    target = step_dir(job_dir, step)
    try:
        atomic_directory(target, fill)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise CheckpointError(_disk_full_message(job_dir, target)) from None
    prune(job_dir, keep)
    return target


def _disk_full_message(job_dir: JobDir, target: Path) -> str:
    previous = checkpoint_steps(job_dir)
    needed = sum(p.stat().st_size for p in step_dir(job_dir, previous[-1]).rglob("*") if p.is_file()) if previous else None
    usage = shutil.disk_usage(job_dir.checkpoints)
    mount = _mount_point(job_dir.checkpoints)
    kept = f"the previous checkpoint {step_dir(job_dir, previous[-1])} is intact and resumable" if previous else "no earlier checkpoint exists"
    return (
        f"the disk at {mount} is full: writing {target} needs about {needed or 'an unknown number of'} bytes "
        f"(the size of the last checkpoint) and {usage.free} bytes are free; {kept}. "
        "Free space or move output_dir, then run the job again to resume"
    )


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def prune(job_dir: JobDir, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and temp directories a crash left behind."""
    if not job_dir.checkpoints.is_dir():
        return
    for stale in [*job_dir.checkpoints.glob(".tmp-*"), *job_dir.checkpoints.glob(".shards-*"), *job_dir.checkpoints.glob(".pruned-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    for old in checkpoint_steps(job_dir)[:-keep]:
        # Out of the step-* names first: a process killed halfway through the delete leaves no partial step-N.
        retired = step_dir(job_dir, old).rename(job_dir.checkpoints / f".pruned-step-{old}")
        shutil.rmtree(retired, ignore_errors=True)


def load_checkpoint(path: Path, model: PeftModel, adapter_name: str = "default") -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the adapter weights into `model` and restore RNG; return (trainer_state, optimizer_state).
    Only tensors and JSON are read: no pickle runs."""
    weights = load_file(path / "adapter" / "adapter_model.safetensors", device=str(next(model.parameters()).device))
    result = set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
    missing_adapter_keys = [k for k in result.missing_keys if ("lora_" in k or "vera_" in k) and f".{adapter_name}." in k]
    if missing_adapter_keys:
        raise CheckpointError(f"{path}: the adapter checkpoint lacks {missing_adapter_keys[:3]}")
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    try:
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    except Exception as err:  # an unpickler refusal: the file holds objects, not just tensors
        raise CheckpointError(f"{path / 'optimizer.pt'}: refused to load ({type(err).__name__}: {str(err).splitlines()[0][:200]}); only tensors and numbers are read") from None
    restore_rng_state(load_file(path / "rng.safetensors"), json.loads((path / "rng.json").read_text()))
    return trainer_state, optimizer_state
