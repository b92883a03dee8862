"""The adapter matrix: the base and each adapter on the same tasks, one row each."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from schema.problems import ConfigError, Problem
from schema.tasks import TasksFile
from trainer.evaluation.tasks import Transcript, build_base_reference, evaluate_tasks


def adapter_row_names(adapter_dirs: Sequence[Path]) -> list[str]:
    """Row names for adapter directories: a job's `<job>/adapter` is named by its job, others by their
    directory; repeats get a numeric suffix."""
    names: list[str] = []
    for path in adapter_dirs:
        path = Path(path)
        name = path.parent.name if path.name == "adapter" and path.parent.name else path.name
        candidate, suffix = name, 2
        while candidate in names or candidate == "base":
            candidate, suffix = f"{name}-{suffix}", suffix + 1
        names.append(candidate)
    return names


def evaluate_matrix(
    base_model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    adapter_dirs: Sequence[Path],
    tasks: TasksFile,
    transcripts: dict[str, Transcript] | None = None,
    reference_model: torch.nn.Module | None = None,
    base_row: bool = True,
) -> dict[str, dict[str, float]]:
    """Metrics of the base alone and of each adapter on it: {"base": {...}, "<adapter>": {...}}.
    `base_row=False` leaves out the base alone (a row of long generations costs minutes on a CPU).
    With `transcripts`, each row's generated text per task row lands in transcripts[row name].
    The forgetting measures compare every row with `base_model` (adapters off), or with `reference_model`
    when given: e.g. the 16-bit base, so that adapters on bases of different precisions drift from one
    reference (the base row then shows what the quantization alone changes).

    The adapters are loaded side by side into one PEFT model over the one base (a few MB each) and
    switched with set_adapter; the base reference is computed once for all rows. peft injects the adapter
    layers into `base_model` in place: use a base loaded for this evaluation."""
    from peft import PeftModel  # peft is only needed when adapters are evaluated

    for path in adapter_dirs:
        if not (Path(path) / "adapter_config.json").is_file():
            raise ConfigError(Problem("not a PEFT adapter directory (no adapter_config.json)", file=str(path), fix="give the adapter/ directory of a job"))
    reference = build_base_reference(base_model if reference_model is None else reference_model, tokenizer, tasks)
    record = (lambda name: transcripts.setdefault(name, [])) if transcripts is not None else (lambda name: None)  # noqa: E731
    compare = {"base_reference": reference, "reference_model": reference_model}
    rows = {"base": evaluate_tasks(base_model, tokenizer, tasks, transcript=record("base"), **compare)} if base_row else {}
    model = None
    for index, (name, path) in enumerate(zip(adapter_row_names(adapter_dirs), adapter_dirs)):
        slot = f"adapter{index}"  # peft keeps adapters in a ModuleDict, whose keys may not hold dots
        if model is None:
            model = PeftModel.from_pretrained(base_model, str(path), adapter_name=slot)
        else:
            model.load_adapter(str(path), adapter_name=slot)
        model.set_adapter(slot)
        rows[name] = evaluate_tasks(model, tokenizer, tasks, transcript=record(name), **compare)
    return rows
