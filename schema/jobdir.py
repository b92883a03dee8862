"""A job's output directory: the one place that knows its file names.

```
<output_dir>/
  config.yaml          the resolved JobConfig
  adapter/             the final adapter (PEFT format)
  checkpoints/step-N/  adapter/, optimizer.pt, trainer_state.json, manifest.json (written atomically)
  tb/                  TensorBoard event files
  metrics.jsonl        one JSON object per logged step
  final.json           the summary, written last: its presence means the job finished
```
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schema.job import RESULT_NEUTRAL_FIELDS
from schema.problems import ConfigError, Problem


@dataclass(frozen=True)
class JobDir:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def final_file(self) -> Path:
        return self.root / "final.json"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tb(self) -> Path:
        return self.root / "tb"

    def finished(self) -> bool:
        return self.final_file.is_file()

    def saved_config(self) -> dict[str, Any] | None:
        """The config.yaml of an earlier run into this directory, or None."""
        if not self.config_file.is_file():
            return None
        from schema.yamlfile import read_yaml_file

        data, _ = read_yaml_file(self.config_file, "saved job config")
        if not isinstance(data, dict):
            raise ConfigError(Problem("is not a job config mapping", file=str(self.config_file), fix=f"move {self.root} aside to start the job afresh"))
        return data

    def read_final(self) -> dict[str, Any] | None:
        if not self.final_file.is_file():
            return None
        try:
            data = json.loads(self.final_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(Problem(f"is not valid JSON ({err})", file=str(self.final_file), fix=f"move {self.final_file} aside to train the job again")) from None
        if not isinstance(data, dict):
            raise ConfigError(Problem("is not a JSON object", file=str(self.final_file), fix=f"move {self.final_file} aside to train the job again"))
        return data

    def differences(self, config: dict[str, Any]) -> list[str]:
        """Fields that change results and differ between the saved config and `config` (JSON dumps)."""
        saved = self.saved_config()
        if saved is None:
            return []
        from pydantic import ValidationError

        from schema.job import JobConfig

        try:  # fields added to the schema since that run take their defaults, as they did then
            saved = JobConfig.model_validate(saved).model_dump(mode="json")
        except ValidationError:
            pass  # compare as written; the differences name what changed
        return results_changing_differences(saved, config)


def results_changing_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'field: saved run has X, config has Y' for each field outside RESULT_NEUTRAL_FIELDS that differs."""
    diffs: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if prefix in RESULT_NEUTRAL_FIELDS:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        elif _normal(a) != _normal(b):
            diffs.append(f"{prefix}: the saved run has {a!r}, this config has {b!r}")

    walk(saved, current, "")
    return diffs


def _normal(value: Any) -> Any:
    """Lists and tuples compare equal (YAML has only lists); ints and equal floats too."""
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    return value
