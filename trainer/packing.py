"""Several LoRA adapters on one frozen base, each applied only to its own rows of one batch.

A pack concatenates every adapter's micro-batch along the batch dimension and runs the model once.
Each base layer (a 4-bit weight, dequantized once per call) then serves all adapters together, and
each adapter's update is added to its own rows only:

    y = base(x);   y[rows of a] += B_a A_a dropout_a(x[rows of a]) · scale_a   for each adapter a

peft keeps the adapters (one ModuleDict entry per adapter in every LoRA layer, saved and loaded in
PEFT format). Its own mixed-batch path (`adapter_names=`) is refused in training mode, gathers rows
by index lists, and adds in place into the 4-bit layer's output, so the forward of each LoRA layer is
replaced here by `_routed_forward`: contiguous row slices, one concatenation, an out-of-place add.

Dropout draws from each adapter's own seeded stream (`SeededDropout`), keyed by (seed, step,
micro-batch, layer): a packed adapter gets the masks of its solo run, and gradient checkpointing's
recomputation sees the same mask as the forward pass.

Only plain LoRA (rsLoRA included) is routed. DoRA, AdaLoRA and VeRA keep peft's own forward and
train alone (see `schema.job.pack_key`).
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer


@dataclass
class AdapterRouter:
    """Which rows of the batch now going through the model belong to which adapter."""

    segments: list[tuple[str, int, int]] = field(default_factory=list)  # (adapter, first row, end row)
    everyone: str | None = None  # one adapter for every row, whatever the batch size (evaluation, generation)

    def route(self, segments: list[tuple[str, int, int]]) -> None:
        self.segments, self.everyone = segments, None

    def route_all(self, adapter: str) -> None:
        self.segments, self.everyone = [], adapter

    def segments_for(self, rows: int) -> list[tuple[str, int, int]]:
        if self.everyone is not None:
            return [(self.everyone, 0, rows)]
        if not self.segments or self.segments[-1][2] != rows:
            raise RuntimeError(f"the router holds rows {self.segments} but the batch has {rows}; route the batch before the forward pass")
        return self.segments


def _routed_forward(layer: LoraLayer, router: AdapterRouter, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    result = layer.base_layer(x, *args, **kwargs)
    if layer.disable_adapters:  # the base model's view (LwF teacher, forgetting reference)
        return result
    deltas = []
    for adapter, start, stop in router.segments_for(x.shape[0]):
        rows = x[start:stop]
        if adapter not in layer.lora_A:  # this adapter does not target this module
            deltas.append(result.new_zeros((stop - start, *result.shape[1:])))
            continue
        lora_A, lora_B = layer.lora_A[adapter], layer.lora_B[adapter]
        rows = layer._cast_input_dtype(rows, lora_A.weight.dtype)
        deltas.append((lora_B(lora_A(layer.lora_dropout[adapter](rows))) * layer.scaling[adapter]).to(result.dtype))
    return result + (deltas[0] if len(deltas) == 1 else torch.cat(deltas))


@dataclass
class DropoutClock:
    """Where an adapter is in its training: its dropout masks are a function of this, not of a shared RNG."""

    seed: int
    step: int = 0
    micro: int = 0

    def seed_for(self, layer_index: int) -> int:
        digest = hashlib.blake2b(f"{self.seed}:{self.step}:{self.micro}:{layer_index}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") & ((1 << 63) - 1)


class SeededDropout(torch.nn.Module):
    """Inverted dropout whose mask depends only on the adapter's clock and the layer."""

    def __init__(self, p: float, clock: DropoutClock, layer_index: int):
        super().__init__()
        self.p, self.clock, self.layer_index = p, clock, layer_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        generator = torch.Generator(device=x.device)
        generator.manual_seed(self.clock.seed_for(self.layer_index))
        keep = torch.empty_like(x).bernoulli_(1.0 - self.p, generator=generator)
        return x * keep / (1.0 - self.p)


def lora_layers(model: torch.nn.Module) -> list[LoraLayer]:
    return [module for module in model.modules() if isinstance(module, LoraLayer)]


def install_router(model: PeftModel, router: AdapterRouter) -> None:
    """Route every LoRA layer of `model` (an instance attribute shadows the class's forward)."""
    for layer in lora_layers(model):
        layer.forward = functools.partial(_routed_forward, layer, router)


def seed_dropout(model: PeftModel, adapter: str, clock: DropoutClock) -> None:
    """Give `adapter` its own dropout stream in every layer it adapts."""
    for index, layer in enumerate(lora_layers(model)):
        if adapter in layer.lora_dropout:
            dropout = layer.lora_dropout[adapter]
            p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) else 0.0
            layer.lora_dropout[adapter] = SeededDropout(p, clock, index)


def adapter_parameters(model: PeftModel, adapter: str) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable tensors of one adapter (peft names them `...lora_A.<adapter>.weight`)."""
    marker = re.compile(rf"\.{re.escape(adapter)}(\.|$)")
    return [(name, p) for name, p in model.named_parameters() if marker.search(name)]
