"""What every benchmark report names: the machine it ran on; and how its plot is written (atomically,
as every result is: schema.atomic)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from schema.atomic import write_bytes_atomic


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


def save_png(figure: Any, path: str | Path, dpi: int = 110) -> Path:
    """Write a matplotlib figure to `path` as a PNG, atomically, and close it."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    return write_bytes_atomic(path, buffer.getvalue())
