"""Attach a peft adapter (LoRA, rsLoRA, DoRA, AdaLoRA, VeRA) to a frozen base, and LoRA+ parameter groups."""

from __future__ import annotations

from peft import AdaLoraConfig, LoraConfig as PeftLoraConfig, PeftModel, VeraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import PreTrainedModel

from trainer.config import LoraConfig, OptimConfig

TARGET_PRESETS: dict[str, list[str] | str] = {
    "qv": ["q_proj", "v_proj"],
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "all-linear": "all-linear",  # peft's own preset: every linear layer but the output head
}


def target_modules(lora: LoraConfig) -> list[str] | str:
    return TARGET_PRESETS[lora.targets] if isinstance(lora.targets, str) else list(lora.targets)


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


def attach_adapter(
    base: PreTrainedModel, lora: LoraConfig, max_steps: int, grad_checkpointing: bool = True, base_name: str | None = None
) -> PeftModel:
    """Wrap the frozen base in a trainable adapter. `base_name` goes into adapter_config.json."""
    checkpointing = {"use_reentrant": False}  # non-reentrant: works with frozen inputs and no_grad teacher passes
    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        # Casts the few unquantized weights (norms) to fp32 for stable training, enables checkpointing.
        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=grad_checkpointing, gradient_checkpointing_kwargs=checkpointing
        )
    elif grad_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    config = peft_config(lora, max_steps)
    if base_name is not None:
        config.base_model_name_or_path = base_name
    model = get_peft_model(base, config)
    if base_name is not None:
        model.peft_config["default"].base_model_name_or_path = base_name
    return model


def parameter_groups(model: PeftModel, optim: OptimConfig, lora: LoraConfig) -> list[dict]:
    """One group for the trainable parameters, or two under LoRA+ (B matrices at lr * plus_lr_ratio)."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if lora.plus_lr_ratio is None:
        return [{"params": [p for _, p in trainable], "lr": optim.lr}]
    b_matrices = [p for name, p in trainable if "lora_B" in name or "lora_embedding_B" in name]
    others = [p for name, p in trainable if not ("lora_B" in name or "lora_embedding_B" in name)]
    return [
        {"params": others, "lr": optim.lr},
        {"params": b_matrices, "lr": optim.lr * lora.plus_lr_ratio},
    ]
