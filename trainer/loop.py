"""`run_pack`: several adapter jobs trained at once on one frozen base, in one loop that reads top to
bottom. `run_job` is a pack of one.

Each micro-step, every job in the pack contributes its next micro-batch; the batches are concatenated
along the batch dimension and go through the model once (each 4-bit base weight is dequantized once
for all of them), and one backward pass follows. Each job then steps its own optimizer when its
gradient accumulation completes, logs, evaluates and checkpoints at its own cadence, and leaves the
pack when it reaches its max_steps or fails. A caller may add jobs between steps (`joins`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Sequence

import torch

from data_pipeline import DataError
from schema.job import JobConfig, pack_key
from trainer.adapters import SharedBase
from trainer.errors import JobError, JobInterrupted
from trainer.evaluation.generation import adapters_off
from trainer.job import AdapterJob, JobResult, Shared, evaluate_loss, finished_result
from trainer.losses import MODEL_INPUTS, loss_terms
from trainer.models import compute_dtype, default_device, load_base_model, load_tokenizer
from trainer.specs import ModelSpecError, base_identity
from trainer.tracking import configure_console, plain_console

__all__ = ["JobResult", "evaluate_loss", "run_job", "run_pack"]

Report = Callable[[dict], None]
Joins = Callable[[list[str]], Sequence[JobConfig]]


def run_job(config: JobConfig, report: Report | None = None) -> JobResult:
    """Train `config`'s adapter. Idempotent: resumes from the newest complete checkpoint in output_dir,
    and returns the recorded result of a job that already finished. Raises JobError when it cannot run."""
    outcome = run_pack([config], report)[config.name]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def run_pack(configs: Sequence[JobConfig], report: Report | None = None, joins: Joins | None = None) -> dict[str, JobResult | JobError]:
    """Train every job of `configs` (and those `joins` adds) on one shared base; one outcome per job.

    All jobs must share `schema.job.pack_key`. `report` receives each logged step's metrics (with
    "job") and an event when a job joins and when it ends ({"job", "event": "started" | "finished" | "failed", ...}). `joins(running)`
    is asked between steps for more jobs; the pack ends when it has no job left and `joins` adds none.
    A job whose data, loss or gradients fail leaves the pack with a JobError; the others carry on."""
    outcomes: dict[str, JobResult | JobError] = {}
    pending = list(configs)
    pending.extend(joins([]) if joins and not pending else [])
    if not pending:
        return outcomes
    key = pack_key(pending[0])
    display = len(pending) == 1 and joins is None and not plain_console()
    with _status("loading the base model and the data" if display else None):
        shared = _load_shared(pending[0])
    jobs: list[AdapterJob] = []
    emit = report or (lambda event: None)

    def admit(config: JobConfig) -> None:
        try:
            if pack_key(config) != key:
                raise JobError(f"job {config.name!r} does not share this pack's model, quantization, seq_len, dtype, packing or checkpointing")
            done = finished_result(config)
            if done is not None:
                outcomes[config.name] = done
            else:
                jobs.append(AdapterJob(config, shared, report, display))
                emit({"job": config.name, "event": "started", "step": jobs[-1].step})
                return
        except JobError as err:
            outcomes[config.name] = err
            emit({"job": config.name, "event": "failed", "error": str(err)})
            return
        emit({"job": config.name, "event": "finished", "result": outcomes[config.name].to_dict()})

    def leave(job: AdapterJob, outcome: JobResult | JobError) -> None:
        jobs.remove(job)
        shared.base.remove(job.adapter)
        outcomes[job.name] = outcome
        if isinstance(outcome, JobError):
            job.close()
            emit({"job": job.name, "event": "failed", "error": str(outcome)})
        else:
            emit({"job": job.name, "event": "finished", "result": outcome.to_dict()})

    stop_request = _StopRequest()
    try:
        for config in pending:
            admit(config)
        for job in [j for j in jobs if j.done]:  # resumed from their final checkpoint
            leave(job, job.finish())
        model = shared.base.model
        while True:
            if joins is not None:
                for config in joins([job.name for job in jobs]):
                    admit(config)
                for job in [j for j in jobs if j.done]:
                    leave(job, job.finish())
            if not jobs:
                break
            model = shared.base.model
            model.train()

            # Every job's next micro-batch (a job at the start of a step draws the whole step first).
            for job in list(jobs):
                try:
                    if job.at_step_start:
                        job.begin_step()
                except (DataError, StopIteration) as err:
                    leave(job, JobError(f"step {job.step + 1}: {err}"))
            if not jobs:
                continue
            started = time.perf_counter()
            batches = [job.current_batch() for job in jobs]
            inputs, rows = _concatenate(batches, shared.tokenizer)
            shared.base.router.route([(job.adapter, start, stop) for job, (start, stop) in zip(jobs, rows)])
            for job in jobs:
                job.tick_clock()

            # One forward for the pack; the LwF teacher (adapters off) only over the rows that need it.
            logits = model(**inputs).logits
            teacher_rows = [(job, span) for job, span in zip(jobs, rows) if job.needs_teacher()]
            teachers = _teacher_logits(model, inputs, [span for _, span in teacher_rows]) if teacher_rows else {}
            total = None
            for job, batch, (start, stop) in zip(jobs, batches, rows):
                width = batch["input_ids"].shape[1]
                terms = loss_terms(logits[start:stop, :width], batch, teacher_logits=_narrow(teachers.get((start, stop)), width), **job.loss_inputs())
                if job.account(terms):
                    total = terms.total if total is None else total + terms.total
            if total is not None:
                jobs[0].engine.backward(total)  # one backward for the pack (a DeepSpeed job is always alone in its pack)
            wall_s = time.perf_counter() - started
            for job in jobs:
                job.step_time_s += wall_s

            # Each job whose step is complete: update, log, evaluate, checkpoint; leave when done.
            for job in list(jobs):
                if not job.end_micro():
                    continue
                try:
                    job.update()
                    job.after_update()
                except (JobError, DataError) as err:
                    leave(job, err if isinstance(err, JobError) else JobError(str(err)))
                    continue
                if job.done:
                    leave(job, job.finish())
            # A job in the middle of a step finishes it first: its stream has drawn the whole step, so only the
            # step's end can be checkpointed (at most grad_accum - 1 more micro-batches).
            if stop_request.requested and jobs and all(job.at_step_start for job in jobs):
                _checkpoint_and_stop(jobs, stop_request.signal)
    finally:
        stop_request.restore()
        for job in jobs:
            job.close()
    return outcomes


def _status(text: str | None):
    """A spinner with `text` on a terminal while the job cannot show steps yet; nothing otherwise."""
    if text is None:
        return contextlib.nullcontext()
    from rich.console import Console

    return Console(stderr=True).status(text)


def _load_shared(config: JobConfig) -> Shared:
    configure_console()
    from trainer.engines import World

    world = World.from_env()
    device = default_device()
    dtype = compute_dtype(config.train.dtype, device)
    try:
        tokenizer = load_tokenizer(config.model)
        base = load_base_model(config.model, config.quant, dtype, device)
    except ModelSpecError as err:
        raise JobError(str(err)) from None
    return Shared(SharedBase(base, config.train.grad_checkpointing), tokenizer, world, device, dtype, base_identity(config.model))


def _concatenate(batches: list[dict[str, torch.Tensor]], tokenizer) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
    """The model inputs of all batches stacked along the batch dimension (padded batches right-padded to
    the widest), and each batch's row span."""
    width = max(b["input_ids"].shape[1] for b in batches)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    fill = {"input_ids": pad_id, "position_ids": 0, "attention_mask": 0}
    inputs = {}
    for key in MODEL_INPUTS:
        if key in batches[0]:
            parts = [b[key] if b[key].shape[1] == width else torch.nn.functional.pad(b[key], (0, width - b[key].shape[1]), value=fill[key]) for b in batches]
            inputs[key] = parts[0] if len(parts) == 1 else torch.cat(parts)
    rows, start = [], 0
    for batch in batches:
        rows.append((start, start + batch["input_ids"].shape[0]))
        start += batch["input_ids"].shape[0]
    return inputs, rows


@torch.no_grad()
def _teacher_logits(model, inputs: dict[str, torch.Tensor], spans: list[tuple[int, int]]) -> dict[tuple[int, int], torch.Tensor]:
    """The base's logits (every adapter off, no second copy of the model) for the rows in `spans`."""
    selected = {k: torch.cat([v[a:b] for a, b in spans]) for k, v in inputs.items()}
    with adapters_off(model):
        logits = model(**selected).logits
    out, at = {}, 0
    for a, b in spans:
        out[(a, b)] = logits[at : at + b - a]
        at += b - a
    return out


def _narrow(logits: torch.Tensor | None, width: int) -> torch.Tensor | None:
    return None if logits is None else logits[:, :width]


def _checkpoint_and_stop(jobs: list[AdapterJob], signum: int) -> None:
    """A stop was asked for and every job is between steps: each writes a checkpoint unless its newest one
    is at this step, then training ends."""
    for job in jobs:
        if job.step and job.last_checkpoint != job.step:
            job.write_checkpoint()
    raise JobInterrupted(f"stopped by signal {signum}; run the same command again to resume from the newest checkpoint")


class _StopRequest:
    """SIGTERM (main thread only) asks the loop to stop at the next step boundary instead of dying mid-write."""

    def __init__(self) -> None:
        self.requested = False
        self.signal = 0
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested, self.signal = True, signum

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
