"""Helpers every benchmark needs: a description of the machine it ran on, and atomic result files."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() where that file is missing)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine_description() -> dict[str, Any]:
    """CPU model, core count, torch version and the device the benchmark computes on (the GPU's name on CUDA)."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "os": f"{platform.system()} {platform.machine()}",
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "device": "cuda" if cuda else "cpu",
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "python": platform.python_version(),
    }


def describe(machine: dict[str, Any]) -> str:
    """One line for a markdown report."""
    device = f"GPU {machine['gpu']}" if machine.get("gpu") else "CPU only, no GPU"
    return f"{machine['os']}, {machine['cpu_cores']} CPU cores ({machine['cpu']}), {device}, torch {machine['torch']}"


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file in the same directory and a rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(text)
    os.chmod(handle.name, 0o644)  # NamedTemporaryFile creates 0600; results are for everyone to read
    os.replace(handle.name, path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=1) + "\n")
