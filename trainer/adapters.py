"""Adapters (LoRA, rsLoRA, DoRA, AdaLoRA, VeRA, from peft) on one frozen base, and LoRA+ parameter groups.

`SharedBase` holds the base model and every adapter trained on it: one adapter for a solo job, several
for a pack (see trainer.packing). Each adapter is created from its own seed, so its initial weights are
those of its solo run whichever adapters it shares the base with.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import AdaLoraConfig, LoraConfig as PeftLoraConfig, PeftModel, VeraConfig, get_peft_model, get_peft_model_state_dict, prepare_model_for_kbit_training
from safetensors.torch import save_file
from transformers import PreTrainedModel

from schema.atomic import json_text
from schema.job import TARGET_PRESETS, LoraConfig, OptimConfig, QuantConfig
from trainer.specs import adapter_base_name
from trainer.packing import AdapterRouter, DropoutClock, adapter_parameters, install_router, seed_dropout

def target_modules(lora: LoraConfig) -> list[str] | str:
    return TARGET_PRESETS[lora.targets] if isinstance(lora.targets, str) else list(lora.targets)


def routed(lora: LoraConfig) -> bool:
    """Plain LoRA (and rsLoRA) shares a batch with other adapters; DoRA, AdaLoRA and VeRA use peft's forward."""
    return lora.method == "lora" and not lora.dora


def peft_config(lora: LoraConfig, max_steps: int):
    targets = target_modules(lora)
    if lora.method == "adalora":
        return AdaLoraConfig(
            task_type="CAUSAL_LM",
            init_r=lora.adalora.init_r,
            target_r=lora.r,
            tinit=lora.adalora.tinit,
            tfinal=lora.adalora.tfinal,
            deltaT=lora.adalora.delta_t,
            total_step=max_steps,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=targets,
        )
    if lora.method == "vera":
        return VeraConfig(task_type="CAUSAL_LM", r=lora.r, vera_dropout=lora.dropout, target_modules=targets)
    return PeftLoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        use_rslora=lora.rslora,
        use_dora=lora.dora,
    )


class SharedBase:
    """One frozen base and the adapters trained on it. Adapters are named `adapter<N>` inside the model
    (peft keeps them in ModuleDicts, whose keys may not hold the dots a job name may)."""

    def __init__(self, base: PreTrainedModel, grad_checkpointing: bool):
        checkpointing = {"use_reentrant": False}  # non-reentrant: works with frozen inputs and no_grad teacher passes
        if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
            # Casts the few unquantized weights (norms) to fp32 for stable training, enables checkpointing.
            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=grad_checkpointing, gradient_checkpointing_kwargs=checkpointing)
        elif grad_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        self.base = base
        self.model: PeftModel | None = None
        self.router = AdapterRouter()
        self.adapters: list[str] = []
        self._created = 0
        self._leftover: str | None = None  # peft cannot hold zero adapters: the last one stays until the next arrives

    def add(self, lora: LoraConfig, max_steps: int, seed: int, clock: DropoutClock) -> str:
        """Create an adapter from `seed`; returns its name inside the model."""
        name = f"adapter{self._created}"
        self._created += 1
        config = peft_config(lora, max_steps)
        if config.target_modules == "all-linear":
            # peft's all-linear finds torch.nn.Linear only; on an HQQ base the quantized layers are HQQLinear.
            quantized = sorted({n.rsplit(".", 1)[-1] for n, m in self.base.named_modules() if type(m).__name__ == "HQQLinear"})
            config.target_modules = quantized or "all-linear"
        with torch.random.fork_rng(devices=[]):  # the init draws from `seed` alone and leaves the global stream as it was
            torch.manual_seed(seed)
            if self.model is None:
                self.model = get_peft_model(self.base, config, adapter_name=name)
            else:
                self.model.add_adapter(name, config)
        if self._leftover is not None:
            self.model.delete_adapter(self._leftover)
            self._leftover = None
        if routed(lora):
            install_router(self.model, self.router)
            seed_dropout(self.model, name, clock)
        self.adapters.append(name)
        self.model.base_model.set_requires_grad(self.adapters, True)
        if len(self.adapters) == 1:
            self.model.set_adapter(name)  # peft's own forward (DoRA, AdaLoRA, VeRA) applies the active adapter
            self.router.route_all(name)  # a lone adapter owns every row until a loop routes batches
        return name

    def remove(self, name: str) -> None:
        """Free an adapter's weights (a finished or failed job leaves the pack)."""
        self.adapters.remove(name)
        if self.adapters:
            self.model.delete_adapter(name)
            if self.model.active_adapter == name or name not in self.model.peft_config:
                self.model.set_adapter(self.adapters[0])
            self.model.base_model.set_requires_grad(self.adapters, True)
        else:
            self.model.base_model.set_requires_grad([name], False)
            self._leftover = name

    def parameters(self, name: str) -> list[tuple[str, torch.nn.Parameter]]:
        return adapter_parameters(self.model, name)


def parameter_groups(parameters: list[tuple[str, torch.nn.Parameter]], optim: OptimConfig, lora: LoraConfig) -> list[dict]:
    """One group for the adapter's parameters, or two under LoRA+ (B matrices at lr * plus_lr_ratio)."""
    if lora.plus_lr_ratio is None:
        return [{"params": [p for _, p in parameters], "lr": optim.lr}]
    b_matrices = [p for name, p in parameters if "lora_B" in name or "lora_embedding_B" in name]
    others = [p for name, p in parameters if not ("lora_B" in name or "lora_embedding_B" in name)]
    return [
        {"params": others, "lr": optim.lr},
        {"params": b_matrices, "lr": optim.lr * lora.plus_lr_ratio},
    ]


ADAPTER_METADATA = "lorafleet.json"


def save_adapter(model: PeftModel, name: str, directory: Path, metadata: dict) -> None:
    """One adapter of `model` as a plain PEFT directory (adapter_config.json + adapter_model.safetensors)
    that PeftModel.from_pretrained loads, plus lorafleet.json: the base it was trained on (upstream id,
    source file and sha256), its precision and the lorafleet version. peft's own save_pretrained puts every
    adapter but `default` in a sub-directory, hence this writer."""
    config = copy.copy(model.peft_config[name])
    config.base_model_name_or_path = adapter_base_name(metadata["base"])
    config.inference_mode = True
    config.save_pretrained(str(directory))
    state = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    save_file({key: value.detach().contiguous() for key, value in state.items()}, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / ADAPTER_METADATA).write_text(json_text(metadata))


def adapter_metadata(base: dict, quant: QuantConfig, job: str, template: str) -> dict:
    """What lorafleet.json records (and lorafleet reads back to load an adapter without being told its base,
    and to prompt it as it was trained: `template` is the job's data.template)."""
    return {
        "format": 1, "lorafleet_version": lorafleet_version(), "job": job, "base": base,
        "quant": quant.model_dump(mode="json"), "precision": precision_name(quant), "template": template,
    }


def precision_name(quant: QuantConfig) -> str:
    if quant.bits == 16:
        return "16-bit (no quantization)"
    if quant.method == "hqq":
        return f"{quant.bits}-bit HQQ, group size {quant.group_size}"
    if quant.bits == 8:
        return "int8 (bitsandbytes LLM.int8)"
    return f"4-bit {quant.type.upper()}" + (" with double quantization" if quant.double_quant else "") + " (bitsandbytes)"


def lorafleet_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lorafleet")
    except PackageNotFoundError:
        return "unknown"


def attach_adapter(base: PreTrainedModel, lora: LoraConfig, max_steps: int, grad_checkpointing: bool = True, seed: int = 0) -> PeftModel:
    """A single trainable adapter on `base` (what evaluation tests and tools need outside a training loop)."""
    shared = SharedBase(base, grad_checkpointing)
    shared.add(lora, max_steps, seed, DropoutClock(seed))
    return shared.model
