"""Read and write LoRA adapters as plain PEFT directories (adapter_config.json + adapter_model.safetensors).

The composer reads nothing else from an adapter directory and writes nothing else into one (besides
its own `compose.json` record). An adapter is held as one low-rank update per module:
ΔW = B·A with the adapter's scaling (α/r, or α/√r with rsLoRA) already folded into B, so adapters of
different ranks, alphas and rsLoRA settings all speak the same language.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file

from schema.atomic import atomic_directory

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# How peft names a LoRA factor in a saved state dict: the PeftModel prefix, the module path, the factor.
KEY_PATTERN = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


class AdapterError(ValueError):
    """An adapter directory that the composer cannot read, or adapters that cannot be combined."""


@dataclass(frozen=True)
class LowRank:
    """One module's update ΔW = B @ A, scaling folded into B. A is (rank, in), B is (out, rank)."""

    A: torch.Tensor
    B: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    def delta(self) -> torch.Tensor:
        return self.B.double() @ self.A.double()


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter read from a PEFT directory: its raw config and one LowRank per adapted module."""

    path: Path
    config: dict
    modules: dict[str, LowRank]

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def task_type(self) -> str | None:
        return self.config.get("task_type")

    def fingerprint(self) -> str:
        """sha256 of the weights file: names exactly which adapter a composition used."""
        digest = hashlib.sha256()
        with open(self.path / WEIGHTS_FILE, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()

    def summary(self) -> dict:
        ranks = sorted({m.rank for m in self.modules.values()})
        return {
            "path": str(self.path),
            "sha256": self.fingerprint(),
            "base_model": self.base_model,
            "r": ranks[0] if len(ranks) == 1 else ranks,
            "lora_alpha": self.config.get("lora_alpha"),
            "use_rslora": bool(self.config.get("use_rslora")),
            "modules": len(self.modules),
        }


def lora_scale(config: dict, module: str, rank: int) -> float:
    """The scaling peft applies to `module`: α/r, or α/√r with rsLoRA; alpha_pattern overrides α."""
    alpha_pattern = config.get("alpha_pattern") or {}
    key = get_pattern_key(list(alpha_pattern), module)
    alpha = float(alpha_pattern.get(key, config["lora_alpha"]))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def read_adapter(path: str | Path) -> Adapter:
    """Read a PEFT LoRA directory; raises AdapterError naming the file and what is unsupported."""
    path = Path(path)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise AdapterError(f"{path}: not a PEFT adapter directory, {needed.name} is missing")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{config_path}: not valid JSON ({err}); write the adapter again, or point at another directory") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path}: holds a JSON {type(config).__name__}, not the object of a PEFT adapter config")
    if config.get("peft_type") != "LORA":
        raise AdapterError(
            f"{config_path}: peft_type = {config.get('peft_type')!r}; only LoRA adapters combine linearly "
            f"(AdaLoRA/VeRA adapters are not supported by the composer)"
        )
    if config.get("use_dora"):
        raise AdapterError(f"{config_path}: use_dora = true; a DoRA update is not a sum of low-rank terms, so it cannot be composed exactly")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise AdapterError(f"{config_path}: bias = {config.get('bias')!r}, lora_bias = {config.get('lora_bias')!r}; the composer handles weight updates only (bias: none)")

    _check_scaling(config, config_path)
    try:
        tensors = load_file(weights_path)
    except Exception as err:  # safetensors raises its own SafetensorError (not an OSError) for a damaged file
        raise AdapterError(
            f"{weights_path}: not a readable safetensors file ({type(err).__name__}: {err}); it is truncated or damaged, so copy or train the adapter again"
        ) from None
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = KEY_PATTERN.match(key)
        if match is None:
            raise AdapterError(
                f"{weights_path}: tensor {key!r} is not a LoRA A/B factor (modules_to_save, embeddings and "
                f"DoRA magnitudes cannot be composed); retrain without them"
            )
        if not tensor.is_floating_point():
            raise AdapterError(f"{weights_path}: tensor {key!r} is {tensor.dtype}, not floating-point LoRA weights")
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"{weights_path}: tensor {key!r} holds NaN or infinite values; anything composed from it would too, so retrain the adapter")
        factors.setdefault(match["module"], {})[match["factor"]] = tensor
    if not factors:
        raise AdapterError(f"{weights_path}: holds no LoRA factors")

    modules: dict[str, LowRank] = {}
    for name, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{weights_path}: module {name!r} has lora_{next(iter(pair))} but not its partner")
        lora_a, lora_b = pair["A"].float(), pair["B"].float()
        if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[0] != lora_b.shape[1]:
            raise AdapterError(f"{weights_path}: module {name!r} has A {tuple(lora_a.shape)} and B {tuple(lora_b.shape)}, which do not multiply")
        scale = lora_scale(config, name, lora_a.shape[0])
        # With fan_in_fan_out (Conv1D layers) peft transposes B·A only when adding it to the stored
        # weight; B·A itself has the same layout either way, so it composes the same.
        modules[name] = LowRank(A=lora_a, B=lora_b * scale)
    return Adapter(path=path, config=config, modules=modules)


def _check_scaling(config: dict, config_path: Path) -> None:
    """lora_alpha (and alpha_pattern's values) are finite numbers: every module's scale is made of them."""
    alphas = {"lora_alpha": config.get("lora_alpha")}
    pattern = config.get("alpha_pattern") or {}
    if not isinstance(pattern, dict):
        raise AdapterError(f"{config_path}: alpha_pattern = {pattern!r} is not a mapping of module pattern to alpha")
    alphas.update({f"alpha_pattern[{key!r}]": value for key, value in pattern.items()})
    for name, value in alphas.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise AdapterError(f"{config_path}: {name} = {value!r} is not a finite number; the adapter's scaling (alpha/r) needs one")


def peft_config_for(
    modules: dict[str, LowRank], base_model: str | None, task_type: str | None, fan_in_fan_out: bool = False
) -> PeftLoraConfig:
    """A peft LoraConfig whose scaling is 1 on every module (scales live in B), ranks per module.

    Modules are targeted by their full names, so a union of adapters with different target sets maps
    exactly. The most common rank is `r`; the others go to rank_pattern/alpha_pattern, whose keys peft
    treats as regexes, hence re.escape.
    """
    ranks = [m.rank for m in modules.values()]
    common = max(set(ranks), key=lambda r: (ranks.count(r), r))
    rank_pattern = {re.escape(name): m.rank for name, m in modules.items() if m.rank != common}
    return PeftLoraConfig(
        r=common,
        lora_alpha=common,
        rank_pattern=rank_pattern,
        alpha_pattern=dict(rank_pattern),  # alpha = r keeps the scaling at exactly 1
        target_modules=sorted(modules),
        lora_dropout=0.0,
        bias="none",
        use_rslora=False,
        fan_in_fan_out=fan_in_fan_out,
        base_model_name_or_path=base_model,
        task_type=task_type,
    )


def write_adapter(
    out: str | Path,
    modules: dict[str, LowRank],
    base_model: str | None,
    task_type: str | None = "CAUSAL_LM",
    record: dict | None = None,
    dtype: torch.dtype = torch.float32,
    fan_in_fan_out: bool = False,
) -> Path:
    """Write `modules` as a PEFT LoRA directory (plus compose.json when `record` is given), atomically."""
    out = Path(out)
    if not modules:
        raise AdapterError(f"{out}: nothing to write, the composition has no modules")
    tensors = {}
    for name, update in modules.items():
        if update.rank == 0:
            raise AdapterError(f"{out}: module {name!r} would have rank 0")
        tensors[f"base_model.model.{name}.lora_A.weight"] = update.A.to(dtype).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = update.B.to(dtype).contiguous()

    def fill(staging: Path) -> None:
        peft_config_for(modules, base_model, task_type, fan_in_fan_out).save_pretrained(staging)
        save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        if record is not None:
            (staging / "compose.json").write_text(json.dumps(record, indent=2) + "\n")

    return atomic_directory(out, fill)
