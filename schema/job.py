"""JobConfig: everything one adapter job does, as one typed object.

It travels from the CLI through the cluster to the trainer, and serialises to YAML and JSON and back
losslessly. Every field is documented once, here, through its `description`. Nothing in this module
reads a file or imports torch: checks that need the disk run in `trainer.checks.check_job`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from schema.base import NAME_MAX_CHARS, NAME_PATTERN, Float, Int, PathText, PathValue, Section, Seed
from schema.data import DataConfig, check_template


class QuantConfig(Section):
    bits: Literal[2, 3, 4, 8, 16] = Field(
        4, description="Base-model weight precision: 2, 3 (method hqq), 4 (QLoRA), 8 (int8) or 16 (plain LoRA on the unquantized base)."
    )
    method: Literal["bnb", "hqq"] = Field(
        "bnb", description="Quantization library: bnb (bitsandbytes NF4/FP4 at 4 bits, LLM.int8 at 8) or hqq (HQQ, 2, 3, 4 or 8 bits). Ignored at 16."
    )
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of bitsandbytes; used only with method bnb and bits 4.")
    double_quant: bool = Field(True, description="bitsandbytes 4-bit: quantize the quantization constants too (saves ~0.4 bit per weight).")
    group_size: Int = Field(64, ge=8, description="hqq: weights per quantization group (a power of two that divides every layer's input size).")

    @model_validator(mode="after")
    def _method_supports_bits(self) -> QuantConfig:
        if self.method == "bnb" and self.bits in (2, 3):
            raise ValueError(f"bits {self.bits} needs method: hqq (bitsandbytes quantizes to 4 or 8 bits only)")
        return self

    @field_validator("group_size")
    @classmethod
    def _power_of_two(cls, value: int, info: ValidationInfo) -> int:
        if info.data.get("method") == "hqq" and value & (value - 1):
            raise ValueError(f"group_size {value} is not a power of two; HQQ groups weights in powers of two (e.g. 64)")
        return value


class AdaLoraConfig(Section):
    init_r: Int = Field(12, ge=1, description="Rank every adapted matrix starts with before AdaLoRA prunes it.")
    tinit: Int = Field(0, ge=0, description="Steps of warm-up before rank pruning starts.")
    tfinal: Int = Field(0, ge=0, description="Final steps during which the rank budget is held fixed.")
    delta_t: Int = Field(1, ge=1, description="Reallocate ranks every this many optimizer steps.")


TargetPreset = Literal["qv", "attn", "all-linear"]
TARGET_PRESETS: dict[str, list[str] | str] = {
    "qv": ["q_proj", "v_proj"],
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "all-linear": "all-linear",  # peft's own preset: every linear layer but the output head
}


class LoraConfig(Section):
    method: Literal["lora", "adalora", "vera"] = Field("lora", description="Adapter family, all from peft.")
    r: Int = Field(16, ge=1, description="Adapter rank (AdaLoRA: the target average rank after pruning).")
    alpha: Float = Field(16.0, gt=0, description="LoRA scaling numerator: the update is (alpha/r)·BA, or alpha/√r with rslora.")
    dropout: Float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    targets: TargetPreset | list[str] = Field(
        "attn", description="Modules to adapt: a preset (qv, attn, all-linear) or explicit module names such as [q_proj, v_proj]."
    )
    rslora: bool = Field(False, description="Rank-stabilized LoRA: scale by alpha/√r instead of alpha/r.")
    dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    plus_lr_ratio: Float | None = Field(None, gt=0, description="LoRA+: learning rate of the B matrices is lr times this ratio (16 in the paper). None disables LoRA+.")
    adalora: AdaLoraConfig = Field(default_factory=AdaLoraConfig, description="AdaLoRA schedule; used only when method is adalora.")

    @field_validator("targets")
    @classmethod
    def _some_targets(cls, value: TargetPreset | list[str]) -> TargetPreset | list[str]:
        if value == []:
            raise ValueError("targets is empty; give a preset (qv, attn, all-linear) or module names")
        return value

    @field_validator("dora")
    @classmethod
    def _dora_needs_lora(cls, value: bool, info: ValidationInfo) -> bool:
        method = info.data.get("method", "lora")
        if value and method != "lora":
            raise ValueError(f"dora applies to method 'lora' only, not '{method}'; set lora.dora: false")
        return value


class OptimConfig(Section):
    name: Literal["paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw"] = Field(
        "paged_adamw_8bit", description="Optimizer: bitsandbytes paged/8-bit AdamW variants, or torch AdamW."
    )
    lr: Float = Field(2.0e-4, gt=0, description="Peak learning rate.")
    weight_decay: Float = Field(0.0, ge=0, description="Decoupled weight decay.")
    betas: tuple[Float, Float] = Field((0.9, 0.999), description="Adam betas, each in [0, 1).")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warm-up: cosine or linear to zero, or constant.")
    warmup_ratio: Float = Field(0.03, ge=0, le=1, description="Share of max_steps spent warming up linearly from 0.")
    max_grad_norm: Float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this; None disables clipping.")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in value):
            raise ValueError(f"betas {list(value)} must each lie in [0, 1), e.g. [0.9, 0.999]")
        return value


class TrainConfig(Section):
    max_steps: Int = Field(200, ge=1, description="Optimizer steps to train.")
    micro_batch: Int = Field(8, ge=1, description="Sequences per forward pass, per worker.")
    grad_accum: Int = Field(4, ge=1, description="Micro-batches accumulated into one optimizer step.")
    seq_len: Int = Field(512, ge=8, description="Tokens per sequence (packed or padded).")
    grad_checkpointing: bool = Field(True, description="Recompute activations in the backward pass (non-reentrant) to save memory.")
    seed: Seed = Field(42, description="Seed for every random choice of the job: init, dropout, data order (0 to 2^32-1).")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Compute dtype. auto = bf16 on a CUDA device that supports it, else fp32 (bf16 on CPU is ~30x slower)."
    )
    log_every: Int = Field(1, ge=1, description="Log train metrics every this many steps.")
    on_nonfinite: Literal["stop", "skip_step"] = Field(
        "stop",
        description=(
            "A NaN or infinite loss or gradient: stop (the job fails, naming the step and the last good checkpoint) or "
            "skip_step (no update for that step; counted as train/skipped_steps). Nothing non-finite is ever saved."
        ),
    )


class EvalConfig(Section):
    every: Int = Field(50, ge=0, description="Evaluate every this many steps (0: only before and after training).")
    max_batches: Int | None = Field(None, ge=1, description="Cap on eval batches per evaluation; None evaluates the whole eval set.")
    tasks: PathValue | None = Field(None, description="Tasks YAML (schema.tasks.TasksFile): task metrics and forgetting probes run at every evaluation.")


class CheckpointConfig(Section):
    every: Int = Field(50, ge=0, description="Write a checkpoint every this many steps (0: only at the end).")
    keep: Int = Field(2, ge=1, description="Keep the newest this many checkpoints.")
    select: Literal["last", "best_eval_loss"] = Field(
        "last",
        description=(
            "Which adapter becomes adapter/: the last step's, or the one at the evaluation with the lowest eval/loss "
            "(kept in checkpoints/best/ as training goes; final.json names its step). best_eval_loss needs data.eval."
        ),
    )


class LwfConfig(Section):
    weight: Float = Field(0.5, ge=0, description="Weight of the distillation term.")
    temperature: Float = Field(1.0, gt=0, description="Softmax temperature T; the KL is scaled by T².")
    on: Literal["task", "rehearsal", "all"] = Field("task", description="Which examples' response tokens the KL covers.")


class RehearsalConfig(Section):
    source: Literal["prior"] = Field("prior", description="Where rehearsal data comes from: 'prior' = the frozen base model's own answers to `prompts`.")
    prompts: PathValue = Field(description="General prompts: .txt (one per line) or JSONL/JSON/Parquet/CSV rows in `format`.")
    format: Literal["prompt_completion", "question_answer", "alpaca", "self_instruct"] = Field(
        "self_instruct", description="Row layout of the prompts file (ignored for .txt); self_instruct reads general_prompts files."
    )
    ratio: Float = Field(0.2, gt=0, lt=1, description="Share of training tokens that are rehearsal (the task sources share the rest).")
    n: Int | None = Field(None, ge=1, description="Use the first n prompts (file order); None uses all.")
    template: str = Field("auto", description="Prompt template (data_pipeline names: auto, chat, none, named, or {column} string), used both to generate and to train.")
    max_new_tokens: Int = Field(128, ge=1, description="Length cap of each generated answer.")
    temperature: Float = Field(0.0, ge=0, description="0 answers greedily; above 0 samples at this temperature.")
    top_p: Float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass when sampling.")
    seed: Seed = Field(0, description="Seed of the sampling (unused when greedy).")
    batch_size: Int = Field(8, ge=1, description="Prompts per generation batch.")

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        check_template(value)
        return value


class ForgettingConfig(Section):
    lwf: LwfConfig | None = Field(None, description="Learning-without-Forgetting: KL(p_base^T || p_adapted^T) to the frozen base (adapters off).")
    l2: Float = Field(0.0, ge=0, description="L2 penalty weight on the adapter parameters.")
    rehearsal: RehearsalConfig | None = Field(
        None, description="Self-generated rehearsal: the frozen base answers general prompts once (cached), mixed into training."
    )


class ResourcesConfig(Section):
    gpus_per_job: Int = Field(1, ge=0, le=2, description="GPUs per job: 1, or 2 on one node (two workers, DeepSpeed ZeRO-2); 0 runs on CPU slots.")
    cpus_per_job: Int = Field(1, ge=1, description="CPUs per job (per worker); on a CPU-only cluster a CPU slot stands in for each GPU.")
    max_failures: Int = Field(2, ge=0, description="Retries after a crash, each resuming from the job's newest complete checkpoint (bad input is never retried).")


class JobConfig(Section):
    name: str = Field("job", pattern=NAME_PATTERN, max_length=NAME_MAX_CHARS, description="Job name; also its directory name inside a fleet.")
    model: PathText = Field("smollm2-135m", description="Base model: a preset (smollm2-135m), a local HF directory, a .gguf file, or a hub id (online only).")
    quant: QuantConfig = Field(default_factory=QuantConfig, description="Base-model quantization.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="The adapter.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer, schedule and clipping.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Steps, batch shape, checkpointing of activations, seed, dtype.")
    data: DataConfig = Field(description="Training and evaluation data.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation cadence.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoint cadence and retention.")
    forgetting: ForgettingConfig = Field(default_factory=ForgettingConfig, description="Measures that keep the base model's abilities.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="What the job asks of the cluster.")
    packing: bool = Field(
        True,
        description=(
            "In a fleet, the job may train in an adapter pack: one worker and one base shared with compatible jobs "
            "(see pack_key and the fleet's packing). false trains it alone. (data.packing is another thing: examples packed into sequences.)"
        ),
    )
    output_dir: PathValue = Field(Path("runs/job"), description="Where the job writes its adapter, checkpoints, logs and summary.")

    @model_validator(mode="after")
    def _method_fits_resources(self) -> JobConfig:
        if self.lora.method == "adalora" and self.resources.gpus_per_job > 1:
            raise ValueError("lora.method adalora runs on one worker only; set resources.gpus_per_job: 1 (or 0 on CPU)")
        if self.checkpoint.select == "best_eval_loss" and self.data.eval is None:
            raise ValueError("checkpoint.select best_eval_loss needs an eval/loss: add data.eval, or set checkpoint.select: last")
        return self

    def to_yaml(self) -> str:
        from schema.yamlfile import dump_yaml

        return dump_yaml(self.model_dump(mode="json"))


# Fields that do not change a job's results: a resumed run may differ in these.
RESULT_NEUTRAL_FIELDS = ("name", "output_dir", "resources", "packing", "checkpoint.every", "checkpoint.keep", "eval", "train.log_every")


def pack_key(job: JobConfig) -> tuple:
    """What jobs must share to train in one pack: one frozen base and one forward pass for all.

    - the base: `model`, `quant` (bits, method, type, double quantization, group size);
    - the forward pass: `train.seq_len`, `train.dtype`, `train.grad_checkpointing` and `data.packing`
      (packed rows reach the model without an attention mask, padded rows with one).

    Everything else may differ: data and rehearsal mixes, r, alpha, dropout, rsLoRA, target modules,
    optimizer, lr and schedule, seed, max_steps, micro_batch and grad_accum, LwF and L2, and the eval and
    checkpoint cadence. Jobs that run alone get a key naming only themselves: DoRA, AdaLoRA and VeRA
    (peft's own forward applies one adapter to a whole batch), 2-worker jobs (DeepSpeed ZeRO-2), and jobs
    that set `packing: false`.
    """
    shared = (job.model, *job.quant.model_dump().values(), job.train.seq_len, job.train.dtype, job.train.grad_checkpointing, job.data.packing)
    alone = job.lora.method != "lora" or job.lora.dora or job.resources.gpus_per_job > 1 or not job.packing
    return ("alone", job.name, *shared) if alone else shared
