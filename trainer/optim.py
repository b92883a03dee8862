"""Optimizers (bitsandbytes paged / 8-bit AdamW, torch AdamW) and warm-up + decay schedules."""

from __future__ import annotations

import functools
import logging
import math
import warnings

import bitsandbytes as bnb
import torch
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from schema.job import OptimConfig

OPTIMIZERS = {
    "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
    "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    "adamw_8bit": bnb.optim.AdamW8bit,
    "adamw": torch.optim.AdamW,
}


def build_optimizer(param_groups: list[dict], optim: OptimConfig) -> torch.optim.Optimizer:
    if optim.name.startswith("paged_") and not torch.cuda.is_available():
        _explain_paging_on_cpu()
    return OPTIMIZERS[optim.name](param_groups, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)


@functools.cache
def _explain_paging_on_cpu() -> None:
    """Said once per process instead of bitsandbytes' warning at every optimizer state it creates."""
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    logging.getLogger("lorafleet.trainer").info(
        "paged AdamW on a CPU: bitsandbytes pages optimizer state between GPU and CPU memory only, so here it stays in memory (same results)"
    )


def warmup_steps(optim: OptimConfig, max_steps: int) -> int:
    return math.ceil(optim.warmup_ratio * max_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, max_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    warmup = warmup_steps(optim, max_steps)
    if optim.schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, max_steps)
    if optim.schedule == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, max_steps)
    return get_constant_schedule_with_warmup(optimizer, warmup)
