"""The `compose:` section of a fleet file (owned by the composer): compositions to run once the
fleet's jobs have finished. FleetConfig carries it as `compose: list[ComposeConfig]`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

STRICT = ConfigDict(extra="forbid", validate_assignment=True)


class LearnConfig(BaseModel):
    model_config = STRICT
    tasks: Path = Field(description="Tasks file (the evaluation's YAML format) whose rows and references are the validation examples to fit on.")
    examples: int = Field(16, ge=1, description="Validation examples used for the fit, taken across the tasks in turn.")
    steps: int = Field(60, ge=1, description="Adam steps on the mixing weights.")
    lr: float = Field(0.05, gt=0, description="Adam learning rate for the mixing weights.")
    average: Literal["example", "token"] = Field(
        "example", description="How the fit's NLL averages: each example's token mean, then over examples (tasks with long answers do not outweigh label tasks), or over all tokens."
    )
    l1: float = Field(0.01, ge=0, description="L1 penalty on the weights (per layer group: mean over groups of Σᵢ|wᵢ|).")
    per_layer: bool = Field(False, description="Fit one weight per adapter and decoder layer instead of one per adapter.")
    base_precision: Literal[4, 8, 16] = Field(16, description="Precision of the base model during the fit (16 is fastest on CPU).")
    max_len: int = Field(512, ge=8, description="Examples are cut to their last max_len tokens.")


class ComposeConfig(BaseModel):
    model_config = STRICT
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Name of the composition; its adapter goes to <fleet output_dir>/compose/<name>.")
    adapters: list[str] = Field(
        min_length=1, description="Job names of this fleet (their adapter/ is used) or paths of PEFT adapter directories."
    )
    method: Literal["linear", "task_arithmetic", "svd", "ties", "dare_linear", "dare_ties", "magnitude", "learned"] = Field(
        "linear", description="How to combine: exact linear sum, task arithmetic (λ·Σ), SVD re-compression, TIES, DARE, magnitude pruning, or learned weights."
    )
    weights: list[float] | None = Field(None, description="One weight per adapter; None averages (linear, svd) or adds with weight 1 (others). Ignored by learned.")
    lam: float = Field(1.0, description="λ, the overall strength of task_arithmetic, ties, dare_* and magnitude.")
    density: float = Field(0.5, gt=0, le=1, description="Share of entries kept by ties, dare_* and magnitude.")
    seed: int = Field(0, description="Seed of the DARE drop masks.")
    svd_rank: int | None = Field(None, ge=1, description="Re-compress the result to this rank by truncated SVD (required rank for svd; default Σ ranks for dense methods).")
    learn: LearnConfig | None = Field(None, description="How to fit the weights; required by method learned.")

    @model_validator(mode="after")
    def _consistent(self) -> ComposeConfig:
        if self.weights is not None and len(self.weights) != len(self.adapters):
            raise ValueError(f"{len(self.weights)} weights for {len(self.adapters)} adapters; give one weight per adapter or leave weights out")
        if self.method == "learned" and self.learn is None:
            raise ValueError("method learned needs a `learn` section with at least `tasks` (the validation examples)")
        if self.method != "learned" and self.learn is not None:
            raise ValueError(f"a `learn` section is used by method learned only, not {self.method!r}; remove it or set method: learned")
        if self.method == "linear" and self.lam != 1.0:
            raise ValueError("linear is Σ wᵢ·ΔWᵢ exactly; put the strength into weights, or use method task_arithmetic with lam")
        return self


def compose_problems(compositions: list[ComposeConfig], job_names: list[str]) -> list[str]:
    """Problems a fleet's compose: section has that its schema cannot see, found before any job runs:
    an adapter that is neither a job of the fleet nor an existing PEFT directory, a repeated name."""
    problems = []
    names = [c.name for c in compositions]
    for repeated in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"compose: the name {repeated!r} is used twice; each composition needs its own name (it is its directory)")
    for index, composition in enumerate(compositions):
        for adapter in composition.adapters:
            if adapter not in job_names and not (Path(adapter) / "adapter_config.json").is_file():
                problems.append(
                    f"compose[{index}] ({composition.name}).adapters: {adapter!r} is neither a job of this fleet "
                    f"({', '.join(job_names)}) nor a PEFT adapter directory; fix the name or the path"
                )
        if composition.learn is not None and not composition.learn.tasks.is_file():
            problems.append(f"compose[{index}] ({composition.name}).learn.tasks: {str(composition.learn.tasks)!r} does not exist; give the tasks YAML path")
    return problems
