"""The data section of a job: sources, mixing, templates, packing. Pure: nothing here reads a file."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from schema.base import Float, Int, PathText, Section

Format = Literal["prompt_completion", "alpaca", "chat", "question_answer", "text", "fields"]
Split = Literal["train", "validation", "test"]

# The columns each format reads, by role. `fields` maps these roles to other column names.
FORMAT_FIELDS: dict[str, dict[str, str]] = {
    "prompt_completion": {"prompt": "prompt", "completion": "completion"},
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output"},
    "chat": {"messages": "messages"},
    "question_answer": {"question": "question", "answer": "answer"},
    "text": {"text": "text"},
    "fields": {"prompt": "prompt", "completion": "completion"},
}
# Roles a row may omit (alpaca's `input` is often absent or empty).
OPTIONAL_FIELDS = {("alpaca", "input")}


class SourceConfig(Section):
    path: PathText = Field(
        description=(
            "A file (JSONL, JSON, Parquet, CSV), a glob, a directory of shards, a local HF dataset directory "
            "(saved with save_to_disk), or 'hf:<name>[:<config>]' for datasets.load_dataset (online only)."
        )
    )
    format: Format = Field(
        "prompt_completion",
        description="Row layout: prompt_completion, alpaca, chat, question_answer, text, or fields (columns mapped by `fields`).",
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Column for each role of the format when the file names it differently, e.g. {prompt: query, completion: target}. "
            "Roles: prompt_completion/fields: prompt, completion; alpaca: instruction, input, output; chat: messages; "
            "question_answer: question, answer; text: text."
        ),
    )
    weight: Float = Field(1.0, gt=0, description="Share of the training mix (normalised over all train sources).")
    role: Literal["task", "rehearsal"] = Field("task", description="task data, or general data mixed in to prevent forgetting.")
    template: str | None = Field(None, description="Prompt template of this source; None uses data.template.")
    hf_split: str = Field("train", description="Split to read from a HF dataset (directory or hf: name).")
    split: Split | None = Field(
        None, description="Keep only this part of a deterministic content-hash split (see split_fractions); None keeps all rows."
    )
    split_fractions: tuple[Float, Float, Float] = Field(
        (0.9, 0.05, 0.05), description="Shares of train, validation and test in the content-hash split; they must sum to 1."
    )
    split_key: str = Field(
        "auto",
        description=(
            "What the split hashes: 'auto' (the longest line of the row's text, so rephrasings of one example land together) "
            "or a column name."
        ),
    )

    @field_validator("split_fractions")
    @classmethod
    def _fractions_sum_to_one(cls, value: tuple[Float, Float, Float]) -> tuple[Float, Float, Float]:
        if any(share < 0 for share in value) or abs(sum(value) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions {list(value)} must be three non-negative shares summing to 1, e.g. [0.9, 0.05, 0.05]")
        return value

    @field_validator("fields")
    @classmethod
    def _known_field_roles(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        if "format" not in info.data:  # the format itself is wrong; that is the problem to report
            return value
        roles = FORMAT_FIELDS[info.data["format"]]
        unknown = sorted(set(value) - set(roles))
        if unknown:
            raise ValueError(
                f"fields names roles {unknown} that format '{info.data['format']}' does not have; its roles are {sorted(roles)}"
            )
        return value

    @field_validator("template")
    @classmethod
    def _template_known(cls, value: str | None) -> str | None:
        if value is not None:
            check_template(value)
        return value

    def column(self, role: str) -> str:
        """The column that holds `role` in this source."""
        return self.fields.get(role, FORMAT_FIELDS[self.format][role])


class MixConfig(Section):
    by: Literal["tokens", "examples"] = Field("tokens", description="What the mixing weights count.")
    window: Int = Field(8, ge=1, description="The ratio holds within every window of this many consecutive batches.")


class DataConfig(Section):
    train: list[SourceConfig] = Field(description="Training sources; a single mapping is accepted for one source.")
    eval: SourceConfig | None = Field(None, description="Held-out source for eval/loss.")
    mix: MixConfig = Field(default_factory=MixConfig, description="How the train sources interleave.")
    template: str = Field(
        "auto",
        description=(
            "How a row becomes prompt and response text: 'auto' (the tokenizer's chat template when it has one, else 'none'), "
            "'chat' (user = prompt, assistant = response), 'none' (prompt text as is), a named template "
            "(alpaca, gsm8k, qa), or an explicit string with {column} placeholders such as "
            "'Answer the following math question.\\n\\nQuestion: {question}\\n\\nAnswer: '."
        ),
    )
    packing: Literal["packed", "padded"] = Field(
        "packed",
        description="packed: several examples per seq_len row, position ids restart per example; padded: one example per row, length-grouped batches.",
    )
    overlong: Literal["drop", "truncate"] = Field("truncate", description="An example longer than seq_len is dropped, or cut to seq_len tokens.")
    max_bad_frac: Float = Field(
        0.05, ge=0, le=1, description="Fail when more than this share of a source's rows is dropped (empty, overlong) or truncated."
    )
    num_proc: Int = Field(
        1,
        ge=1,
        description=(
            "Processes that tokenise a source into the cache. The Rust tokenizer already spreads each batch over all cores, "
            "so more processes pay only on many-core machines (benchmarks/data_throughput.py measures both)."
        ),
    )

    @field_validator("train", mode="before")
    @classmethod
    def _one_source_as_list(cls, value):
        return [value] if isinstance(value, dict) else value

    @field_validator("train")
    @classmethod
    def _at_least_one(cls, value: list[SourceConfig]) -> list[SourceConfig]:
        if not value:
            raise ValueError("train lists no sources; give at least one {path: ..., format: ...}")
        return value

    @field_validator("template")
    @classmethod
    def _template_known(cls, value: str) -> str:
        check_template(value)
        return value


NAMED_TEMPLATES: dict[str, str] = {
    "alpaca": (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{prompt}\n\n### Response:\n"
    ),
    "gsm8k": "Answer the following math question.\n\nQuestion: {prompt}\n\nAnswer: ",
    "qa": "Question: {prompt}\nAnswer: ",
}
KEYWORD_TEMPLATES = ("auto", "chat", "none")
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def check_template(template: str) -> None:
    """A template is a keyword, a named template, or a string with at least one {column} placeholder."""
    if template in KEYWORD_TEMPLATES or template in NAMED_TEMPLATES:
        return
    if not PLACEHOLDER.search(template):
        raise ValueError(
            f"template {template!r} is neither {', '.join(KEYWORD_TEMPLATES)}, a named template ({', '.join(NAMED_TEMPLATES)}) "
            "nor a string with {column} placeholders"
        )
