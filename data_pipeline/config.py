"""The data section of the job config (owned by data_pipeline; assembled into JobConfig by launch)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

STRICT = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(BaseModel):
    model_config = STRICT
    path: str = Field(description="A file (JSONL, JSON, Parquet, CSV), a glob, a directory of shards, or a local HF dataset directory.")
    format: Literal["prompt_completion", "alpaca", "chat", "question_answer", "text", "fields"] = Field(
        "prompt_completion", description="Row layout; 'fields' maps columns explicitly through `fields`."
    )
    weight: float = Field(1.0, gt=0, description="Share of the training mix (normalised over all train sources).")
    role: Literal["task", "rehearsal"] = Field("task", description="task data, or general data mixed in to prevent forgetting.")


class MixConfig(BaseModel):
    model_config = STRICT
    by: Literal["tokens", "examples"] = Field("tokens", description="What the mixing weights count.")
    window: int = Field(8, ge=1, description="The ratio holds within every window of this many consecutive batches.")


class DataConfig(BaseModel):
    model_config = STRICT
    train: list[SourceConfig] = Field(description="Training sources; a single mapping is accepted for one source.")
    eval: SourceConfig | None = Field(None, description="Held-out source for eval/loss.")
    mix: MixConfig = Field(default_factory=MixConfig, description="How the train sources interleave.")

    @field_validator("train", mode="before")
    @classmethod
    def _one_source_as_list(cls, value):
        return [value] if isinstance(value, dict) else value
