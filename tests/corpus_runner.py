"""The corpus of bad inputs (tests/corpus/*.yaml), run through lorafleet's real entry points.

Shared by tests/test_corpus.py and scripts/reliability_report.py, so that the report states exactly
what the test checks. A case is one hostile input and what must happen to it:

- `job` (job_yaml, data_files): a job file, checked by `trainer.checks.load_checked_job`, as `lorafleet
  train` and `check` do; data_files cases may give `source:` instead, the job's one training source.
- `fleet` (fleet_yaml): a fleet file, checked by `launch.checks.load_checked_fleet` on a cluster of one
  node with 2 CPUs and no GPU, as `lorafleet run` does before Ray starts.
- `args` (cli): a command line, run by `typer.testing.CliRunner` on `launch.cli.app`.

Every case runs in a directory of its own (the working directory while it runs) that holds
`train.jsonl` (two good rows) and the case's `files`; `$MODEL` stands for the tiny test model. A case
expects a named error (exit code 2, or `code`) whose message holds every string of `expect`, or, with
`accept: true`, success (and the config `values` it names). `survive` lists files that must be left as
they were written, `absent` paths that must not exist afterwards. No traceback may ever appear, and no
case may load a model's weights. `open_issue` marks a case that still misbehaves because its fix lies in
a file outside this corpus's change; it says where.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).parent / "corpus"
CATEGORIES = {"job_yaml": "job YAML", "fleet_yaml": "fleet YAML", "data_files": "data files", "cli": "CLI"}
GOOD_ROWS = '{"prompt": "What is 2 plus 3?", "completion": " 5"}\n{"prompt": "What is 4 plus 4?", "completion": " 8"}\n'
EXIT_BAD_INPUT = 2
# Rich draws usage errors in boxes wrapped at the terminal width: compare text with those undone.
_BOX = re.compile(r"[│╭╮╰╯─]+")


@dataclass(frozen=True)
class Case:
    category: str
    name: str
    spec: dict[str, Any]

    @property
    def about(self) -> str:
        return self.spec["about"]

    @property
    def accepted(self) -> bool:
        return bool(self.spec.get("accept"))


@dataclass
class Outcome:
    case: Case
    exit_code: int  # 0: accepted; 2: a named error (ConfigError, or the CLI's exit code)
    output: str
    traceback: str | None = None  # an exception that escaped the entry point
    failures: list[str] = field(default_factory=list)  # expectations the run did not meet

    @property
    def message(self) -> str:
        """The first line that says what is wrong (or what was accepted): from `error:` on (from a usage
        error's box when there is none), without titles ("invalid job (2 problems):") and usage lines."""
        lines = [line.strip() for line in _BOX.sub(" ", self.output).splitlines() if line.strip()]
        start = next((i for i, line in enumerate(lines) if line.startswith("error:")), None)
        if start is None:
            start = next((i + 1 for i, line in enumerate(lines) if line == "Error"), 0)
        for line in lines[start:]:
            line = line.removeprefix("error:").strip()
            if line and not line.startswith(("Usage:", "Try '")) and not re.search(r"\(\d+ problems?\):$", line):
                return line
        return ""


def load_cases(category: str) -> list[Case]:
    from schema.yamlfile import read_yaml_file

    cases, _ = read_yaml_file(CORPUS / f"{category}.yaml", "corpus file")
    return [Case(category, spec["name"], spec) for spec in cases]


def all_cases() -> list[Case]:
    return [case for category in CATEGORIES for case in load_cases(category)]


def run_case(case: Case, workdir: Path, model_dir: Path) -> Outcome:
    """Run `case` in `workdir` (created here) and check what happened against what it expects."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "train.jsonl").write_text(GOOD_ROWS)
    written = {path: _write(workdir / path, content, model_dir) for path, content in (case.spec.get("files") or {}).items()}
    with contextlib.chdir(workdir), _no_model_loads():
        outcome = _run(case, model_dir)
        outcome.failures = _failures(outcome, written)
    return outcome


@contextlib.contextmanager
def _no_model_loads():
    """Loading a model's weights fails the case: every check must come before that (reading a model's
    config.json to list its modules is allowed, and cheap)."""
    from transformers import PreTrainedModel

    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"a corpus case loaded the weights of a model ({cls.__name__}.from_pretrained)")

    original = PreTrainedModel.__dict__["from_pretrained"]
    PreTrainedModel.from_pretrained = classmethod(refuse)
    try:
        yield
    finally:
        PreTrainedModel.from_pretrained = original


def _run(case: Case, model_dir: Path) -> Outcome:
    spec = case.spec
    if case.category == "cli":
        from typer.testing import CliRunner

        from launch.cli import app

        # As a wide terminal shows it: rich wraps usage errors in a box at the terminal's width.
        result = CliRunner().invoke(app, [_substitute(arg, model_dir) for arg in spec["args"]], env={"COLUMNS": "250"})
        escaped = result.exception if result.exception is not None and not isinstance(result.exception, SystemExit) else None
        return Outcome(case, result.exit_code, result.output, "".join(traceback.format_exception(escaped)) if escaped else None)

    from schema.problems import ConfigError

    if case.category == "fleet_yaml":
        _write(Path("fleet.yaml"), spec["fleet"], model_dir)
        check = _check_fleet
    else:
        job = spec["job"] if "job" in spec else f"name: data\nmodel: $MODEL\ndata:\n  train: {spec['source']}\noutput_dir: out\n"
        _write(Path("job.yaml"), job, model_dir)
        check = _check_job
    try:
        config = check(spec.get("set") or [])
    except ConfigError as err:
        return Outcome(case, EXIT_BAD_INPUT, f"error: {err}")
    except Exception:  # noqa: BLE001 (anything else is what this corpus exists to find)
        return Outcome(case, 1, "", traceback.format_exc())
    outcome = Outcome(case, 0, f"accepted: {_described(config, spec.get('values') or {})}")
    outcome.failures = _wrong_values(config, spec.get("values") or {})
    return outcome


def _check_job(overrides: list[str]) -> dict[str, Any]:
    from trainer.checks import load_checked_job

    return load_checked_job("job.yaml", overrides).model_dump(mode="json")


def _check_fleet(overrides: list[str]) -> dict[str, Any]:
    from cluster.capacity import NodeCapacity
    from launch.checks import load_checked_fleet

    return load_checked_fleet("fleet.yaml", overrides, nodes=[NodeCapacity("local", cpus=2, gpus=0)]).config.model_dump(mode="json")


def _described(config: dict[str, Any], values: dict[str, Any]) -> str:
    shown = ", ".join(f"{path} = {json.dumps(_at(config, path))}" for path in values)
    return shown or ("fleet " + config["name"] if "jobs" in config else "job " + config["name"])


def _at(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = config[int(part)] if isinstance(config, list) else config.get(part)
    return config


def _wrong_values(config: dict[str, Any], values: dict[str, Any]) -> list[str]:
    return [f"{path} is {_at(config, path)!r}, expected {want!r}" for path, want in values.items() if _at(config, path) != want]


def _failures(outcome: Outcome, written: dict[str, bytes | None]) -> list[str]:
    spec, failures = outcome.case.spec, list(outcome.failures)
    if outcome.traceback is not None or "Traceback" in outcome.output:
        failures.append("a traceback reached the user:\n" + (outcome.traceback or outcome.output))
    if outcome.case.accepted:
        if outcome.exit_code != 0:
            failures.append(f"must be accepted, but exited {outcome.exit_code}: {outcome.output.strip()}")
    else:
        code = spec.get("code", EXIT_BAD_INPUT)
        if outcome.exit_code != code:
            failures.append(f"expected exit code {code}, got {outcome.exit_code}" + (" (wrongly accepted)" if outcome.exit_code == 0 else ""))
        text = " ".join(_BOX.sub(" ", outcome.output).split())
        missing = [word for word in spec["expect"] if " ".join(str(word).split()) not in text]
        if missing:
            failures.append(f"the message lacks {missing}: {outcome.output.strip()}")
    for path in spec.get("survive") or []:
        if not Path(path).is_file() or Path(path).read_bytes() != written[path]:
            failures.append(f"{path} was changed or removed")
    failures += [f"{path} was written" for path in spec.get("absent") or [] if Path(path).exists()]
    return failures


# -- the files of a case ---------------------------------------------------------------------------


def _substitute(text: str, model_dir: Path) -> str:
    return text.replace("$MODEL", str(model_dir))


def _write(path: Path, content: Any, model_dir: Path) -> bytes | None:
    """Write one file of a case: text (UTF-8), {latin1: text} (raw bytes 0-255), {parquet: rows},
    {lora: ok | truncated | nan} (LoRA weights of the tiny model's q_proj), {directory: true}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, dict) and content.get("directory"):
        path.mkdir(exist_ok=True)
        return None
    data = _content(content, model_dir)
    path.write_bytes(data)
    return data


def _content(content: Any, model_dir: Path) -> bytes:
    if isinstance(content, str):
        return _substitute(content, model_dir).encode("utf-8")
    (kind, value), = content.items()
    if kind == "latin1":
        return value.encode("latin-1")
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(value["rows"]), buffer)
        data = buffer.getvalue()
        return data[: value["keep"]] if "keep" in value else data
    if kind == "lora":
        import torch
        from safetensors.torch import save

        module = "base_model.model.model.layers.0.self_attn.q_proj"
        factor_a, factor_b = torch.full((2, 64), 0.01), torch.full((64, 2), 0.01)
        if value == "nan":
            factor_b[0, 0] = float("nan")
        data = save({f"{module}.lora_A.weight": factor_a, f"{module}.lora_B.weight": factor_b})
        return data[: len(data) // 2] if value == "truncated" else data
    raise ValueError(f"unknown kind of corpus file: {kind}")
