"""Load the base model quantized (bitsandbytes or HQQ) or not, converting a GGUF spec once (see trainer.specs).

HQQ (method hqq: 2, 3, 4 or 8 bits) goes through hqq's own `HQQLinear`, not transformers' HqqConfig
(whose load path raises NotImplementedError in this transformers). Quantizing SmolLM2-135M takes
0.5 to 2 minutes on one CPU core (2 bits is the slowest), so each quantized base is cached once per
(model files, bits, group size) under `cache_root()/quantized/<key>/`; every load, the first
included, reads the cache (0.1 s for SmolLM2), so a resumed run gets the very bytes it trained on.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

from schema.atomic import atomic_directory
from schema.job import QuantConfig
from schema.outputs import cache_root
from trainer.specs import ModelSpecError, group_size_problem, linear_layers, locate_model

log = logging.getLogger(__name__)


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


def uses_hqq(quant: QuantConfig) -> bool:
    return quant.method == "hqq" and quant.bits != 16  # at 16 bits the method is ignored


def load_base_model(
    spec: str, quant: QuantConfig, dtype: torch.dtype | None = None, device: torch.device | None = None
) -> PreTrainedModel:
    """The base model on `device`, its linear weights quantized as `quant` says, frozen."""
    device = device or default_device()
    dtype = dtype or compute_dtype("auto", device)
    if uses_hqq(quant):
        model = _load_hqq_model(spec, quant, dtype, device)
    else:
        model = _from_pretrained(resolve_model_dir(spec), dtype, device, quantization_config(quant, dtype))
    model.requires_grad_(False)
    model.config.use_cache = False
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            # On AVX512-BF16 CPUs, bitsandbytes repacks a 4-bit weight in place at its first eval-mode
            # forward into an inference layout whose kernel (gemv_4bit) has no autograd: training after an
            # evaluation would silently lose the gradient through every base layer. Keep the training layout.
            module.support_avx512bf16_for_cpu = False
    return model


def _from_pretrained(model_dir: Path | str, dtype: torch.dtype, device: torch.device, quantization: BitsAndBytesConfig | None = None) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=dtype,
        quantization_config=quantization,
        device_map={"": device},
        # sdpa honours packed position ids (block-diagonal masks); eager would attend across examples.
        attn_implementation="sdpa",
    )


# --- HQQ ---------------------------------------------------------------------------------------------

HQQ_TENSORS = "hqq_layers.safetensors"  # every quantized layer's packed weight, scales and zeros
HQQ_METADATA = "quantized.json"  # the key's inputs, library versions, and each layer's scalar settings


def quantizable_linears(model: PreTrainedModel) -> list[tuple[str, torch.nn.Linear]]:
    """Every linear layer but the output head (which stays in full precision, as under bitsandbytes)."""
    head = model.get_output_embeddings()
    return [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and module is not head]


def check_group_size(model_dir: Path | str, quant: QuantConfig) -> None:
    """Raise ModelSpecError naming the first layer whose input size `quant.group_size` does not divide."""
    problem = group_size_problem(linear_layers(Path(model_dir)), quant.group_size)
    if problem is not None:
        raise ModelSpecError(f"quant.{problem}")


def hqq_settings(quant: QuantConfig) -> dict:
    """hqq's BaseQuantizeConfig for `quant` (axis 1: groups run along a row's inputs)."""
    from hqq.core.quantize import BaseQuantizeConfig

    return BaseQuantizeConfig(nbits=quant.bits, group_size=quant.group_size)


def quantized_cache_dir(model_dir: Path, quant: QuantConfig) -> Path:
    """Where the HQQ quantization of the model in `model_dir` lives: keyed by the directory and its files'
    names, sizes and mtimes (no hashing of hundreds of MB), the bit width and the group size."""
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model_dir.iterdir() if p.is_file())
    identity = {"model_dir": str(model_dir.resolve()), "files": files, "method": quant.method, "bits": quant.bits, "group_size": quant.group_size}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "quantized" / f"{model_dir.name}-hqq{quant.bits}-g{quant.group_size}-{key}"


def _library_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("hqq", "torch", "transformers")}


def _quantize_to_cache(model_dir: Path, quant: QuantConfig, target: Path, device: torch.device) -> None:
    """Quantize every linear layer but the head with HQQ from the fp32 weights (so the cache does not
    depend on the compute dtype) on `device`, and write the layers' state into `target` atomically."""
    from hqq.core.quantize import HQQLinear
    from safetensors.torch import save_file

    check_group_size(model_dir, quant)
    log.info("quantizing %s with HQQ at %d bits, group size %d (once; cached in %s)", model_dir, quant.bits, quant.group_size, target)

    def fill(staging: Path) -> None:
        started = time.perf_counter()
        model = _from_pretrained(model_dir, torch.float32, device)
        tensors, layers = {}, {}
        for name, linear in quantizable_linears(model):
            layer = HQQLinear(linear, hqq_settings(quant), compute_dtype=torch.float32, device=device)
            layer.encoded_state_dict = False  # plain values: tensors go to safetensors, the rest to JSON (no eval on load)
            settings = {}
            for key, value in layer.state_dict().items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
                else:
                    settings[key] = _to_json(value)
            layers[name] = settings
        save_file(tensors, str(staging / HQQ_TENSORS))
        metadata = {
            "format": 1,
            "model_dir": str(model_dir),
            "quant": {"method": quant.method, "bits": quant.bits, "group_size": quant.group_size},
            "hqq_settings": hqq_settings(quant)["weight_quant_params"],
            # hqq's optimizer runs in fp16 on CUDA and fp32 on CPU: the device changes the last bits.
            "quantized_on": device.type,
            "quantize_s": round(time.perf_counter() - started, 3),
            "versions": _library_versions(),
            "layers": layers,
        }
        (staging / HQQ_METADATA).write_text(json.dumps(metadata, indent=1))

    atomic_directory(target, fill, replace=False)  # another process may finish first; its copy serves as well


def _to_json(value):
    """One of hqq's scalar layer settings (int, bool, str, dtype, Size) as JSON."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return list(value) if isinstance(value, torch.Size) else value


def _from_json(key: str, value):
    if key.endswith("dtype"):  # compute_dtype, unpack_view_dtype
        return getattr(torch, value)
    return torch.Size(value) if key == "shape" else value


def _load_hqq_model(spec: str, quant: QuantConfig, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    """The base with every linear layer but the head replaced by the cached HQQLinear, computing in `dtype`."""
    from hqq.core.quantize import HQQLinear
    from safetensors.torch import load_file

    model_dir = Path(resolve_model_dir(spec))
    cache = quantized_cache_dir(model_dir, quant)
    if not (cache / HQQ_METADATA).is_file():
        _quantize_to_cache(model_dir, quant, cache, device)
    metadata = json.loads((cache / HQQ_METADATA).read_text())
    quantized_by, installed = metadata["versions"]["hqq"], _library_versions()["hqq"]
    if quantized_by != installed:
        log.warning("%s was quantized by hqq %s, hqq %s is installed; delete the directory to quantize again", cache, quantized_by, installed)
    layer_tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(cache / HQQ_TENSORS)).items():
        name, _, field = key.rpartition(".")
        layer_tensors.setdefault(name, {})[field] = tensor
    # The linear weights are read in full precision and dropped: simpler than building the rest of the
    # model (rotary buffers, tied weights) by hand, and it costs a second or two for SmolLM2.
    model = _from_pretrained(model_dir, dtype, device)
    modules = dict(model.named_modules())
    for name, settings in metadata["layers"].items():
        state = dict(layer_tensors[name])
        state.update({key: _from_json(key, value) for key, value in settings.items()})
        # The cache holds fp32 scales and zeros; hqq casts them (and any bias) to compute_dtype as it loads.
        layer = HQQLinear(None, hqq_settings(quant), compute_dtype=dtype, device=device, initialize=False)
        layer.load_state_dict(state)
        parent, _, child = name.rpartition(".")
        setattr(modules[parent], child, layer)
    return model


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes holding the model's weights: every parameter and buffer, plus what quantized layers keep
    beside their packed weights (HQQ scales, zeros and bias; bitsandbytes absmax and code books)."""
    tensors = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    for module in model.modules():
        tensors.update({id(t): t for t in _quantization_metadata(module) if isinstance(t, torch.Tensor)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _quantization_metadata(module: torch.nn.Module) -> list:
    """What a quantized layer keeps outside its parameters (nothing for any other module)."""
    import bitsandbytes as bnb
    from hqq.core.quantize import HQQLinear

    if isinstance(module, HQQLinear):
        return [*module.meta.values(), module.bias]
    if isinstance(module, bnb.nn.Linear4bit):
        return list(module.weight.quant_state.as_dict(packed=False).values())
    if isinstance(module, bnb.nn.Linear8bitLt):  # row scales: on the weight until the first forward moves them
        return [module.weight.SCB if module.weight.SCB is not None else module.state.SCB]
    return []
