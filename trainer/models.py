"""Load the base model quantized (bitsandbytes) or not, converting a GGUF spec once (see trainer.specs)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

from schema.atomic import atomic_directory
from schema.job import QuantConfig
from trainer.specs import ModelSpecError, locate_model


def _drop_int8_cast_notice(record: logging.LogRecord) -> bool:
    # bitsandbytes logs this at every int8 matmul of an fp32 model: 210 lines per forward of SmolLM2,
    # a megabyte per evaluation. load_base_model says it once instead.
    return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def resolve_model_dir(spec: str) -> Path | str:
    """A local directory holding the model for `spec` (converting GGUF once), or the hub snapshot."""
    source = locate_model(spec)
    if source.gguf is not None:
        if not source.ready:
            _convert_gguf(source.gguf, source.local)
        return source.local
    if source.hub_id is not None:
        return _hub_snapshot(source.hub_id)
    return source.local


def _hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as err:  # offline, unknown repo, gated: all end the same way
        raise ModelSpecError(
            f"model '{repo_id}' could not be fetched from the hub ({type(err).__name__}: {str(err).splitlines()[0][:160]}). "
            f"Use the preset 'smollm2-135m', or a local directory that holds the model (config.json, *.safetensors, tokenizer)."
        ) from None


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF file to a safetensors directory once (~20 s for SmolLM2-135M)."""

    def fill(staging: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # The GGUF "quantizer" only describes the source file; the weights are plain fp32 now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    atomic_directory(target, fill, replace=False)  # another process may finish first; its copy is identical


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(spec))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def compute_dtype(choice: str = "auto", device: torch.device | None = None) -> torch.dtype:
    """bf16 on a CUDA device that supports it, fp32 elsewhere (bf16 matmuls on these CPUs run ~30x slower)."""
    if choice != "auto":
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]
    device = device or default_device()
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def quantization_config(quant: QuantConfig, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if quant.bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.type,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
    if quant.bits == 8:
        if dtype != torch.float16:
            logging.getLogger("bitsandbytes.autograd._functions").addFilter(_drop_int8_cast_notice)
            logging.getLogger(__name__).info("int8 base: bitsandbytes casts %s activations to float16 at each int8 matmul", dtype)
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_base_model(
    spec: str, quant: QuantConfig, dtype: torch.dtype | None = None, device: torch.device | None = None
) -> PreTrainedModel:
    """The base model on `device`, its linear weights quantized as `quant` says, frozen."""
    device = device or default_device()
    dtype = dtype or compute_dtype("auto", device)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_dir(spec),
        dtype=dtype,
        quantization_config=quantization_config(quant, dtype),
        device_map={"": device},
        # sdpa honours packed position ids (block-diagonal masks); eager would attend across examples.
        attn_implementation="sdpa",
    )
    model.requires_grad_(False)
    model.config.use_cache = False
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            # On AVX512-BF16 CPUs, bitsandbytes repacks a 4-bit weight in place at its first eval-mode
            # forward into an inference layout whose kernel (gemv_4bit) has no autograd: training after an
            # evaluation would silently lose the gradient through every base layer. Keep the training layout.
            module.support_avx512bf16_for_cpu = False
    return model
