"""The tasks file: what an evaluation measures (task metrics) and how it watches for forgetting.

Rows are read exactly as a training source reads them (same formats, same content-hash split), and
prompts are rendered with the same templates, so a task is asked as its training data was.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, ValidationInfo, field_validator, model_validator

from schema.base import NAME_PATTERN, Float, Int, PathValue, Section, Seed
from schema.data import NAMED_TEMPLATES, check_template

# The data pipeline's formats, plus self_instruct: the general_prompts files, where the prompt is
# `instruction` + `instances[0].input` and the reference `instances[0].output`.
RowFormat = Literal["prompt_completion", "question_answer", "alpaca", "fields", "self_instruct"]
# The metrics a task may name; trainer.evaluation.metrics registers one scorer under each.
Metric = Literal["gsm8k", "exact_match", "contains", "label", "loss", "ppl"]
METRICS: tuple[str, ...] = get_args(Metric)
TEMPLATE_HELP = (
    "'auto' (the chat template when the tokenizer has one, else 'none'), 'chat' (one user turn), 'none' (the prompt as is), "
    f"a named template ({', '.join(NAMED_TEMPLATES)}) or a string with {{column}} placeholders ({{prompt}} is the prompt text)"
)


class EvalTaskConfig(Section):
    name: str = Field(pattern=NAME_PATTERN, description="Task name; metrics are logged as eval/<name>/<metric>.")
    path: PathValue = Field(description="Rows to evaluate: a JSONL, JSON, Parquet or CSV file, a glob or a directory, read as a data source is.")
    format: RowFormat = Field("prompt_completion", description="Row layout: prompt_completion, question_answer (GSM8K), alpaca, fields (mapped by `fields`) or self_instruct (general_prompts).")
    fields: dict[str, str] = Field(default_factory=dict, description="Column for each role of the format when the file names it differently (as in data sources).")
    split: Literal["train", "validation", "test"] | None = Field(
        None, description="Keep only this part of the data pipeline's content-hash split (same hash as training sources); None keeps all rows."
    )
    split_fractions: tuple[Float, Float, Float] = Field((0.9, 0.05, 0.05), description="Shares of train, validation and test; must equal the training source's.")
    split_key: str = Field("auto", description="What the split hashes: 'auto' (the row's uncommon words) or a column name; must equal the training source's.")
    metric: Metric = Field(
        description="gsm8k (first or last integer), exact_match, contains, label (normalised label match), loss or ppl on the references."
    )
    n: Int | None = Field(64, ge=1, description="Rows evaluated (after `where` and the seeded shuffle); None evaluates every row.")
    seed: Seed | None = Field(0, description="Shuffle rows with this seed before taking n; None keeps file order.")
    where: dict[str, str] = Field(default_factory=dict, description="Keep only rows whose fields equal these values, e.g. {template: Is_this_product_review_positive}.")
    template: str = Field("auto", description=f"How the prompt is rendered for the model: {TEMPLATE_HELP}.")
    max_new_tokens: Int = Field(32, ge=1, description="Generation stops after this many new tokens.")
    stop: list[str] = Field(default_factory=list, description="Generation stops at the first of these strings; the output is cut there.")
    labels: list[str] | None = Field(None, description="Label set for metric 'label'; None uses the distinct references of the evaluated rows.")
    general: bool = Field(False, description="A general ability: the drop from the base model's score counts as forgetting (eval/forgetting/<name>_drop).")
    batch_size: Int = Field(8, ge=1, description="Prompts per generation or scoring batch.")

    @field_validator("labels")
    @classmethod
    def _labels_for_label_metric(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        metric = info.data.get("metric")
        if value is not None and metric is not None and metric != "label":
            raise ValueError(f"labels are used by metric 'label' only, not '{metric}'; remove labels or set metric: label")
        if value == []:
            raise ValueError("labels is empty; list the label set or leave it out to use the distinct references")
        return value

    @field_validator("split_fractions")
    @classmethod
    def _fractions_sum_to_one(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(share < 0 for share in value) or abs(sum(value) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions {list(value)} must be three non-negative shares summing to 1")
        return value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if "" in value:
            raise ValueError("stop holds an empty string, which would cut every output to nothing; remove it")
        return value

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        check_template(value)
        return value


class ForgettingProbeConfig(Section):
    prompts: PathValue = Field(description="Held-out general prompts: .txt (one per line) or JSONL/JSON/Parquet/CSV in `format`.")
    format: RowFormat = Field("self_instruct", description="Row layout of the prompts file (ignored for .txt).")
    n: Int = Field(32, ge=1, description="Prompts the base model answers; the forgetting metrics are measured on its answers.")
    seed: Seed | None = Field(0, description="Shuffle prompts with this seed before taking n; None keeps file order.")
    template: str = Field("auto", description=f"How a prompt is rendered: {TEMPLATE_HELP}.")
    max_new_tokens: Int = Field(48, ge=1, description="Length cap of the base model's answers.")
    stop: list[str] = Field(default_factory=list, description="The base answers are cut at the first of these strings.")
    batch_size: Int = Field(8, ge=1, description="Prompts per generation or scoring batch.")

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        check_template(value)
        return value


class TasksFile(Section):
    tasks: list[EvalTaskConfig] = Field(default_factory=list, description="Tasks to evaluate, each with its own data, prompt template and metric.")
    forgetting: ForgettingProbeConfig | None = Field(None, description="General prompts for drift and NLL; None skips those two metrics.")

    @model_validator(mode="after")
    def _unique_names(self) -> TasksFile:
        names = [task.name for task in self.tasks]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"task names must be unique; rename the repeated {duplicates}")
        if not self.tasks and self.forgetting is None:
            raise ValueError("the file lists no tasks and no forgetting probe; add at least one")
        return self
