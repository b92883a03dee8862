"""A composition: adapters combined into one. The `compose:` list of a fleet file, and what
`lorafleet compose` builds from its options."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from schema.base import NAME_MAX_CHARS, NAME_PATTERN, Float, Int, PathValue, Section, Seed

ComposeMethod = Literal["linear", "task_arithmetic", "svd", "ties", "dare_linear", "dare_ties", "magnitude", "learned"]
COMPOSE_METHODS: tuple[str, ...] = get_args(ComposeMethod)


class LearnConfig(Section):
    tasks: PathValue = Field(description="Tasks file (the evaluation's YAML format) whose rows and references are the validation examples to fit on.")
    examples: Int = Field(16, ge=1, description="Validation examples used for the fit, taken across the tasks in turn.")
    steps: Int = Field(60, ge=1, description="Adam steps on the mixing weights.")
    lr: Float = Field(0.05, gt=0, description="Adam learning rate for the mixing weights.")
    average: Literal["example", "token"] = Field(
        "example", description="How the fit's NLL averages: each example's token mean, then over examples (tasks with long answers do not outweigh label tasks), or over all tokens."
    )
    l1: Float = Field(0.01, ge=0, description="L1 penalty on the weights (per layer group: mean over groups of Σᵢ|wᵢ|).")
    per_layer: bool = Field(False, description="Fit one weight per adapter and decoder layer instead of one per adapter.")
    base_precision: Literal[4, 8, 16] = Field(16, description="Precision of the base model during the fit (16 is fastest on CPU).")
    max_len: Int = Field(512, ge=8, description="Examples are cut to their last max_len tokens.")


class ComposeConfig(Section):
    # `lambda` is a Python keyword: the field is `lambda_` in code and `lambda` in every file and option.
    model_config = ConfigDict(**Section.model_config, validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)
    name: str = Field(pattern=NAME_PATTERN, max_length=NAME_MAX_CHARS, description="Name of the composition; its adapter goes to <fleet output_dir>/compose/<name>.")
    adapters: list[str] = Field(
        min_length=1, description="Job names of this fleet (their adapter/ is used) or paths of PEFT adapter directories."
    )
    method: ComposeMethod = Field(
        "linear", description="How to combine: exact linear sum, task arithmetic (λ·Σ), SVD re-compression, TIES, DARE, magnitude pruning, or learned weights."
    )
    weights: list[Float] | None = Field(None, description="One weight per adapter; None averages (linear, svd) or adds with weight 1 (others). Ignored by learned.")
    lambda_: Float = Field(1.0, alias="lambda", description="λ, the overall strength of task_arithmetic, ties, dare_* and magnitude.")
    density: Float = Field(0.5, gt=0, le=1, description="Share of entries kept by ties, dare_* and magnitude.")
    seed: Seed = Field(0, description="Seed of the DARE drop masks.")
    svd_rank: Int | None = Field(None, ge=1, description="Re-compress the result to this rank by truncated SVD (required rank for svd; default Σ ranks for dense methods).")
    learn: LearnConfig | None = Field(None, description="How to fit the weights; required by method learned.")

    @field_validator("weights")
    @classmethod
    def _one_weight_per_adapter(cls, value: list[float] | None, info: ValidationInfo) -> list[float] | None:
        adapters = info.data.get("adapters")
        if value is not None and adapters is not None and len(value) != len(adapters):
            raise ValueError(f"{len(value)} weights for {len(adapters)} adapters; give one weight per adapter or leave weights out")
        return value

    @field_validator("lambda_")
    @classmethod
    def _no_strength_for_linear(cls, value: float, info: ValidationInfo) -> float:
        if info.data.get("method") == "linear" and value != 1.0:
            raise ValueError("linear is Σ wᵢ·ΔWᵢ exactly; put the strength into weights, or use method task_arithmetic with lambda")
        return value

    @field_validator("learn")
    @classmethod
    def _learn_for_learned(cls, value: LearnConfig | None, info: ValidationInfo) -> LearnConfig | None:
        method = info.data.get("method")
        if value is not None and method is not None and method != "learned":
            raise ValueError(f"a `learn` section is used by method learned only, not {method!r}; remove it or set method: learned")
        return value

    @model_validator(mode="after")
    def _learned_has_learn(self) -> ComposeConfig:
        if self.method == "learned" and self.learn is None:
            raise ValueError("method learned needs a `learn` section with at least `tasks` (the validation examples)")
        return self
