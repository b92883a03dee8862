"""lorafleet trainer: one QLoRA adapter job (`run_job`). Never imports ray.

The names below load lazily, so that reading a config (trainer.config) does not import torch.
"""

from __future__ import annotations

from importlib import import_module

__all__ = ["JobError", "JobResult", "evaluate_loss", "run_job"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(import_module("trainer.loop"), name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
