"""How a step's gradients become an update: one process, or several under DeepSpeed ZeRO-2.

Both engines take a loss that is already normalised over the whole step (see trainer.losses), so
neither rescales for gradient accumulation.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer.checkpoint import CheckpointError


@dataclass(frozen=True)
class World:
    """This process's place among the job's workers (set by the launcher through torchrun-style env vars)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> World:
        world = cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0")))
        if world.size > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        return world

    def sum(self, value: float) -> float:
        """Sum of `value` over all workers."""
        if self.size == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(total)
        return float(total.item())

    def gather(self, value: Any) -> list[Any]:
        """`value` from every worker, in rank order (a picklable object)."""
        if self.size == 1:
            return [value]
        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


class LocalEngine:
    """One process: clip this adapter's gradients, step its optimizer and schedule, zero its gradients.
    In a pack every adapter has its own engine over its own parameters."""

    def __init__(self, parameters: list[torch.nn.Parameter], optimizer, scheduler, max_grad_norm: float | None, after_update: Callable[[int], None]):
        self.parameters, self.optimizer, self.scheduler = parameters, optimizer, scheduler
        self.max_grad_norm = max_grad_norm
        self.after_update = after_update  # AdaLoRA reallocates ranks here: it needs the gradients of this step

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def grad_norm(self) -> float:
        """The global norm of this step's gradients, before clipping (inf or NaN when they are not finite)."""
        grads = [p.grad for p in self.parameters if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))) if grads else 0.0

    def step(self, step: int) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm if self.max_grad_norm else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.after_update(step)
        self.zero_grad()
        return float(norm)

    def skip(self) -> None:
        """No update this step (its gradients were not finite); the schedule still advances with the step count."""
        self.scheduler.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        for p in self.parameters:
            p.grad = None

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any], checkpoint_dir: Path) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save_sharded_state(self, checkpoint_dir: Path) -> None:
        """Nothing is sharded in one process."""


class DeepSpeedEngine:
    """ZeRO-2 over the job's workers: optimizer state and gradients are partitioned, the 4-bit base is
    replicated (it is frozen, so it has neither). bitsandbytes optimizers are not on DeepSpeed's tested
    list, hence zero_allow_untested_optimizer; they work (measured: ZeRO-2 + PagedAdamW, 2 gloo workers)."""

    def __init__(self, model, optimizer, scheduler, max_grad_norm: float | None, micro_batch: int, grad_accum: int, dtype: torch.dtype):
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": max_grad_norm or 0.0,
            "zero_optimization": {"stage": 2},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": dtype == torch.bfloat16},
            "fp16": {"enabled": dtype == torch.float16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
        )
        # DeepSpeed unpickles its checkpoint files with weights_only=False: a planted file would run code.
        self.engine.checkpoint_engine = WeightsOnlyLoads(self.engine.checkpoint_engine)

    def backward(self, loss: torch.Tensor) -> None:
        # Our loss is already the step's token mean; DeepSpeed must not divide it by grad_accum again.
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()  # a no-op except at the accumulation boundary

    def grad_norm(self) -> float:
        """DeepSpeed has clipped and stepped at the accumulation boundary already; it reports the norm."""
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def step(self, step: int) -> float:
        return self.grad_norm()

    def skip(self) -> None:
        """DeepSpeed steps inside backward; a non-finite step there is skipped by its own overflow check."""

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict()}

    def save_sharded_state(self, checkpoint_dir: Path) -> None:
        """Every worker writes its optimizer partition; call on all workers."""
        self.engine.save_checkpoint(str(checkpoint_dir / "zero"), tag="state", exclude_frozen_parameters=True, save_latest=False)

    def load_state_dict(self, state: dict[str, Any], checkpoint_dir: Path) -> None:
        self.engine.load_checkpoint(
            str(checkpoint_dir / "zero"), tag="state", load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        self.scheduler.load_state_dict(state["scheduler"])


class WeightsOnlyLoads:
    """DeepSpeed's checkpoint engine, but `load` runs no pickled code: tensors, containers and the few
    DeepSpeed classes a ZeRO-2 checkpoint of ours holds, nothing else. Every load of DeepSpeed's
    `load_checkpoint` goes through here; saving and the rest are the wrapped engine's."""

    def __init__(self, wrapped):
        self.wrapped = wrapped

    def load(self, path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(zero_checkpoint_classes()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(
                f"{path}: refused to load ({unpickler_reason(err)}); a ZeRO shard holds only tensors and DeepSpeed's own "
                "state. Move this checkpoint aside (or use a new output_dir) and run the job again"
            ) from None

    def __getattr__(self, name: str):
        return getattr(self.wrapped, name)


def zero_checkpoint_classes() -> list:
    """The classes (besides tensors and builtin containers) that DeepSpeed's ZeRO-2 checkpoint files hold:
    torch.serialization.get_unsafe_globals_in_checkpoint of the shards our 2-worker jobs write (fp32), and
    the loss scaler fp16 uses instead (DeepSpeed's CreateLossScaler). Each is plain data, rebuilt without
    running code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, LossScaler, DynamicLossScaler, ZeroStageEnum]


def unpickler_reason(err: pickle.UnpicklingError) -> str:
    """The weights-only unpickler's own reason ("Unsupported global: GLOBAL io.open was not an allowed
    global by default"), without torch's advice to load the file unsafely."""
    for line in str(err).splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].split(". Please", 1)[0].strip()
    return str(err).splitlines()[0][:200] if str(err) else type(err).__name__
