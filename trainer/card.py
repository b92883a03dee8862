"""The model card of a finished adapter: README.md with the YAML front matter the Hugging Face hub and
peft read (base_model, library_name, tags), and the facts of its training in prose and tables."""

from __future__ import annotations

from typing import Any

from schema.job import JobConfig
from schema.yamlfile import dump_yaml


def model_card(config: JobConfig, result: dict[str, Any], metadata: dict[str, Any], command: str | None) -> str:
    """`result` is the job's final.json; `metadata` its lorafleet.json (trainer.adapters.adapter_metadata)."""
    base = metadata["base"]
    upstream = base.get("upstream") or base.get("local_path") or base["spec"]
    front = {
        "base_model": upstream,
        "library_name": "peft",
        "pipeline_tag": "text-generation",
        "tags": list(dict.fromkeys(["lorafleet", "lora", *(["qlora"] if config.quant.bits < 16 else []), config.lora.method])),
    }
    lines = ["---", dump_yaml(front).rstrip(), "---", "", f"# {config.name}: a {_kind(config)} adapter for {upstream}", ""]
    made_by = f"Trained with lorafleet {metadata.get('lorafleet_version', '')}"
    lines += [f"{made_by} by `{command}`." if command else f"{made_by}.", ""]
    lines += ["## Base model", ""]
    lines.append(f"- Upstream: `{upstream}`.")
    source = f"the GGUF file `{base['source_file']}` (sha256 `{base['source_sha256']}`)" if base.get("source_file") else f"`{base['spec']}`"
    lines.append(f"- Trained on {source}, quantized as {metadata['precision']}.")
    lines.append(
        "- Load it with `peft.AutoPeftModelForCausalLM.from_pretrained(<this directory>)` where the upstream model is "
        "reachable, or with lorafleet, which finds the base by itself: `lorafleet generate <this directory> --prompt ...`."
    )
    lines += ["", "## Adapter", ""]
    lora = config.lora
    targets = lora.targets if isinstance(lora.targets, str) else ", ".join(lora.targets)
    extras = [name for name, on in (("rsLoRA", lora.rslora), ("DoRA", lora.dora)) if on]
    lines.append(f"{lora.method}, r {lora.r}, alpha {lora.alpha:g}, dropout {lora.dropout:g}, targets {targets}" + (f", {' and '.join(extras)}" if extras else "") + ".")
    lines += ["", "## Training", ""]
    lines += _data_lines(config)
    train, optim = config.train, config.optim
    lines.append(
        f"- {result['steps']} optimizer steps, each {train.grad_accum} micro-batch(es) of {train.micro_batch} sequences of {train.seq_len} tokens "
        f"({config.data.packing}); {result['tokens']:,} tokens trained; seed {train.seed}."
    )
    lines.append(f"- {optim.name}, lr {optim.lr:g} ({optim.schedule}, warm-up {optim.warmup_ratio:g}), gradient clipping {optim.max_grad_norm}.")
    forgetting = config.forgetting
    if forgetting.lwf is not None:
        lines.append(f"- LwF: KL to the base with weight {forgetting.lwf.weight:g} at temperature {forgetting.lwf.temperature:g} on {forgetting.lwf.on} tokens.")
    if forgetting.l2:
        lines.append(f"- L2 on the adapter weights: {forgetting.l2:g}.")
    if forgetting.rehearsal is not None:
        lines.append(f"- Rehearsal: {forgetting.rehearsal.ratio:.0%} of the tokens are the base model's own answers to `{forgetting.rehearsal.prompts}`.")
    lines += ["", "## Results", ""]
    lines.append(f"- Final train loss: {_number(result.get('train_loss'))}.")
    if result.get("eval_loss") is not None:
        chosen = f" (the adapter of step {result['selected_step']}, the lowest eval loss)" if result.get("selected_step") else ""
        lines.append(f"- Eval loss: {_number(result.get('initial_eval_loss'))} before training, {_number(result['eval_loss'])} after{chosen}.")
    metrics = {k: v for k, v in (result.get("metrics") or {}).items() if k != "eval/loss"}
    if metrics:
        lines += ["", "| metric | value |", "|---|---:|"]
        lines += [f"| {name.removeprefix('eval/')} | {_number(value)} |" for name, value in sorted(metrics.items(), key=lambda kv: (kv[0].startswith("eval/forgetting/"), kv[0]))]
        lines += ["", "`forgetting/*` compare the adapter with its own base (adapters switched off) on general prompts and tasks."]
    return "\n".join(lines) + "\n"


def _kind(config: JobConfig) -> str:
    if config.quant.bits == 16:
        return "LoRA"
    return f"QLoRA ({config.quant.bits}-bit base)"


def _data_lines(config: JobConfig) -> list[str]:
    total = sum(source.weight for source in config.data.train)
    lines = []
    for source in config.data.train:
        share = f"{source.weight / total:.0%} of the mix, " if len(config.data.train) > 1 else ""
        lines.append(f"- Data: `{source.path}` ({share}{source.format}, {source.role}{', split ' + source.split if source.split else ''}).")
    lines.append(f"- Prompt template: {config.data.template}.")
    if config.data.eval is not None:
        lines.append(f"- Eval data: `{config.data.eval.path}`.")
    return lines


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "unknown"
