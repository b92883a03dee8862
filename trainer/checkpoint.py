"""Atomic checkpoints: adapter, optimizer, scheduler, RNG, data position and step, in checkpoints/step-N/.

A checkpoint directory appears by a single rename of a finished temp directory, so any
`checkpoints/step-N/` that exists is complete. Temp directories left by a crash are ignored and swept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file beside it and a rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; configs and results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_directory(target: Path, fill) -> Path:
    """Build a directory with `fill(tmp_dir)` and move it to `target` in one rename. A directory already
    at `target` is moved aside first and deleted only once the new one is in place (rename cannot
    replace a non-empty directory), so a crash never leaves neither."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp creates 0700; adapters and checkpoints are for everyone to read
        fill(staging)
        retired = target.with_name(f"{staging.name}-old")
        if target.exists():
            target.rename(retired)
        staging.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def checkpoint_steps(output_dir: Path) -> list[int]:
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    steps = []
    for entry in root.iterdir():
        if entry.name.startswith("step-") and (entry / TRAINER_STATE).is_file():
            steps.append(int(entry.name.removeprefix("step-")))
    return sorted(steps)


def latest_checkpoint(output_dir: Path) -> Path | None:
    steps = checkpoint_steps(output_dir)
    return output_dir / CHECKPOINTS / f"step-{steps[-1]}" if steps else None


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: Path,
    step: int,
    model: PeftModel,
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    keep: int,
    extra_files=None,
) -> Path:
    """Write checkpoints/step-<step>/ atomically and delete all but the newest `keep`.

    `extra_files(dir)` lets a distributed engine add its own (per-rank) state into the temp directory.
    """

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp / "adapter", save_embedding_layers=False)  # embeddings are never trained
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        if extra_files is not None:
            extra_files(tmp)
        (tmp / TRAINER_STATE).write_text(json.dumps({**trainer_state, "step": step}, indent=1))

    path = atomic_directory(output_dir / CHECKPOINTS / f"step-{step}", fill)
    for old in checkpoint_steps(output_dir)[:-keep]:
        shutil.rmtree(output_dir / CHECKPOINTS / f"step-{old}", ignore_errors=True)
    for stale in [*(output_dir / CHECKPOINTS).glob(".tmp-*"), *(output_dir / CHECKPOINTS).glob(".shards-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    return path


def load_checkpoint(path: Path, model: PeftModel) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the adapter weights into `model` and restore RNG; return (trainer_state, optimizer_state)."""
    weights = load_file(path / "adapter" / "adapter_model.safetensors", device=str(next(model.parameters()).device))
    result = set_peft_model_state_dict(model, weights)
    missing_adapter_keys = [k for k in result.missing_keys if "lora_" in k or "vera_" in k]
    if missing_adapter_keys:
        raise RuntimeError(f"{path}: adapter checkpoint lacks {missing_adapter_keys[:3]}")
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=False)
    restore_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return trainer_state, optimizer_state


# Fields that do not change a job's results: a resumed run may differ in these.
RESULT_NEUTRAL_FIELDS = ("name", "output_dir", "resources", "checkpoint", "eval", "train.log_every")


def results_changing_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'field: checkpoint has X, config has Y' for each field outside RESULT_NEUTRAL_FIELDS that differs."""
    diffs: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if prefix in RESULT_NEUTRAL_FIELDS:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        elif a != b:
            diffs.append(f"{prefix}: checkpoint has {a!r}, config has {b!r}")

    walk(saved, current, "")
    return diffs
