"""lorafleet trainer: adapter jobs on one shared frozen base (`run_pack`; `run_job` is a pack of one).
Never imports ray.

The names below load lazily, so that importing a light module of the trainer (errors, checks) does not
import torch. Importing the package also silences one library line that reads like a broken install.
"""

from __future__ import annotations

import logging
import warnings
from importlib import import_module


def _drop_missing_kernels_notice(record: logging.LogRecord) -> bool:
    # bitsandbytes warns at import, on every CPU with AVX512-BF16, that the optional `kernels` package is
    # missing. Its fused kernel is an inference layout without autograd, which lorafleet turns off anyway
    # (trainer.models.load_base_model), so the line says nothing a user can act on.
    return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_missing_kernels_notice)
# transformers 5 renamed gradient checkpointing to activation checkpointing; peft (0.21) still calls the old
# names at every adapter creation. The warning is peft's to act on, not the user's.
warnings.filterwarnings("ignore", message=r"`(gradient_checkpointing_enable|is_gradient_checkpointing)` is deprecated", category=FutureWarning)

_EXPORTS = {
    "JobError": "trainer.errors",
    "JobResult": "trainer.loop",
    "run_job": "trainer.loop",
    "run_pack": "trainer.loop",
    "evaluate_loss": "trainer.loop",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
