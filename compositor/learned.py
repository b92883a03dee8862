"""Learned composition weights: fit wᵢ (per adapter, or per adapter and layer) by gradient descent on
a few validation examples, with the base model and every adapter frozen and an L1 penalty on w.

LoraHub (Huang et al. 2023) searches such weights gradient-free, for encoder-decoder models. Here the
weights enter the forward pass of a decoder-only model directly: every adapted linear layer gets
    y = W x + Σᵢ wᵢ · Bᵢ Aᵢ x        (scalings folded into Bᵢ)
through a forward hook, so the loss is differentiable in w and nothing else is trained. The hook
works on any base precision (fp32, int8 or NF4 layers alike).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from compositor.adapters import Adapter, AdapterError

LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class LearnedWeights:
    """The fitted weights and how the fit went. `weights` is per adapter; with per_layer it is the
    mean over layers, and `per_layer` holds one row per layer group."""

    weights: list[float]
    per_layer: dict[str, list[float]] | None
    loss_history: list[float] = field(default_factory=list)
    initial_loss: float = math.nan
    final_loss: float = math.nan

    def to_dict(self) -> dict:
        return {
            "weights": self.weights,
            "per_layer": self.per_layer,
            "initial_loss": self.initial_loss,
            "final_loss": self.final_loss,
            "steps": len(self.loss_history),
        }


def layer_group(module_name: str) -> str:
    """'layer.N' for a module inside decoder layer N, 'other' for anything outside the layer stack."""
    match = LAYER_INDEX.search(f".{module_name}.")
    return f"layer.{int(match[1])}" if match else "other"


def encode_pairs(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], responses: Sequence[str], max_len: int = 512) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels, labels -100 everywhere but the response tokens
    (and the end-of-sequence token after them, which is part of answering)."""
    rows = []
    for prompt, response in zip(prompts, responses, strict=True):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt_ids + response_ids)[-max_len:]
        labels = ([-100] * len(prompt_ids) + response_ids)[-max_len:]
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = {
        "input_ids": torch.full((len(rows), width), pad, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
        "labels": torch.full((len(rows), width), -100, dtype=torch.long),
    }
    for row, (ids, labels) in enumerate(rows):
        batch["input_ids"][row, : len(ids)] = torch.tensor(ids)
        batch["attention_mask"][row, : len(ids)] = 1
        batch["labels"][row, : len(labels)] = torch.tensor(labels)
    return batch


class WeightedAdapters:
    """Forward hooks that add Σᵢ wᵢ·BᵢAᵢx to every adapted module of `model`; w is the one trainable
    tensor, `self.weights`, of shape [layer groups, adapters] (one group unless per_layer)."""

    def __init__(self, model: torch.nn.Module, adapters: Sequence[Adapter], per_layer: bool, init: Sequence[float]):
        modules = dict(model.named_modules())
        names = sorted(set().union(*(a.modules for a in adapters)))
        missing = [name for name in names if name not in modules]
        if missing:
            raise AdapterError(f"the base model has no module {missing[0]!r} (and {len(missing) - 1} more): the adapters were made for another model")
        self.groups = sorted({layer_group(n) for n in names}, key=_group_order) if per_layer else ["all"]
        device = next(model.parameters()).device
        self.weights = torch.nn.Parameter(torch.tensor([list(init)] * len(self.groups), dtype=torch.float32, device=device))
        self._handles = []
        for name in names:
            present = [(i, a.modules[name]) for i, a in enumerate(adapters) if name in a.modules]
            A = torch.cat([u.A for _, u in present]).to(device)
            B = torch.cat([u.B for _, u in present], dim=1).to(device)
            # Which adapter each rank column belongs to: gates the concatenated ranks by wᵢ.
            owner = torch.cat([torch.full((u.rank,), i, dtype=torch.long) for i, u in present]).to(device)
            group = self.groups.index(layer_group(name)) if per_layer else 0
            self._handles.append(modules[name].register_forward_hook(self._hook(A, B, owner, group)))

    def _hook(self, A: torch.Tensor, B: torch.Tensor, owner: torch.Tensor, group: int):
        def add_update(module, inputs, output):
            x = inputs[0].to(A.dtype)
            gate = self.weights[group][owner]
            return output + (((x @ A.T) * gate) @ B.T).to(output.dtype)

        return add_update

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _group_order(name: str) -> tuple[int, int]:
    return (1, 0) if name == "other" else (0, int(name.split(".")[1]))


@contextmanager
def weighted_adapters(model: torch.nn.Module, adapters: Sequence[Adapter], per_layer: bool = False, init: Sequence[float] | None = None):
    """The model with Σᵢ wᵢ·ΔWᵢ hooked in for the duration of the block; yields the WeightedAdapters."""
    hooks = WeightedAdapters(model, adapters, per_layer, init if init is not None else [1.0 / len(adapters)] * len(adapters))
    try:
        yield hooks
    finally:
        hooks.remove()


def learn_weights(
    model: torch.nn.Module,
    adapters: Sequence[Adapter],
    batches: Sequence[dict[str, torch.Tensor]],
    *,
    per_layer: bool = False,
    steps: int = 60,
    lr: float = 0.05,
    l1: float = 0.01,
    average: str = "example",
    init: Sequence[float] | None = None,
) -> LearnedWeights:
    """Fit the mixing weights: minimise the NLL on `batches` (`average`: the mean over examples of each
    example's token mean, or the mean over all tokens) + l1·mean_groups(Σᵢ|wᵢ|) with Adam.
    The model's own parameters are frozen for the fit and restored to their previous requires_grad."""
    if not batches:
        raise AdapterError("learned weights need at least one validation example")
    frozen = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    was_training = model.training
    model.eval()  # no dropout: the loss must be a function of w alone
    device = next(model.parameters()).device
    history: list[float] = []
    try:
        with weighted_adapters(model, adapters, per_layer, init) as hooks:
            optimizer = torch.optim.Adam([hooks.weights], lr=lr)
            for _ in range(steps):
                optimizer.zero_grad()
                nll = _mean_nll(model, batches, device, average)
                penalty = l1 * hooks.weights.abs().sum(dim=1).mean()
                (nll + penalty).backward()
                optimizer.step()
                history.append(nll.item())
            with torch.no_grad():
                final = float(_mean_nll(model, batches, device, average))
            table = hooks.weights.detach().cpu()
            groups = hooks.groups
    finally:
        for name, param in model.named_parameters():
            param.requires_grad_(frozen[name])
        model.train(was_training)
    return LearnedWeights(
        weights=[float(v) for v in table.mean(dim=0)],
        per_layer={g: [float(v) for v in row] for g, row in zip(groups, table)} if per_layer else None,
        loss_history=history,
        initial_loss=history[0],
        final_loss=final,
    )


def _mean_nll(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]], device: torch.device, average: str) -> torch.Tensor:
    """NLL of the labelled tokens over all batches. `example`: each example's token mean, averaged, so a
    one-word label counts as much as a 150-token GSM8K solution (a token mean lets the longest task
    decide the weights). `token`: every token counts once, whatever its example."""
    if average not in ("example", "token"):
        raise ValueError(f"average = {average!r}; use 'example' or 'token'")
    sums, counts = [], []
    for batch in batches:
        labels = batch["labels"].to(device)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch.get("attention_mask", torch.ones_like(labels)).to(device)).logits
        shifted = labels[:, 1:]
        token_nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100, reduction="none"
        ).view(shifted.shape)
        labelled = shifted != -100
        sums.append((token_nll * labelled).sum(dim=1))
        counts.append(labelled.sum(dim=1))
    per_example_sum, per_example_count = torch.cat(sums), torch.cat(counts)
    if average == "token":
        return per_example_sum.sum() / per_example_count.sum().clamp(min=1)
    scored = per_example_count > 0
    return (per_example_sum[scored] / per_example_count[scored]).mean()
