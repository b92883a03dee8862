"""JobConfig and FleetConfig: the one typed config, loaded from YAML and validated before anything heavy starts.

Each room owns the schema of the sections it reads (trainer.config, data_pipeline.config,
cluster.config); this module assembles them. Paths in a config are relative to the working directory.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cluster.config import ResourcesConfig
from data_pipeline.config import DataConfig
from trainer.config import (
    CheckpointConfig,
    EvalConfig,
    ForgettingConfig,
    LoraConfig,
    OptimConfig,
    QuantConfig,
    TrainConfig,
)

STRICT = ConfigDict(extra="forbid", validate_assignment=True)


class ConfigError(ValueError):
    """A config that cannot run. The message lists every problem with its file, line, field, value and fix."""


class JobConfig(BaseModel):
    model_config = STRICT
    name: str = Field("job", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Job name; also its directory name inside a fleet.")
    model: str = Field("smollm2-135m", description="Base model: a preset (smollm2-135m), a local HF directory, a .gguf file, or a hub id (online only).")
    quant: QuantConfig = Field(default_factory=QuantConfig, description="Base-model quantization.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="The adapter.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer, schedule and clipping.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Steps, batch shape, checkpointing of activations, seed, dtype.")
    data: DataConfig = Field(description="Training and evaluation data.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation cadence.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoint cadence and retention.")
    forgetting: ForgettingConfig = Field(default_factory=ForgettingConfig, description="Measures that keep the base model's abilities.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="What the job asks of the cluster.")
    output_dir: Path = Field(Path("runs/job"), description="Where the job writes its adapter, checkpoints, logs and summary.")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` merged into a copy of `base`; mappings merge key by key, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--set a.b.c=value` overrides; values are parsed as YAML (so 3, 1e-4, true, [q_proj] work)."""
    result = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example --set train.max_steps=50")
        node = result
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is not a section")
        node[leaf] = yaml.safe_load(text)
    return result


def read_yaml(path: Path) -> tuple[dict[str, Any], yaml.Node | None]:
    """The YAML mapping in `path` and its node tree (kept for line numbers in error messages)."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    text = path.read_text()
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys, got {type(data).__name__}")
    return data, node


def yaml_line(node: yaml.Node | None, location: tuple[Any, ...]) -> int | None:
    """1-based line of the deepest node along `location` that exists in the YAML file."""
    line = None
    for part in location:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == str(part)), None)
            if match is None:
                return line if line is not None else None
            node = match
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
        line = node.start_mark.line + 1
    return line


def format_validation_error(err: ValidationError, source: str, node: yaml.Node | None = None, prefix: tuple = ()) -> list[str]:
    """One line per problem: file:line, field, value, what is wrong, and the fix where pydantic gives one."""
    lines = []
    for problem in err.errors():
        location = prefix + tuple(p for p in problem["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        field = ".".join(str(p) for p in location) or "(top level)"
        line = yaml_line(node, location)
        where = f"{source}:{line}" if line else source
        value = problem.get("input")
        shown = "(missing)" if problem["type"] == "missing" else repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        fix = _fix_for(problem)
        lines.append(f"{where}: {field} = {shown}: {problem['msg']}{fix}")
    return lines


def _fix_for(problem: dict[str, Any]) -> str:
    kind = problem["type"]
    if kind == "missing":
        return " (fix: add this field)"
    if kind == "extra_forbidden":
        return " (fix: remove it or correct its spelling)"
    if kind == "literal_error":
        return f" (fix: use one of {problem['ctx']['expected']})"
    return ""


def load_job_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read, override and validate a job YAML; raises ConfigError listing every problem."""
    path = Path(path)
    raw, node = read_yaml(path)
    raw = apply_overrides(raw, overrides or [])
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError("invalid job config:\n  " + "\n  ".join(format_validation_error(err, str(path), node))) from None
