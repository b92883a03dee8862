"""The trainer's sections of the job config.

Each room owns the schema of the sections it reads; `launch.config.JobConfig` assembles them.
Every field is documented here, once, through its `description`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

STRICT = ConfigDict(extra="forbid", validate_assignment=True)


class QuantConfig(BaseModel):
    model_config = STRICT
    bits: Literal[4, 8, 16] = Field(4, description="Base-model weight precision: 4 (QLoRA), 8 (int8) or 16 (plain LoRA on the unquantized base).")
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (bitsandbytes); ignored unless bits is 4.")
    double_quant: bool = Field(True, description="Quantize the 4-bit quantization constants too (saves ~0.4 bit per weight).")


class AdaLoraConfig(BaseModel):
    model_config = STRICT
    init_r: int = Field(12, ge=1, description="Rank every adapted matrix starts with before AdaLoRA prunes it.")
    tinit: int = Field(0, ge=0, description="Steps of warm-up before rank pruning starts.")
    tfinal: int = Field(0, ge=0, description="Final steps during which the rank budget is held fixed.")
    delta_t: int = Field(1, ge=1, description="Reallocate ranks every this many optimizer steps.")


class LoraConfig(BaseModel):
    model_config = STRICT
    method: Literal["lora", "adalora", "vera"] = Field("lora", description="Adapter family, all from peft.")
    r: int = Field(16, ge=1, description="Adapter rank (AdaLoRA: the target average rank after pruning).")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator: the update is (alpha/r)·BA, or alpha/√r with rslora.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    targets: Literal["qv", "attn", "all-linear"] | list[str] = Field(
        "attn", description="Modules to adapt: a preset (qv, attn, all-linear) or explicit module names such as [q_proj, v_proj]."
    )
    rslora: bool = Field(False, description="Rank-stabilized LoRA: scale by alpha/√r instead of alpha/r.")
    dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    plus_lr_ratio: float | None = Field(None, gt=0, description="LoRA+: learning rate of the B matrices is lr times this ratio (16 in the paper). None disables LoRA+.")
    adalora: AdaLoraConfig = Field(default_factory=AdaLoraConfig, description="AdaLoRA schedule; used only when method is adalora.")

    @model_validator(mode="after")
    def _method_options(self) -> LoraConfig:
        if self.method != "lora" and self.dora:
            raise ValueError(f"dora applies to method 'lora' only, not '{self.method}'; set lora.dora: false")
        if self.targets == []:
            raise ValueError("targets is empty; give a preset (qv, attn, all-linear) or module names")
        return self


class OptimConfig(BaseModel):
    model_config = STRICT
    name: Literal["paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw"] = Field(
        "paged_adamw_8bit", description="Optimizer: bitsandbytes paged/8-bit AdamW variants, or torch AdamW."
    )
    lr: float = Field(2.0e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warm-up: cosine or linear to zero, or constant.")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Share of max_steps spent warming up linearly from 0.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this; None disables clipping.")


class TrainConfig(BaseModel):
    model_config = STRICT
    max_steps: int = Field(200, ge=1, description="Optimizer steps to train.")
    micro_batch: int = Field(8, ge=1, description="Sequences per forward pass, per worker.")
    grad_accum: int = Field(4, ge=1, description="Micro-batches accumulated into one optimizer step.")
    seq_len: int = Field(512, ge=8, description="Tokens per sequence (packed or padded).")
    grad_checkpointing: bool = Field(True, description="Recompute activations in the backward pass (non-reentrant) to save memory.")
    seed: int = Field(42, description="Seed for every random choice of the job: init, dropout, data order.")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Compute dtype. auto = bf16 on a CUDA device that supports it, else fp32 (bf16 on CPU is ~30x slower)."
    )
    log_every: int = Field(1, ge=1, description="Log train metrics every this many steps.")


class EvalConfig(BaseModel):
    model_config = STRICT
    every: int = Field(50, ge=0, description="Evaluate every this many steps (0: only before and after training).")
    max_batches: int | None = Field(None, ge=1, description="Cap on eval batches per evaluation; None evaluates the whole eval set.")
    tasks: Path | None = Field(
        None, description="Tasks YAML (trainer.evaluation.TasksFile): task metrics and forgetting probes run at every evaluation."
    )

    @field_validator("tasks")
    @classmethod
    def _tasks_file_valid(cls, value: Path | None) -> Path | None:
        if value is not None:
            from trainer.evaluation import load_tasks_file  # torch-heavy; only when a tasks file is set

            load_tasks_file(value)
        return value


class CheckpointConfig(BaseModel):
    model_config = STRICT
    every: int = Field(50, ge=0, description="Write a checkpoint every this many steps (0: only at the end).")
    keep: int = Field(2, ge=1, description="Keep the newest this many checkpoints.")


class LwfConfig(BaseModel):
    model_config = STRICT
    weight: float = Field(0.5, ge=0, description="Weight of the distillation term.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature T; the KL is scaled by T².")
    on: Literal["task", "rehearsal", "all"] = Field("task", description="Which examples' response tokens the KL covers.")


class RehearsalConfig(BaseModel):
    model_config = STRICT
    source: Literal["prior"] = Field("prior", description="Where rehearsal data comes from: 'prior' = the frozen base model's own answers to `prompts`.")
    prompts: Path = Field(description="General prompts: .txt (one per line) or JSONL/JSON/Parquet/CSV rows in `format`.")
    format: Literal["prompt_completion", "question_answer", "alpaca", "self_instruct"] = Field(
        "self_instruct", description="Row layout of the prompts file (ignored for .txt); self_instruct reads general_prompts files."
    )
    ratio: float = Field(0.2, gt=0, lt=1, description="Share of training tokens that are rehearsal (the task sources share the rest).")
    n: int | None = Field(None, ge=1, description="Use the first n prompts (file order); None uses all.")
    template: str = Field("auto", description="Prompt template (data_pipeline names: auto, chat, none, named, or {column} string), used both to generate and to train.")
    max_new_tokens: int = Field(128, ge=1, description="Length cap of each generated answer.")
    temperature: float = Field(0.0, ge=0, description="0 answers greedily; above 0 samples at this temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass when sampling.")
    seed: int = Field(0, description="Seed of the sampling (unused when greedy).")
    batch_size: int = Field(8, ge=1, description="Prompts per generation batch.")

    @model_validator(mode="after")
    def _prompts_and_template(self) -> RehearsalConfig:
        from data_pipeline.config import check_template
        from trainer.evaluation import read_prompts  # torch-heavy; only when rehearsal is asked for

        check_template(self.template)
        read_prompts(self.prompts, self.format)  # a missing file or field fails here, not mid-job
        return self


class ForgettingConfig(BaseModel):
    model_config = STRICT
    lwf: LwfConfig | None = Field(None, description="Learning-without-Forgetting: KL(p_base^T || p_adapted^T) to the frozen base (adapters off).")
    l2: float = Field(0.0, ge=0, description="L2 penalty weight on the adapter parameters.")
    rehearsal: RehearsalConfig | None = Field(
        None, description="Self-generated rehearsal: the frozen base answers general prompts once (cached), mixed into training."
    )
