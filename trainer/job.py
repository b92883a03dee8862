"""One adapter job inside a pack: everything that belongs to it alone.

Its data stream and position, optimizer (paged state included), schedule, dropout stream, gradient
accumulation, evaluation, checkpoints, metrics.jsonl, TensorBoard run, config.yaml, final.json and
adapter/, all under its own output_dir. The directory looks the same whether the job trained alone or
in a pack, and a job interrupted in one resumes in the other. The loop (trainer.loop) owns what the
jobs share: the base model and the forward and backward passes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from data_pipeline import DataError, build_eval_batches, build_train_stream
from schema.atomic import atomic_directory, json_text, write_json_atomic, write_text_atomic
from schema.job import JobConfig
from schema.jobdir import JobDir
from schema.loading import load_tasks
from trainer.adapters import SharedBase, adapter_metadata, parameter_groups, routed, save_adapter
from trainer.card import model_card
from trainer.checkpoint import CheckpointError, find_resume, load_checkpoint, prune, save_checkpoint
from trainer.engines import DeepSpeedEngine, LocalEngine, World
from trainer.errors import JobError
from trainer.evaluation.tasks import BaseReference, evaluate_tasks
from trainer.losses import MODEL_INPUTS, LossTerms, needs_teacher, token_cross_entropy_sum
from trainer.optim import build_optimizer, build_scheduler
from trainer.packing import DropoutClock
from trainer.tracking import Tracker, peak_memory_bytes

COMMAND_ENV = "LORAFLEET_COMMAND"  # the command line that started the training (the model card quotes it)
BEST = "best"  # checkpoints/best/: the adapter with the lowest eval/loss so far (checkpoint.select best_eval_loss)


@dataclass
class JobResult:
    output_dir: Path
    adapter_dir: Path
    steps: int
    tokens: int
    wall_time_s: float
    train_loss: float | None
    eval_loss: float | None
    initial_eval_loss: float | None
    peak_memory_bytes: int
    resumed_from_step: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    skipped_steps: int = 0
    corrupt_checkpoints: list[str] = field(default_factory=list)
    selected_step: int | None = None  # checkpoint.select best_eval_loss: the step whose adapter is adapter/

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobResult:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**{**known, "output_dir": Path(data["output_dir"]), "adapter_dir": Path(data["adapter_dir"])})


@dataclass
class Shared:
    """What every job of a pack uses and none owns."""

    base: SharedBase
    tokenizer: Any
    world: World
    device: torch.device
    dtype: torch.dtype
    base_identity: dict  # trainer.specs.base_identity: what every adapter records about its base
    base_references: dict[Path, BaseReference] = field(default_factory=dict)  # per tasks file: the base's answers, computed once
    untrained_metrics: dict[Path, dict[str, float]] = field(default_factory=dict)  # per tasks file: an untrained adapter's task metrics


def finished_result(config: JobConfig) -> JobResult | None:
    """The recorded result of a job that already finished into config.output_dir, or None."""
    job_dir = JobDir(config.output_dir)
    final = job_dir.read_final()
    if final is None:
        return None
    if diffs := job_dir.differences(config.model_dump(mode="json")):
        raise JobError(f"{job_dir.root} holds a finished job with a different config:\n  " + "\n  ".join(diffs) + "\nUse a new output_dir.")
    return JobResult.from_dict(final)


class AdapterJob:
    """A job's state and its per-step operations; `trainer.loop.run_pack` drives several at once."""

    def __init__(self, config: JobConfig, shared: Shared, report: Callable[[dict], None] | None, display: bool):
        self.config = config
        self.shared = shared
        self.dir = JobDir(config.output_dir)
        train, world = config.train, shared.world
        config_dump = config.model_dump(mode="json")
        resume = find_resume(self.dir)
        if resume.path is not None and (diffs := self.dir.differences(config_dump)):
            raise JobError(
                f"cannot resume {resume.path}: these fields differ from the checkpointed config:\n  "
                + "\n  ".join(diffs)
                + f"\nRestore them, or use a new output_dir (or move {self.dir.checkpoints} aside) to start over."
            )
        self.corrupt = resume.corrupt
        self.packed = config.data.packing == "packed"
        data = config.data
        rehearsal = config.forgetting.rehearsal
        if rehearsal is not None:  # the frozen base's own answers, generated once per base model and cached
            from trainer.prior import ensure_prior_dataset, with_prior_rehearsal

            model = shared.base.model if shared.base.model is not None else shared.base.base
            prior = ensure_prior_dataset(config.model, rehearsal, quant=config.quant, model=model, tokenizer=shared.tokenizer)
            data = with_prior_rehearsal(data, prior, rehearsal)
        try:
            self.stream = build_train_stream(
                data, shared.tokenizer, seq_len=train.seq_len, micro_batch=train.micro_batch, seed=train.seed, rank=world.rank, world_size=world.size
            )
            eval_batches = build_eval_batches(data, shared.tokenizer, seq_len=train.seq_len, micro_batch=train.micro_batch) if data.eval else []
        except DataError as err:
            raise JobError(str(err)) from None
        self.eval_batches = [self.model_batch(b) for b in eval_batches]

        self.clock = DropoutClock(train.seed)
        self.adapter = shared.base.add(config.lora, train.max_steps, train.seed, self.clock)
        self.parameters = shared.base.parameters(self.adapter)
        optim = config.optim
        self.optimizer = build_optimizer(parameter_groups(self.parameters, optim, config.lora), optim)
        self.scheduler = build_scheduler(self.optimizer, optim, train.max_steps)
        model = shared.base.model
        if world.size > 1:
            self.engine = DeepSpeedEngine(model, self.optimizer, self.scheduler, optim.max_grad_norm, train.micro_batch, train.grad_accum, shared.dtype)
        else:
            after_update = model.base_model.update_and_allocate if config.lora.method == "adalora" else _no_op
            self.engine = LocalEngine([p for _, p in self.parameters], self.optimizer, self.scheduler, optim.max_grad_norm, after_update)
        self.adalora_reg = model.peft_config[self.adapter].orth_reg_weight if config.lora.method == "adalora" else 0.0

        self.step, self.tokens, self.elapsed_s = 0, 0, 0.0
        self.initial_eval_loss: float | None = None
        self.train_loss: float | None = None
        self.eval_metrics: dict[str, float] = {}
        self.skipped_steps = 0
        self.best: dict[str, Any] | None = None  # {step, metrics} of the lowest eval/loss so far (select: best_eval_loss)
        self.resumed_from = resume.step
        self.last_checkpoint = resume.step
        if resume.path is not None:
            self._load(resume.path)
            prune(self.dir, config.checkpoint.keep)  # a crash between a checkpoint's rename and the pruning leaves one too many
        elif world.is_main:
            write_text_atomic(self.dir.config_file, config.to_yaml())

        self.tracker = Tracker(self.dir, config.name, train.max_steps, self.step, report, display) if world.is_main else None
        self.tasks = load_tasks(config.eval.tasks) if config.eval.tasks else None
        # The micro-batches of the step in progress, and what they add up to.
        self.pending: list[dict[str, torch.Tensor]] = []
        self.micro = 0
        self.token_count = 1.0
        self.step_tokens = 0
        self.step_time_s = self.data_wait_s = 0.0
        self.sums = {"loss": 0.0, "task": 0.0, "kl": 0.0, "l2": 0.0}
        self.nonfinite: str | None = None  # what went non-finite in this step
        if resume.path is None:
            self.eval_metrics = self.evaluate(0)
            self.initial_eval_loss = self.eval_metrics.get("eval/loss")

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def done(self) -> bool:
        return self.step >= self.config.train.max_steps

    @property
    def at_step_start(self) -> bool:
        return not self.pending

    # -- one step ----------------------------------------------------------------------------------
    def begin_step(self) -> None:
        """Draw this step's micro-batches and count its labelled tokens (the loss divides by them)."""
        started = time.perf_counter()
        device, world = self.shared.device, self.shared.world
        batches = [_to_device(next(self.stream), device) for _ in range(self.config.train.grad_accum)]
        self.data_wait_s = time.perf_counter() - started
        self.step_time_s = self.data_wait_s
        self.step_tokens = int(world.sum(sum(int(b["attention_mask"].sum()) for b in batches)))
        self.pending = [self.model_batch(b) for b in batches]
        # Normalise by the labelled tokens of the whole step on every worker. DeepSpeed averages
        # gradients over workers, so each worker divides by the global count / world size.
        labelled = world.sum(sum(float((b["labels"][:, 1:] != -100).sum()) for b in self.pending))
        self.token_count = max(labelled, 1.0) / world.size  # a step of prompt-only rows has a zero loss, not 0/0
        self.micro = 0
        self.sums = {"loss": 0.0, "task": 0.0, "kl": 0.0, "l2": 0.0}
        self.nonfinite = None

    def current_batch(self) -> dict[str, torch.Tensor]:
        return self.pending[self.micro]

    def tick_clock(self) -> None:
        self.clock.step, self.clock.micro = self.step, self.micro

    def loss_inputs(self) -> dict[str, Any]:
        return {
            "token_count": self.token_count,
            "forgetting": self.config.forgetting,
            "parameters": self.parameters,
            "micro_batches_per_step": self.config.train.grad_accum,
            "adalora_reg_weight": self.adalora_reg,
        }

    def needs_teacher(self) -> bool:
        return needs_teacher(self.config.forgetting)

    def account(self, terms: LossTerms) -> bool:
        """Add one micro-batch's terms; False (and nothing added) when they are not finite."""
        total = float(terms.total.detach())
        if not math.isfinite(total):
            self.nonfinite = self.nonfinite or f"the loss is {total} at step {self.step + 1}"
            return False
        self.sums["loss"] += total
        self.sums["task"] += float(terms.task.detach())
        self.sums["kl"] += float(terms.kl)
        self.sums["l2"] = float(terms.l2)
        return True

    def end_micro(self) -> bool:
        """True when the step's last micro-batch has gone through."""
        self.micro += 1
        return self.micro == len(self.pending)

    def update(self) -> None:
        """The optimizer step of this job, or what its `train.on_nonfinite` asks for instead."""
        self.step += 1
        self.pending = []
        if self.nonfinite is None and not math.isfinite(norm := self.engine.grad_norm()):
            self.nonfinite = f"the gradient norm is {norm} at step {self.step}"
        if self.nonfinite is not None:
            if self.config.train.on_nonfinite == "stop":
                where = f"the last good checkpoint is {self.dir.checkpoints / f'step-{self.last_checkpoint}'}" if self.last_checkpoint else "no checkpoint was written yet"
                raise JobError(
                    f"{self.nonfinite}; training stopped and nothing non-finite was saved ({where}). "
                    "Lower optim.lr, check the data, or set train.on_nonfinite: skip_step"
                )
            self.engine.skip()
            self.skipped_steps += 1
            grad_norm = math.nan
        else:
            grad_norm = self.engine.step(self.step)
        world = self.shared.world
        self.elapsed_s += self.step_time_s
        self.tokens += self.step_tokens
        metrics = {}
        if self.nonfinite is None:
            # Per-worker sums of token means are 1/world of the global mean; adding them up gives it back.
            self.train_loss = world.sum(self.sums["loss"]) / world.size
            metrics = {"train/loss": self.train_loss, "train/task_loss": world.sum(self.sums["task"]) / world.size, "train/grad_norm": grad_norm}
            if self.config.forgetting.lwf is not None:
                metrics["train/kl"] = world.sum(self.sums["kl"]) / world.size
            if self.config.forgetting.l2 > 0:
                metrics["train/l2"] = self.sums["l2"]
        if self.config.train.on_nonfinite == "skip_step":
            metrics["train/skipped_steps"] = float(self.skipped_steps)
        metrics.update({
            "train/lr": self.engine.lr(),
            "perf/tokens_per_s": self.step_tokens / self.step_time_s,
            "perf/step_time_s": self.step_time_s,
            "perf/data_wait_frac": self.data_wait_s / self.step_time_s,
            "mem/peak_bytes": float(peak_memory_bytes()),
            **self.stream.stats(),
        })
        if self.step % self.config.train.log_every == 0 or self.done:
            self.log(self.step, metrics)

    def after_update(self) -> None:
        """Evaluation and checkpoint, at their cadence and at the end."""
        evaluation, checkpoint = self.config.eval, self.config.checkpoint
        if self.done or (evaluation.every and self.step % evaluation.every == 0):
            self.eval_metrics = self.evaluate(self.step)
            if checkpoint.select == "best_eval_loss" and (self.best is None or self.eval_metrics["eval/loss"] < self.best["metrics"]["eval/loss"]):
                self.keep_best()
        if self.done or (checkpoint.every and self.step % checkpoint.every == 0):
            self.write_checkpoint()

    # -- evaluation --------------------------------------------------------------------------------
    def evaluate(self, at_step: int) -> dict[str, float]:
        if not self.eval_batches and self.tasks is None:
            return {}  # no eval data and no tasks: nothing to evaluate, no "evaluating" phase to show
        if self.tracker is not None:
            self.tracker.phase("evaluating" if at_step else "evaluating before training", at_step)
        base = self.shared.base
        base.router.route_all(self.adapter)
        metrics = {"eval/loss": evaluate_loss(base.model, self.eval_batches, self.config.eval.max_batches)} if self.eval_batches else {}
        if self.tasks is not None:
            tasks_file = self.config.eval.tasks
            reference = self.shared.base_references.get(tasks_file)
            if reference is None:
                from trainer.evaluation.tasks import build_base_reference

                # What the base does on the tasks and the forgetting probe (adapters off): the drift reference.
                reference = self.shared.base_references[tasks_file] = build_base_reference(base.model, self.shared.tokenizer, self.tasks)
            if at_step == 0 and self._adapter_is_zero() and tasks_file in self.shared.untrained_metrics:
                # An untrained LoRA adds exact zeros: every job of the pack with these tasks scores what the first did.
                metrics.update(self.shared.untrained_metrics[tasks_file])
            else:
                task_metrics = evaluate_tasks(base.model, self.shared.tokenizer, self.tasks, base_reference=reference)
                if at_step == 0 and self._adapter_is_zero():
                    self.shared.untrained_metrics[tasks_file] = task_metrics
                metrics.update(task_metrics)
        if metrics:
            self.log(at_step, metrics)
        if self.tracker is not None:
            self.tracker.phase(None, at_step)
        return metrics

    # -- checkpoints and results -------------------------------------------------------------------
    def keep_best(self) -> None:
        """This step's adapter is the best so far: it replaces checkpoints/best/ (adapter/ + best.json)."""
        self.best = {"step": self.step, "metrics": self.eval_metrics}
        if self.shared.world.is_main:
            self._check_finite(f"the best adapter (step {self.step})")

            def fill(staging: Path) -> None:
                self.save_adapter(staging / "adapter")
                (staging / "best.json").write_text(json_text(self.best))

            atomic_directory(self.dir.checkpoints / BEST, fill)

    def _load(self, path: Path) -> None:
        world = self.shared.world
        try:
            trainer_state, engine_state = load_checkpoint(path, self.shared.base.model, self.adapter)
        except CheckpointError as err:
            raise JobError(str(err)) from None
        if len(trainer_state["data"]) != world.size:
            raise JobError(
                f"{path} was written by {len(trainer_state['data'])} worker(s) and this run has {world.size}: "
                f"resume with the same resources.gpus_per_job, or use a new output_dir"
            )
        try:
            self.engine.load_state_dict(engine_state, path / "shards")  # DeepSpeed's shards: refused if they hold code
        except CheckpointError as err:
            raise JobError(str(err)) from None
        self.stream.load_state_dict(trainer_state["data"][world.rank])
        self.step, self.tokens, self.elapsed_s = trainer_state["step"], trainer_state["tokens"], trainer_state["elapsed_s"]
        self.initial_eval_loss = trainer_state["initial_eval_loss"]
        self.train_loss = trainer_state.get("train_loss")
        self.eval_metrics = trainer_state.get("eval_metrics", {})
        self.skipped_steps = trainer_state.get("skipped_steps", 0)
        self.best = trainer_state.get("best")
        on_disk = self.dir.checkpoints / BEST / "best.json"
        if on_disk.is_file() and (self.best is None or json.loads(on_disk.read_text())["step"] != self.best["step"]):
            # Written after this checkpoint, by the run that crashed: the resumed run will choose again.
            shutil.rmtree(self.dir.checkpoints / BEST)

    def write_checkpoint(self) -> None:
        world = self.shared.world
        shards = self.dir.checkpoints / f".shards-step-{self.step}"
        self.engine.save_sharded_state(shards)  # collective: every worker writes its own partition
        data_states = world.gather(self.stream.state_dict())  # each rank streams its own shard
        if world.is_main:
            self._check_finite(f"checkpoint step-{self.step}")
            state = {
                "tokens": self.tokens,
                "elapsed_s": self.elapsed_s,
                "initial_eval_loss": self.initial_eval_loss,
                "train_loss": self.train_loss,
                "eval_metrics": self.eval_metrics,
                "skipped_steps": self.skipped_steps,
                "best": self.best,
                "data": data_states,
            }
            move_shards = lambda tmp: shards.rename(tmp / "shards") if shards.exists() else None  # noqa: E731
            try:
                save_checkpoint(self.dir, self.step, self.save_adapter, self.engine.state_dict(), state, self.config.checkpoint.keep, extra_files=move_shards)
            except CheckpointError as err:
                raise JobError(str(err)) from None
        self.last_checkpoint = self.step
        world.barrier()

    def save_adapter(self, directory: Path) -> None:
        save_adapter(self.shared.base.model, self.adapter, directory, adapter_metadata(self.shared.base_identity, self.config.quant, self.name, self.config.data.template))

    def _adapter_is_zero(self) -> bool:
        """A plain LoRA whose B matrices are all zero (as peft creates them): its model is exactly the base."""
        return routed(self.config.lora) and all(not p.any() for name, p in self.parameters if "lora_B" in name)

    def _check_finite(self, what: str) -> None:
        bad = [name for name, p in self.parameters if not torch.isfinite(p).all()]
        if bad:
            raise JobError(f"{what}: {len(bad)} adapter tensors are not finite (e.g. {bad[0]}); nothing was written")

    def finish(self) -> JobResult:
        """Write adapter/ (the last step's, or the best kept one), the hparams and final.json (last: its
        presence means the job finished)."""
        selected = self.best if self.config.checkpoint.select == "best_eval_loss" and self.best is not None else None
        selected_metrics = selected["metrics"] if selected else self.eval_metrics
        result = JobResult(
            output_dir=self.dir.root,
            adapter_dir=self.dir.adapter,
            steps=self.step,
            tokens=self.tokens,
            wall_time_s=self.elapsed_s,
            train_loss=self.train_loss,
            eval_loss=selected_metrics.get("eval/loss"),
            initial_eval_loss=self.initial_eval_loss,
            peak_memory_bytes=peak_memory_bytes(),
            resumed_from_step=self.resumed_from,
            metrics=selected_metrics,
            skipped_steps=self.skipped_steps,
            corrupt_checkpoints=self.corrupt,
            selected_step=selected["step"] if selected else None,
        )
        if self.tracker is not None:
            metadata = adapter_metadata(self.shared.base_identity, self.config.quant, self.name, self.config.data.template)
            card = model_card(self.config, result.to_dict(), metadata, os.environ.get(COMMAND_ENV))

            def fill(staging: Path) -> None:
                if selected:
                    shutil.copytree(self.dir.checkpoints / BEST / "adapter", staging, dirs_exist_ok=True)
                else:
                    self.save_adapter(staging)
                (staging / "README.md").write_text(card)  # the model card: base, data, steps, losses, metrics

            if not selected:
                self._check_finite("the final adapter")
            atomic_directory(self.dir.adapter, fill)
            final_metrics = {"hparam/train_loss": self.train_loss, "hparam/eval_loss": result.eval_loss}
            self.tracker.log_hparams(self.config.model_dump(mode="json"), {k: v for k, v in final_metrics.items() if v is not None}, self.step)
            self.tracker.close()
            write_json_atomic(self.dir.final_file, result.to_dict())
        self.shared.world.barrier()
        return result

    def close(self) -> None:
        """Leave the pack without finishing (a failure): stop the display and the writers."""
        if self.tracker is not None:
            self.tracker.close()

    # -- helpers -----------------------------------------------------------------------------------
    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.tracker is not None:
            self.tracker.log(step, metrics)

    def model_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Packed rows go to the model without an attention mask: transformers then builds block-diagonal
        masks from the restarting position ids, so packed examples never attend to each other."""
        return {k: v for k, v in batch.items() if not (self.packed and k == "attention_mask")}


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


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _no_op(*_: Any) -> None:
    """Nothing to do after an update unless the adapter is AdaLoRA."""
