"""Post-LoRA Restoration (PLR): put an adapter trained on a quantized base onto the base at any
precision from its training precision up, optionally merged, and measure what each choice changes.

The training precision is read from the adapter (`training_quant`); below it nothing is restored.
- 16 (PLR16): the original weights in the dtype the base model provides (fp32 for the smollm2-135m
  preset, which is dequantized from GGUF to fp32; a bf16 model stays bf16), unless a dtype is given.
- 8 (PLR8): the base re-quantized to int8 (bitsandbytes LLM.int8, row-wise absmax).
- 4 (PLR4) and 3 (PLR3) above a lower HQQ training precision: HQQ at that width, the training group size.
- the training precision itself: the training base exactly (NF4 for QLoRA adapters, HQQ 2 or 3 bits).

Merging is where tools disagree silently. Merging into the *original* W gives W + ΔW, which is not
the model the adapter was trained with: that model is deq(q(W)) + ΔW. And merging into a quantized
model re-quantizes, q(deq(q(W)) + ΔW), which loses part of ΔW. `merge_comparison` measures all three
against the unmerged adapter on its training base.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import torch
from hqq.core.quantize import HQQLinear  # peft imports hqq already: free here
from peft import PeftModel
from pydantic import ValidationError
from transformers import PreTrainedModel

from compositor.adapters import CONFIG_FILE, WEIGHTS_FILE, AdapterError, read_adapter
from schema.atomic import atomic_directory
from schema.job import QuantConfig
from schema.jobdir import JobDir
from trainer.adapters import ADAPTER_METADATA
from trainer.models import load_base_model, load_tokenizer, resolve_model_dir, uses_hqq
from trainer.specs import ModelSpecError, spec_for_adapter

PRECISIONS = (16, 8, 4, 3, 2)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# What adapters written before lorafleet.json recorded their base were trained on: QLoRA's NF4.
DEFAULT_TRAINING_QUANT = QuantConfig()


class PrecisionError(AdapterError):
    """A base precision this adapter cannot be restored to, found before any model loads."""


def base_spec_of(adapter_dir: str | Path, override: str | None = None) -> str:
    """The base model spec of an adapter (trainer.specs.spec_for_adapter), unless `override` gives one."""
    if override:
        return override
    if not (Path(adapter_dir) / CONFIG_FILE).is_file():
        raise AdapterError(f"{adapter_dir}: not a PEFT adapter directory, {CONFIG_FILE} is missing")
    try:
        return spec_for_adapter(adapter_dir)
    except ModelSpecError as err:
        raise AdapterError(str(err)) from None


def native_dtype(spec: str) -> torch.dtype:
    """The dtype the base model's own weights are stored in (config.json `dtype`/`torch_dtype`), fp32 if unstated."""
    model_dir = Path(resolve_model_dir(spec))
    config = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else {}
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name) if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype) else torch.float32


def resolve_dtype(spec: str, precision: int, dtype: str | None) -> torch.dtype:
    """16-bit: the base's own dtype unless overridden. 8, 4, 3 and 2 bits: the compute dtype of the
    quantized layers; fp32 unless overridden (bf16 matmuls on CPU are ~30x slower)."""
    if dtype is not None:
        if dtype not in DTYPES:
            raise AdapterError(f"--dtype {dtype!r} is unknown; use one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return native_dtype(spec) if precision == 16 else torch.float32


def training_quant(adapter_dir: str | Path) -> QuantConfig:
    """The quantization an adapter was trained on: lorafleet.json's "quant"; for adapters older than that
    file, the quant section of the job's config.yaml beside the adapter directory; else 4-bit NF4."""
    adapter_dir = Path(adapter_dir)
    metadata = adapter_dir / ADAPTER_METADATA
    if metadata.is_file():
        source, recorded = metadata, json.loads(metadata.read_text()).get("quant", {})
    else:
        job_dir = JobDir(adapter_dir.parent)
        saved = job_dir.saved_config()
        if saved is None:
            return DEFAULT_TRAINING_QUANT
        source, recorded = job_dir.config_file, saved.get("quant", {})
    try:
        return QuantConfig.model_validate(recorded)
    except ValidationError as err:
        raise AdapterError(
            f"{source}: its quant section does not describe a quantization ({err.errors()[0]['msg']}); fix it, or move the file aside to assume 4-bit NF4"
        ) from None


def quant_label(quant: QuantConfig) -> str:
    """A base quantization in a word: nf4, fp4, int8, hqq3, ..., or original (16 bits: the weights as stored)."""
    if uses_hqq(quant):
        return f"hqq{quant.bits}"
    return {4: quant.type, 8: "int8", 16: "original"}[quant.bits]


def restoration_precisions(trained: QuantConfig) -> tuple[int, ...]:
    """The training precision and every precision above it, lowest first."""
    return tuple(bits for bits in sorted(PRECISIONS) if bits >= trained.bits)


def restoration_quant(trained: QuantConfig, precision: int) -> QuantConfig:
    """The base that an adapter trained on `trained` is restored onto at `precision` bits (see the module
    docstring). Raises PrecisionError for a precision below the training one, before anything loads."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"base precision {precision} is not one of {', '.join(map(str, PRECISIONS))}")
    if precision < trained.bits:
        allowed = ", ".join(map(str, reversed(restoration_precisions(trained))))
        raise PrecisionError(
            f"base precision {precision} is not one of {allowed}: the adapter was trained on a {trained.bits}-bit base "
            f"({quant_label(trained)}), and a restoration keeps or raises the precision it was trained at"
        )
    if precision == trained.bits:
        return trained
    if precision in (8, 16):
        return QuantConfig(bits=precision)
    # 3 or 4 bits above HQQ 2 or 3: the same method and groups, more levels per group.
    return QuantConfig(bits=precision, method="hqq", group_size=trained.group_size)


def load_base(
    spec: str, precision: int, dtype: torch.dtype, device: torch.device | None = None, trained: QuantConfig = DEFAULT_TRAINING_QUANT
) -> PreTrainedModel:
    """The base at `precision` for an adapter trained on `trained` (restoration_quant)."""
    return load_base_model(spec, restoration_quant(trained, precision), dtype=dtype, device=device)


def load_restored(adapter_dir: str | Path, precision: int, dtype: str | None = None, base: str | None = None, device: torch.device | None = None) -> PeftModel:
    """The adapter on the base at `precision` (unmerged), in eval mode."""
    spec = base_spec_of(adapter_dir, base)
    model = load_base(spec, precision, resolve_dtype(spec, precision, dtype), device, training_quant(adapter_dir))
    restored = PeftModel.from_pretrained(model, str(adapter_dir))
    restored.eval()
    return restored


def dequantized_weight(module: torch.nn.Module) -> torch.Tensor:
    """deq(q(W)) of a bitsandbytes or HQQ layer as it sits in memory, in fp32."""
    if isinstance(module, HQQLinear):  # no .weight: a packed W_q with a scale and zero per group
        return module.dequantize().float()
    weight = getattr(module, "weight", None)
    if isinstance(module, bnb.nn.Linear4bit):
        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state).float()
    if isinstance(module, bnb.nn.Linear8bitLt):
        # LLM.int8 stores W row-wise: CB = round(127·W/absmax_row), SCB = absmax_row. After the first
        # forward pass bitsandbytes moves SCB from the weight to the layer's matmul state.
        scales = weight.SCB if weight.SCB is not None else module.state.SCB
        return bnb_functional.int8_vectorwise_dequant(weight.data, scales).float()
    raise TypeError(f"{type(module).__name__} is not a bitsandbytes or HQQ quantized layer")


def quantized_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The bitsandbytes and HQQ layers by module name; inside a PEFT-wrapped model the name of the layer
    the LoRA wraps (its `.base_layer` dropped), so names match the plain model's."""
    return {
        name.replace(".base_layer", ""): m
        for name, m in model.named_modules()
        if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt, HQQLinear))
    }


def quantization_error_table(full: PreTrainedModel, quantized: dict[int, PreTrainedModel]) -> list[dict]:
    """Per quantized linear layer: ‖W − deq(q(W))‖/‖W‖ for each given bit width (e.g. {3: hqq3, 4: nf4, 8: int8})."""
    originals = dict(full.named_modules())
    layers = {bits: quantized_layers(model) for bits, model in quantized.items()}
    names = sorted(set().union(*(set(found) for found in layers.values())), key=_natural_key)
    rows = []
    for name in names:
        W = originals[name].weight.detach().float()
        row = {"module": name, "params": W.numel()}
        for bits, found in sorted(layers.items()):
            if name in found:
                row[f"rel_err_{bits}bit"] = float((W - dequantized_weight(found[name]).to(W.device)).norm() / W.norm())
        rows.append(row)
    return rows


def summarize_errors(rows: Sequence[dict]) -> dict[str, float]:
    """Parameter-weighted mean and max of each error column."""
    summary = {}
    for column in sorted({k for row in rows for k in row if k.startswith("rel_err_")}):
        present = [row for row in rows if column in row]
        weight = sum(row["params"] for row in present)
        summary[f"{column}_mean"] = sum(row[column] * row["params"] for row in present) / weight
        summary[f"{column}_max"] = max(row[column] for row in present)
    return summary


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in name.split(".")]


def dequantized_copy(full: PreTrainedModel, quantized: PreTrainedModel) -> PreTrainedModel:
    """`full` with every layer that `quantized` quantized replaced by deq(q(W)): the exact weights
    the adapter saw during QLoRA training, in full precision. Modifies `full` in place."""
    modules = dict(full.named_modules())
    with torch.no_grad():
        for name, layer in quantized_layers(quantized).items():
            modules[name].weight.copy_(dequantized_weight(layer).to(modules[name].weight.dtype))
    return full


@dataclass
class RestoreResult:
    out: Path
    record: dict


def restore(
    adapter_dir: str | Path,
    precision: int,
    out: str | Path,
    *,
    merge: bool = False,
    dtype: str | None = None,
    base: str | None = None,
    compare_merges: bool = True,
) -> RestoreResult:
    """Apply the adapter to the base at `precision`. Without merge, `out` is the adapter (a PEFT dir, with
    its lorafleet.json when it has one) and restore.json naming the base and precision to load it on; with
    merge, `out` is a merged model directory (weights + tokenizer) that AutoModelForCausalLM.from_pretrained
    loads, and restore.json also records `merge_comparison` (unless compare_merges is off, or the adapter
    was trained unquantized): how far merging into W, into deq(q(W)) and into the quantized training base
    land from the model the adapter was trained as. A precision below the training one, and a merge into
    an HQQ base, are refused (PrecisionError) before any model loads."""
    adapter_dir, out = Path(adapter_dir), Path(out)
    adapter = read_adapter(adapter_dir)  # refuses non-LoRA or broken dirs before any model loads
    trained = training_quant(adapter_dir)
    target = restoration_quant(trained, precision)
    if merge and uses_hqq(target):
        raise PrecisionError(
            f"--merge at {precision} bits would write an HQQ model, which transformers cannot load (its HQQ loader is not "
            f"implemented here); restore without --merge (the adapter then loads onto the {quant_label(target)} base), or merge at 8 or 16"
        )
    spec = base_spec_of(adapter_dir, base)
    torch_dtype = resolve_dtype(spec, precision, dtype)
    record = {
        "adapter": str(adapter_dir),
        "adapter_sha256": adapter.fingerprint(),
        "base_model": spec,
        "base_precision": precision,
        "base_quant": quant_label(target),
        "trained_on": trained.model_dump(mode="json"),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "merged": merge,
    }

    def fill(staging: Path) -> None:
        if merge:
            restored = load_restored(adapter_dir, precision, dtype, base)
            merged = restored.merge_and_unload()
            merged.save_pretrained(staging)
            tokenizer = load_tokenizer(spec)
            tokenizer.save_pretrained(staging)
            if compare_merges and trained.bits != 16:
                record["merge_comparison"] = merge_comparison(adapter_dir, probe_ids(tokenizer), base)
            if precision == 4:
                label = quant_label(target).upper()
                record["note"] = f"merged into the {label} base and re-quantized: q(deq(q(W)) + ΔW); part of ΔW is lost (see merge_comparison)"
        else:
            # lorafleet.json keeps the training precision with the adapter: the copy restores as the original does.
            metadata = [ADAPTER_METADATA] if (adapter_dir / ADAPTER_METADATA).is_file() else []
            for name in (CONFIG_FILE, WEIGHTS_FILE, *metadata):
                shutil.copy2(adapter_dir / name, staging / name)
        (staging / "restore.json").write_text(json.dumps(record, indent=2) + "\n")

    atomic_directory(out, fill)
    return RestoreResult(out=out, record=record)


PROBE_TEXTS = ("The quick brown fox jumps over the lazy dog.", "Q: Natalia sold clips to 48 of her friends in April. How many? A:")


def probe_ids(tokenizer) -> torch.Tensor:
    """A small fixed probe batch for comparing merges (right-padded; the padding is compared too)."""
    return tokenizer(list(PROBE_TEXTS), return_tensors="pt", padding=True)["input_ids"]


def merge_comparison(adapter_dir: str | Path, input_ids: torch.Tensor, base: str | None = None) -> dict:
    """How far each way of merging an adapter trained on a quantized base q lands from the model it was
    trained as (the adapter on that base, unmerged), in fp32 on the probe `input_ids`. With q's label
    (nf4, hqq2, ...: `quant_label`) in the names:

    - `into_original`: W + ΔW (PLR16 merged);
    - `into_dequant_<q>`: deq(q(W)) + ΔW in fp32 (the trained model, merged exactly);
    - `into_<q>_requantized`: q(deq(q(W)) + ΔW), what merging into the quantized model gives.

    Reports max |Δlogit| and mean KL(reference || variant) per variant, and per layer the share of ΔW
    that re-quantization loses, ‖q(deq(qW)+ΔW) − (deq(qW)+ΔW)‖ / ‖ΔW‖.
    """
    spec = base_spec_of(adapter_dir, base)
    trained = training_quant(adapter_dir)
    trained_label = quant_label(trained)
    reference = load_restored(adapter_dir, trained.bits, "fp32", base)
    with torch.no_grad():
        reference_logits = reference(input_ids=input_ids).logits.float()
    trained_layers = quantized_layers(reference.get_base_model())
    # Exact fp32 copies of deq(qW) + ΔW per layer, taken before anything is merged.
    deltas = {
        name.removeprefix("base_model.model."): module.get_delta_weight("default").float()
        for name, module in reference.named_modules()
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {})
    }
    dequant_before = {name: dequantized_weight(layer) for name, layer in trained_layers.items()}

    variants: dict[str, PreTrainedModel] = {}
    variants["into_original"] = PeftModel.from_pretrained(load_base(spec, 16, torch.float32), str(adapter_dir)).merge_and_unload()
    deq_base = dequantized_copy(load_base(spec, 16, torch.float32), reference.get_base_model())
    variants[f"into_dequant_{trained_label}"] = PeftModel.from_pretrained(deq_base, str(adapter_dir)).merge_and_unload()
    variants[f"into_{trained_label}_requantized"] = reference.merge_and_unload()

    lost = []
    for name, layer in quantized_layers(variants[f"into_{trained_label}_requantized"]).items():
        if name in deltas:
            exact = dequant_before[name] + deltas[name]
            lost.append({"module": name, "lost_frac": float((dequantized_weight(layer) - exact).norm() / deltas[name].norm())})
    result = {"trained_on": trained_label, "probe_tokens": int(input_ids.numel()), "variants": {}, "requantization_loss": lost}
    reference_log_probs = torch.log_softmax(reference_logits, dim=-1)
    for label, model in variants.items():
        with torch.no_grad():
            logits = model.eval()(input_ids=input_ids).logits.float()
        log_probs = torch.log_softmax(logits, dim=-1)
        kl = (reference_log_probs.exp() * (reference_log_probs - log_probs)).sum(-1).mean()
        result["variants"][label] = {"max_abs_logit_diff": float((logits - reference_logits).abs().max()), "mean_kl_from_trained": float(kl)}
    if lost:
        result["requantization_loss_mean"] = sum(row["lost_frac"] for row in lost) / len(lost)
    return result
