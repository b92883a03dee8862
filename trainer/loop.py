"""`run_job`: the whole of one adapter job, as one loop that reads top to bottom."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import yaml

from data_pipeline import DataError, build_eval_batches, build_train_stream, validate_data
from trainer.adapters import attach_adapter, parameter_groups
from trainer.checkpoint import (
    CHECKPOINTS,
    atomic_directory,
    atomic_write_text,
    latest_checkpoint,
    load_checkpoint,
    results_changing_differences,
    save_checkpoint,
)
from trainer.engines import DeepSpeedEngine, LocalEngine, World
from trainer.evaluation import build_base_reference, evaluate_tasks, load_tasks_file
from trainer.losses import MODEL_INPUTS, compute_loss, token_cross_entropy_sum
from trainer.models import PRESETS, ModelSpecError, compute_dtype, default_device, load_base_model, load_tokenizer
from trainer.optim import build_optimizer, build_scheduler
from trainer.prior import ensure_prior_dataset, with_prior_rehearsal
from trainer.tracking import Tracker, configure_console, peak_memory_bytes

if TYPE_CHECKING:
    from launch.config import JobConfig


class JobError(RuntimeError):
    """A job that cannot start or continue; the message says why and what to do."""


@dataclass
class JobResult:
    output_dir: Path
    adapter_dir: Path
    steps: int
    tokens: int
    wall_time_s: float
    train_loss: float
    eval_loss: float | None
    initial_eval_loss: float | None
    peak_memory_bytes: int
    resumed_from_step: int | None
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobResult:
        return cls(**{**data, "output_dir": Path(data["output_dir"]), "adapter_dir": Path(data["adapter_dir"])})


def run_job(config: JobConfig, report: Callable[[dict], None] | None = None) -> JobResult:
    """Train `config`'s adapter. Idempotent: resumes from the newest complete checkpoint in output_dir,
    and returns the recorded result of a job that already finished."""
    output_dir = Path(config.output_dir)
    config_dump = config.model_dump(mode="json")
    finished = _finished_result(output_dir, config_dump)
    if finished is not None:
        return finished
    try:
        validate_data(config.data)
    except DataError as err:
        raise JobError(str(err)) from None
    resume_from = latest_checkpoint(output_dir)
    _check_resumable(output_dir, resume_from, config_dump)

    configure_console()
    world = World.from_env()
    train, optim = config.train, config.optim
    _seed_everything(train.seed)
    device = default_device()
    dtype = compute_dtype(train.dtype, device)
    try:
        tokenizer = load_tokenizer(config.model)
        base = load_base_model(config.model, config.quant, dtype, device)
    except ModelSpecError as err:
        raise JobError(str(err)) from None
    data = config.data
    rehearsal = config.forgetting.rehearsal
    if rehearsal is not None:  # the frozen base's own answers, generated once per base model and cached
        data = with_prior_rehearsal(data, ensure_prior_dataset(config.model, rehearsal, quant=config.quant, model=base, tokenizer=tokenizer), rehearsal)
    model = attach_adapter(base, config.lora, train.max_steps, train.grad_checkpointing, base_name=_adapter_base_name(config.model))
    optimizer = build_optimizer(parameter_groups(model, optim, config.lora), optim)
    scheduler = build_scheduler(optimizer, optim, train.max_steps)
    adalora = config.lora.method == "adalora"
    packed = config.data.packing == "packed"
    if world.size > 1:
        if adalora:
            raise JobError("lora.method adalora runs on one worker only; set resources.gpus_per_job: 1")
        engine = DeepSpeedEngine(model, optimizer, scheduler, optim.max_grad_norm, train.micro_batch, train.grad_accum, dtype)
    else:
        engine = LocalEngine(model, optimizer, scheduler, optim.max_grad_norm, after_update=model.base_model.update_and_allocate if adalora else _no_op)
    adalora_reg = model.peft_config["default"].orth_reg_weight if adalora else 0.0

    try:
        stream = build_train_stream(
            data, tokenizer, seq_len=train.seq_len, micro_batch=train.micro_batch, seed=train.seed, rank=world.rank, world_size=world.size
        )
        eval_batches = build_eval_batches(data, tokenizer, seq_len=train.seq_len, micro_batch=train.micro_batch) if data.eval else []
        eval_batches = [_model_batch(b, packed) for b in eval_batches]
    except DataError as err:
        raise JobError(str(err)) from None

    step, tokens, elapsed_s, initial_eval_loss = 0, 0, 0.0, None
    if resume_from is not None:
        trainer_state, engine_state = load_checkpoint(resume_from, model)
        if len(trainer_state["data"]) != world.size:
            raise JobError(
                f"{resume_from} was written by {len(trainer_state['data'])} worker(s) and this run has {world.size}: "
                f"resume with the same resources.gpus_per_job, or use a new output_dir"
            )
        engine.load_state_dict(engine_state, resume_from / "shards")
        stream.load_state_dict(trainer_state["data"][world.rank])
        step, tokens, elapsed_s = trainer_state["step"], trainer_state["tokens"], trainer_state["elapsed_s"]
        initial_eval_loss = trainer_state["initial_eval_loss"]
    elif world.is_main:
        atomic_write_text(output_dir / "config.yaml", yaml.safe_dump(config_dump, sort_keys=False))

    tracker = Tracker(output_dir, train.max_steps, step, report) if world.is_main else None
    log = tracker.log if tracker is not None else _no_op_log
    tasks = load_tasks_file(config.eval.tasks) if config.eval.tasks else None
    # What the base does on the tasks and the forgetting probe (adapters off), to measure drift against.
    base_reference = build_base_reference(model, tokenizer, tasks) if tasks else None

    def evaluate(at_step: int) -> dict[str, float]:
        metrics = {"eval/loss": evaluate_loss(model, eval_batches, config.eval.max_batches)} if eval_batches else {}
        if tasks is not None:
            metrics.update(evaluate_tasks(model, tokenizer, tasks, base_reference=base_reference))
        if metrics:
            log(at_step, metrics)
        return metrics

    eval_metrics: dict[str, float] = {}
    if resume_from is None:
        eval_metrics = evaluate(0)
        initial_eval_loss = eval_metrics.get("eval/loss")

    def write_checkpoint(at_step: int) -> None:
        shards = output_dir / CHECKPOINTS / f".shards-step-{at_step}"
        engine.save_sharded_state(shards)  # collective: every worker writes its own partition
        data_states = world.gather(stream.state_dict())  # each rank streams its own shard
        if world.is_main:
            state = {"tokens": tokens, "elapsed_s": elapsed_s, "initial_eval_loss": initial_eval_loss, "data": data_states}
            move_shards = lambda tmp: shards.rename(tmp / "shards") if shards.exists() else None  # noqa: E731
            save_checkpoint(output_dir, at_step, model, engine.state_dict(), state, config.checkpoint.keep, extra_files=move_shards)
        world.barrier()

    train_loss, eval_loss = math.nan, initial_eval_loss
    model.train()
    while step < train.max_steps:
        started = time.perf_counter()
        micro_batches = [_to_device(next(stream), device) for _ in range(train.grad_accum)]
        data_wait_s = time.perf_counter() - started
        step_tokens = int(world.sum(sum(int(b["attention_mask"].sum()) for b in micro_batches)))
        micro_batches = [_model_batch(b, packed) for b in micro_batches]
        # Normalise by the labelled tokens of the whole step on every worker. DeepSpeed averages
        # gradients over workers, so each worker divides by the global count / world size.
        labelled = world.sum(sum(float((b["labels"][:, 1:] != -100).sum()) for b in micro_batches))
        token_count = max(labelled, 1.0) / world.size  # a step of prompt-only rows has a zero loss, not 0/0
        loss_sum = task_sum = kl_sum = 0.0
        l2 = 0.0
        for batch in micro_batches:
            terms = compute_loss(model, batch, token_count, config.forgetting, train.grad_accum, adalora_reg)
            engine.backward(terms.total)
            loss_sum += float(terms.total.detach())
            task_sum += float(terms.task.detach())
            kl_sum += float(terms.kl)
            l2 = float(terms.l2)
        step += 1
        grad_norm = engine.step(step)
        step_time_s = time.perf_counter() - started
        elapsed_s += step_time_s
        tokens += step_tokens
        # Per-worker sums of token means are 1/world of the global mean; adding them up gives it back.
        train_loss = world.sum(loss_sum) / world.size
        metrics = {
            "train/loss": train_loss,
            "train/task_loss": world.sum(task_sum) / world.size,
            "train/lr": engine.lr(),
            "train/grad_norm": grad_norm,
            "perf/tokens_per_s": step_tokens / step_time_s,
            "perf/step_time_s": step_time_s,
            "perf/data_wait_frac": data_wait_s / step_time_s,
            "mem/peak_bytes": float(peak_memory_bytes()),
            **stream.stats(),
        }
        if config.forgetting.lwf is not None:
            metrics["train/kl"] = world.sum(kl_sum) / world.size
        if config.forgetting.l2 > 0:
            metrics["train/l2"] = l2
        if step % train.log_every == 0 or step == train.max_steps:
            log(step, metrics)
        if step == train.max_steps or (config.eval.every and step % config.eval.every == 0):
            eval_metrics = evaluate(step)
            eval_loss = eval_metrics.get("eval/loss")
        if step == train.max_steps or (config.checkpoint.every and step % config.checkpoint.every == 0):
            write_checkpoint(step)

    result = JobResult(
        output_dir=output_dir,
        adapter_dir=output_dir / "adapter",
        steps=step,
        tokens=tokens,
        wall_time_s=elapsed_s,
        train_loss=train_loss,
        eval_loss=eval_loss,
        initial_eval_loss=initial_eval_loss,
        peak_memory_bytes=peak_memory_bytes(),
        resumed_from_step=int(resume_from.name.removeprefix("step-")) if resume_from else None,
        metrics=eval_metrics,
    )
    if tracker is not None:
        atomic_directory(result.adapter_dir, lambda tmp: model.save_pretrained(tmp, save_embedding_layers=False))
        hparam_values = _flatten(config_dump)
        tracker.log_hparams(hparam_values, {"hparam/train_loss": train_loss, "hparam/eval_loss": eval_loss or math.nan})
        tracker.close()
        atomic_write_text(output_dir / "final.json", json.dumps(result.to_dict(), indent=1))
    world.barrier()
    return result


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], max_batches: int | None = None) -> float:
    """Token-mean cross-entropy of the response tokens over the eval batches (dropout off)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, count = 0.0, 0
    for batch in batches[:max_batches]:
        batch = _to_device(batch, device)
        logits = model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}).logits
        loss_sum += float(token_cross_entropy_sum(logits, batch["labels"]))
        count += int((batch["labels"][:, 1:] != -100).sum())
    model.train(was_training)
    return loss_sum / max(count, 1)


def _finished_result(output_dir: Path, config_dump: dict[str, Any]) -> JobResult | None:
    final = output_dir / "final.json"
    if not final.is_file():
        return None
    saved = yaml.safe_load((output_dir / "config.yaml").read_text())
    if diffs := results_changing_differences(saved, config_dump):
        raise JobError(f"{output_dir} holds a finished job with a different config:\n  " + "\n  ".join(diffs) + "\nUse a new output_dir.")
    return JobResult.from_dict(json.loads(final.read_text()))


def _check_resumable(output_dir: Path, checkpoint: Path | None, config_dump: dict[str, Any]) -> None:
    if checkpoint is None:
        return
    saved = yaml.safe_load((output_dir / "config.yaml").read_text())
    if diffs := results_changing_differences(saved, config_dump):
        raise JobError(
            f"cannot resume {checkpoint}: these fields differ from the checkpointed config:\n  "
            + "\n  ".join(diffs)
            + f"\nRestore them, or use a new output_dir (or delete {output_dir / CHECKPOINTS}) to start over."
        )


def _adapter_base_name(spec: str) -> str:
    """What adapter_config.json records as its base: the preset or hub id as given, a local path made absolute."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if spec not in PRESETS and path.exists() else spec


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _model_batch(batch: dict[str, torch.Tensor], packed: bool) -> dict[str, torch.Tensor]:
    """Packed rows go to the model without an attention mask: transformers then builds block-diagonal
    masks from the restarting position ids, so packed examples never attend to each other."""
    return {k: v for k, v in batch.items() if not (packed and k == "attention_mask")}


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _no_op(*_: Any) -> None:
    """Nothing to do after an update unless the adapter is AdaLoRA."""


def _no_op_log(step: int, metrics: dict[str, float]) -> None:
    """Workers other than rank 0 do not log."""
