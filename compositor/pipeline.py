"""End-to-end composer runs, shared by the CLI and a fleet's `compose:` section: one ComposeConfig
to one PEFT adapter directory + compose.json; and the PLR report (task and forgetting metrics of one
adapter on its training base and every higher precision, plus the per-layer quantization error)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from compositor.adapters import AdapterError, read_adapter
from compositor.compose import common_base_model, compose_dirs
from schema.compose import ComposeConfig, LearnConfig
from compositor.learned import LearnedWeights, encode_pairs, learn_weights
from compositor.restore import (
    base_spec_of,
    load_base,
    quant_label,
    quantization_error_table,
    resolve_dtype,
    restoration_precisions,
    restoration_quant,
    summarize_errors,
    training_quant,
)


def resolve_adapter_dirs(names: list[str], job_adapters: Mapping[str, Path] | None = None) -> list[Path]:
    """A fleet job name maps to that job's adapter/; anything else is a path to a PEFT directory."""
    job_adapters = job_adapters or {}
    resolved = [Path(job_adapters[name]) if name in job_adapters else Path(name) for name in names]
    missing = [str(p) for p in resolved if not (p / "adapter_config.json").is_file()]
    if missing:
        known = f" (fleet jobs: {', '.join(sorted(job_adapters))})" if job_adapters else ""
        raise AdapterError(f"not PEFT adapter directories (no adapter_config.json): {', '.join(missing)}{known}")
    return resolved


def validation_batches(tokenizer, learn: LearnConfig) -> list[dict[str, torch.Tensor]]:
    """`learn.examples` (prompt, reference) pairs from the tasks file, taken across its tasks in turn,
    rendered with each task's own template, in batches of 8."""
    from trainer.checks import load_tasks_file
    from data_pipeline.encoding import render_prompt
    from data_pipeline.rows import task_rows

    tasks = load_tasks_file(learn.tasks)
    if not tasks.tasks:
        raise AdapterError(f"{learn.tasks}: lists no tasks; learned weights need tasks with reference answers")
    per_task = [[(render_prompt(tokenizer, t.template, ex.prompt, ex.fields), ex.reference) for ex in task_rows(t)] for t in tasks.tasks]
    pairs = [pair for group in itertools.zip_longest(*per_task) for pair in group if pair is not None][: learn.examples]
    return [encode_pairs(tokenizer, [p for p, _ in pairs[i : i + 8]], [r for _, r in pairs[i : i + 8]], learn.max_len) for i in range(0, len(pairs), 8)]


def fit_weights(adapter_dirs: list[Path], learn: LearnConfig, base: str | None = None) -> LearnedWeights:
    """Fit the mixing weights of these adapters on the validation examples of `learn.tasks`."""
    from trainer.models import load_tokenizer

    adapters = [read_adapter(d) for d in adapter_dirs]
    if common_base_model(adapters, base) is None:  # also refuses adapters that name different bases
        raise AdapterError("the adapters name no base model (base_model_name_or_path); pass --base")
    spec = base_spec_of(adapter_dirs[0], base)
    tokenizer = load_tokenizer(spec)
    batches = validation_batches(tokenizer, learn)
    model = load_base(spec, learn.base_precision, resolve_dtype(spec, learn.base_precision, None))
    return learn_weights(model, adapters, batches, per_layer=learn.per_layer, steps=learn.steps, lr=learn.lr, l1=learn.l1, average=learn.average)


def run_compose(config: ComposeConfig, out: Path, job_adapters: Mapping[str, Path] | None = None, base: str | None = None) -> dict:
    """Run one composition; returns the compose.json record written beside the adapter in `out`."""
    adapter_dirs = resolve_adapter_dirs(config.adapters, job_adapters)
    extra: dict = {"name": config.name}
    weights, layer_weights, method = config.weights, None, config.method
    if config.method == "learned":
        started = time.perf_counter()
        learned = fit_weights(adapter_dirs, config.learn, base)
        extra["learned"] = {**learned.to_dict(), "fit_s": time.perf_counter() - started, **config.learn.model_dump(mode="json")}
        # The weights were learned; the adapter is their exact linear sum.
        extra["method"] = "learned"
        weights, layer_weights, method = learned.weights, learned.per_layer, "linear"
    _, record = compose_dirs(
        adapter_dirs, out, weights, method, lambda_=config.lambda_, density=config.density, seed=config.seed,
        svd_rank=config.svd_rank, base_model=base, extra_record=extra, layer_weights=layer_weights,
    )
    return record


def run_fleet_compositions(compositions: list[ComposeConfig], fleet_output_dir: Path, job_adapters: Mapping[str, Path]) -> dict[str, dict]:
    """The fleet hook: after the jobs finish, each composition goes to <output_dir>/compose/<name>."""
    return {c.name: run_compose(c, Path(fleet_output_dir) / "compose" / c.name, job_adapters) for c in compositions}


def plr_report(adapter_dir: Path, tasks_file: Path, precisions: tuple[int, ...] | None = None, dtype: str | None = None, base: str | None = None) -> dict:
    """The adapter evaluated on each base precision (task and forgetting metrics, each precision's own
    base as the forgetting reference), and ‖W − deq(q(W))‖/‖W‖ per layer for each quantized width used.
    `precisions` defaults to the adapter's training precision and every precision above it (2-bit HQQ:
    2, 3, 4, 8, 16; 4-bit NF4: 4, 8, 16); one below the training precision is refused before any model loads."""
    from trainer.evaluation.matrix import evaluate_matrix
    from trainer.checks import load_tasks_file
    from trainer.models import load_tokenizer

    tasks = load_tasks_file(tasks_file)  # fails on a bad file before any model loads
    read_adapter(adapter_dir)
    trained = training_quant(adapter_dir)
    precisions = precisions or restoration_precisions(trained)
    labels = {bits: quant_label(restoration_quant(trained, bits)) for bits in precisions}  # refuses a precision too low
    spec = base_spec_of(adapter_dir, base)
    tokenizer = load_tokenizer(spec)
    columns: dict[str, dict] = {}
    models = {}
    for bits in precisions:
        torch_dtype = resolve_dtype(spec, bits, dtype)
        model = load_base(spec, bits, torch_dtype, trained=trained)
        started = time.perf_counter()
        rows = evaluate_matrix(model, tokenizer, [adapter_dir], tasks)
        base_row, adapter_row = rows.pop("base"), next(iter(rows.values()))
        columns[f"{bits}-bit"] = {
            "base_quant": labels[bits],
            "dtype": str(torch_dtype).removeprefix("torch."),
            "adapter": adapter_row,
            "base": base_row,
            "eval_s": time.perf_counter() - started,
        }
        # evaluate_matrix injected the LoRA layers into this model; their `.weight` is still the base's.
        models[bits] = model
    full = models.get(16) or load_base(spec, 16, resolve_dtype(spec, 16, dtype))
    table = quantization_error_table(full, {bits: m for bits, m in models.items() if bits != 16})
    return {
        "adapter": str(adapter_dir),
        "base_model": spec,
        "trained_on": trained.model_dump(mode="json"),
        "tasks_file": str(tasks_file),
        "columns": columns,
        "quantization_error": table,
        "quantization_error_summary": summarize_errors(table),
    }
