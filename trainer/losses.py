"""The job's loss: response-token cross-entropy, plus optional LwF distillation and L2 on the adapter.

Every term is a *sum* over tokens divided by `token_count`, the number of labelled tokens in the whole
accumulated (and, with several workers, global) batch. Summing the micro-batch losses of one step
therefore gives the true token mean, not a mean of per-micro-batch means.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import PeftModel

from schema.job import ForgettingConfig
from trainer.evaluation.generation import adapters_off

MODEL_INPUTS = ("input_ids", "position_ids", "attention_mask")


@dataclass
class LossTerms:
    total: torch.Tensor
    task: torch.Tensor
    kl: torch.Tensor
    l2: torch.Tensor


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Token t's logits predict token t+1: targets are the labels shifted left, -100 at the end."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def token_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    targets = shifted_targets(labels)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")


def distillation_kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Σ over masked positions of KL(p_teacher^T ‖ p_student^T), scaled by T² (Hinton et al.)."""
    student = F.log_softmax(student_logits[mask].float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[mask].float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="sum")
    return kl * temperature**2


def adapter_l2_sum(parameters: list[torch.nn.Parameter]) -> torch.Tensor:
    return sum(p.float().pow(2).sum() for p in parameters)


def adalora_orthogonality(parameters: list[tuple[str, torch.nn.Parameter]]) -> torch.Tensor:
    """AdaLoRA's orthogonal regularizer ‖PPᵀ − I‖_F averaged over its matrices. peft adds it only when the
    model computes its own loss from `labels`; we compute the loss ourselves, so we add it here."""
    terms = []
    for name, p in parameters:
        if "lora_A" in name or "lora_B" in name:
            gram = p @ p.T if "lora_A" in name else p.T @ p
            terms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)))
    return torch.stack(terms).mean()


def loss_terms(
    logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
    token_count: float,
    forgetting: ForgettingConfig,
    *,
    teacher_logits: torch.Tensor | None = None,
    parameters: list[tuple[str, torch.nn.Parameter]] = (),
    micro_batches_per_step: int = 1,
    adalora_reg_weight: float = 0.0,
) -> LossTerms:
    """Loss terms of one adapter's micro-batch, from the logits of its rows. Token terms are normalised by
    `token_count` (see module docstring); parameter penalties (L2 and AdaLoRA over the adapter's
    `parameters`) are split evenly over the step's micro-batches. `teacher_logits` (the same rows with
    adapters off) are needed when LwF is on."""
    task = token_cross_entropy_sum(logits, batch["labels"]) / token_count
    zero = task.new_zeros(())
    kl = zero
    lwf = forgetting.lwf
    if lwf is not None and lwf.weight > 0:
        mask = shifted_targets(batch["labels"]) != -100
        if lwf.on != "all" and "rehearsal_mask" in batch:
            rehearsal = batch["rehearsal_mask"].bool()
            mask = mask & (rehearsal if lwf.on == "rehearsal" else ~rehearsal)
        kl = distillation_kl_sum(logits, teacher_logits, mask, lwf.temperature) / token_count
    l2 = adapter_l2_sum([p for _, p in parameters]) if forgetting.l2 > 0 else zero
    penalty = forgetting.l2 * l2
    if adalora_reg_weight > 0:
        penalty = penalty + adalora_reg_weight * adalora_orthogonality(list(parameters))
    total = task + (lwf.weight * kl if lwf is not None else zero) + penalty / micro_batches_per_step
    return LossTerms(total=total, task=task, kl=kl.detach(), l2=l2.detach())


def needs_teacher(forgetting: ForgettingConfig) -> bool:
    return forgetting.lwf is not None and forgetting.lwf.weight > 0


def compute_loss(
    model: PeftModel,
    batch: dict[str, torch.Tensor],
    token_count: float,
    forgetting: ForgettingConfig,
    micro_batches_per_step: int = 1,
    adalora_reg_weight: float = 0.0,
) -> LossTerms:
    """`loss_terms` of one micro-batch through `model` with its active adapter: the forward pass, and
    the teacher pass with the adapter switched off (no second model in memory) when LwF is on."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    logits = model(**inputs).logits
    teacher_logits = None
    if needs_teacher(forgetting):
        with torch.no_grad(), adapters_off(model):
            teacher_logits = model(**inputs).logits
    parameters = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return loss_terms(
        logits, batch, token_count, forgetting, teacher_logits=teacher_logits, parameters=parameters,
        micro_batches_per_step=micro_batches_per_step, adalora_reg_weight=adalora_reg_weight,
    )
