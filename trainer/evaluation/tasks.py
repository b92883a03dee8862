"""Task metrics and the forgetting measures, on the active model against its own base.

Forgetting metrics compare the adapted model with its own base (adapters switched off with peft's
`disable_adapter()`, so no second copy of the model) on held-out general prompts that the *base*
answered (`BaseReference`). A `reference_model` given instead (e.g. the 16-bit base of an adapter on a
quantized one) takes the base's place: its answers, its distributions.

- `drift_kl`: mean per-token KL(p_base || p_adapted) over the base-generated response tokens;
- `response_nll`: mean NLL of those base responses under the adapted model (`response_nll_increase`
  subtracts the base model's own NLL of them);
- `<task>_drop` / `accuracy_drop`: base score minus adapted score on tasks marked `general: true`.

Names follow the design: `eval/<task>/<metric>` and `eval/forgetting/<metric>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from data_pipeline.encoding import render_prompt
from data_pipeline.rows import TaskExample, probe_prompts, task_rows
from schema.tasks import EvalTaskConfig, TasksFile
from trainer.evaluation.generation import adapters_off, dequantized_4bit, generate, score_responses
from trainer.evaluation.metrics import TASK_METRICS, predict_label

# One row of a transcript: what the model was asked, what it answered, and whether that scored.
Transcript = list[dict[str, Any]]


def task_score_name(metric: str) -> str:
    """The headline number a task reports (accuracy for gsm8k and label, else the metric itself)."""
    return TASK_METRICS[metric].headline


def evaluate_task(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: EvalTaskConfig,
    examples: list[TaskExample] | None = None,
    transcript: Transcript | None = None,
) -> dict[str, float]:
    """Metrics of one task on the active model, named by metric only (the caller adds eval/<task>/).
    With `transcript`, each row's prompt, reference, output and score are appended to it."""
    examples = examples if examples is not None else task_rows(task)
    prompts = [render_prompt(tokenizer, task.template, ex.prompt, ex.fields) for ex in examples]
    metric = TASK_METRICS[task.metric]
    if not metric.generates:
        scores = score_responses(model, tokenizer, prompts, [ex.reference for ex in examples], batch_size=task.batch_size)
        if transcript is not None:
            for ex, nll, count in zip(examples, scores.nll, scores.tokens):
                transcript.append({"task": task.name, "prompt": ex.prompt, "reference": ex.reference, "nll": nll / max(count, 1)})
        return metric.from_nll(scores.mean_nll)
    outputs = generate(model, tokenizer, prompts, max_new_tokens=task.max_new_tokens, stop=task.stop, batch_size=task.batch_size)
    labels = task.labels or sorted({ex.reference for ex in examples})
    hits = [metric.hit(out, ex.reference, task, labels) for out, ex in zip(outputs, examples)]
    if transcript is not None:
        for ex, out, hit in zip(examples, outputs, hits):
            transcript.append({"task": task.name, "prompt": ex.prompt, "reference": ex.reference, "output": out, "correct": hit})
    result = {metric.headline: sum(hits) / len(hits)}
    if task.metric == "label":
        result["valid_frac"] = sum(predict_label(out, labels) is not None for out in outputs) / len(outputs)
    return result


@dataclass
class BaseReference:
    """What the base model does on the probes, computed once and reused by every evaluation of a job or
    an adapter matrix: its answers to the general prompts, its own NLL of them, its general-task scores."""

    prompts: list[str]
    responses: list[str]
    response_nll: float
    general_scores: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "responses": self.responses, "response_nll": self.response_nll, "general_scores": self.general_scores}


def build_base_reference(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, tasks: TasksFile) -> BaseReference:
    """Run the base model (adapters off, if any) on the forgetting probe and on the general tasks."""
    with adapters_off(model), dequantized_4bit(model):
        general_scores = {}
        for task in tasks.tasks:
            if task.general:
                general_scores[task.name] = evaluate_task(model, tokenizer, task)[task_score_name(task.metric)]
        prompts: list[str] = []
        responses: list[str] = []
        response_nll = float("nan")
        probe = tasks.forgetting
        if probe is not None:
            prompts = [render_prompt(tokenizer, probe.template, p) for p in probe_prompts(probe)]
            responses = generate(model, tokenizer, prompts, max_new_tokens=probe.max_new_tokens, stop=probe.stop, batch_size=probe.batch_size)
            kept = [(p, r) for p, r in zip(prompts, responses) if r.strip()]
            prompts, responses = [p for p, _ in kept], [r for _, r in kept]
            if prompts:
                response_nll = score_responses(model, tokenizer, prompts, responses, batch_size=probe.batch_size).mean_nll
    return BaseReference(prompts, responses, response_nll, general_scores)


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: TasksFile,
    *,
    base_reference: BaseReference | None = None,
    transcript: Transcript | None = None,
    reference_model: torch.nn.Module | None = None,
) -> dict[str, float]:
    """Every task metric as eval/<task>/<metric>, and the forgetting metrics as eval/forgetting/<metric>.

    `base_reference` (from build_base_reference) is computed here when not given; a training loop builds
    it once and passes it to every evaluation. `transcript` collects each task row's output. The forgetting
    measures compare with the model's own base (adapters off), or with `reference_model` when given; then
    `base_reference` must come from that model. The model's train/eval mode is restored afterwards."""
    with dequantized_4bit(model):  # once for all the tasks' generate and score calls
        return _evaluate_tasks(model, tokenizer, tasks, base_reference, transcript, reference_model)


def _evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: TasksFile,
    base_reference: BaseReference | None,
    transcript: Transcript | None,
    reference_model: torch.nn.Module | None,
) -> dict[str, float]:
    if base_reference is None:
        base_reference = build_base_reference(model if reference_model is None else reference_model, tokenizer, tasks)
    metrics: dict[str, float] = {}
    drops = []
    for task in tasks.tasks:
        for name, value in evaluate_task(model, tokenizer, task, transcript=transcript).items():
            metrics[f"eval/{task.name}/{name}"] = value
        if task.general:
            drop = base_reference.general_scores[task.name] - metrics[f"eval/{task.name}/{task_score_name(task.metric)}"]
            if not TASK_METRICS[task.metric].higher_is_better:
                drop = -drop  # a lower loss is better: a rise is the drop
            metrics[f"eval/forgetting/{task.name}_drop"] = drop
            if TASK_METRICS[task.metric].generates:
                drops.append(drop)
    if drops:
        metrics["eval/forgetting/accuracy_drop"] = sum(drops) / len(drops)
    if base_reference.prompts:
        scores = score_responses(
            model, tokenizer, base_reference.prompts, base_reference.responses,
            batch_size=tasks.forgetting.batch_size if tasks.forgetting else 4, with_base_kl=True, reference_model=reference_model,
        )
        metrics["eval/forgetting/drift_kl"] = scores.mean_kl
        metrics["eval/forgetting/response_nll"] = scores.mean_nll
        metrics["eval/forgetting/response_nll_increase"] = scores.mean_nll - base_reference.response_nll
    return metrics


