"""The fleet scheduler: a FIFO queue of jobs, one placement group each, retries from checkpoints.

Order and capacity: only the job at the head of the queue asks Ray for a placement group, so jobs
start strictly in fleet order and a job starts the moment Ray can place it (a slot frees). A head
job that needs 2 GPUs waits for 2 on one node even while single slots are free elsewhere: that keeps
the order predictable and a large job from starving.

Failure: any error from a worker (an exception in run_job, a killed process, a lost node) ends the
attempt: the job's other workers are killed, its placement group freed, and the job goes back to
the head of the queue while it has retries left. The next attempt resumes from the job's newest
complete checkpoint because run_job is idempotent.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from cluster.capacity import JobShape
from cluster.records import (
    FAILED,
    FINISHED,
    INTERRUPTED,
    PLACING,
    QUEUED,
    RUNNING,
    SKIPPED,
    STARTING,
    Attempt,
    FleetRecord,
    JobRecord,
    read_fleet_record,
    summarize,
)
from cluster.tensorboard import FleetScalars
from cluster.view import FleetView
from cluster.worker import ProgressSink, distributed_env, release, reserve, start_workers, stop_workers


class FleetInterrupted(KeyboardInterrupt):
    """The driver got SIGTERM (or Ctrl-C): workers were stopped; a re-run resumes the jobs."""


@dataclass
class FleetJob:
    """One job as the scheduler sees it: its config (a launch.config.JobConfig) and its shape."""

    config: Any
    shape: JobShape
    max_failures: int

    @property
    def name(self) -> str:
        return self.config.name


@dataclass
class _LiveAttempt:
    """The live Ray handles of one attempt of a job."""

    group: Any
    workers: list[Any] = field(default_factory=list)
    infos: dict[int, dict[str, Any]] = field(default_factory=dict)
    pending_runs: int = 0
    result: dict[str, Any] | None = None


class FleetRunner:
    """Runs `jobs` on the connected Ray cluster; writes RUN_DIR/fleet.json and RUN_DIR/tb/fleet."""

    def __init__(
        self,
        name: str,
        jobs: list[FleetJob],
        run_dir: str | Path,
        slots: int,
        view: FleetView,
        max_concurrent: int | None = None,
        refresh_s: float = 0.5,
        record_every_s: float = 1.0,
    ) -> None:
        self.jobs = {job.name: job for job in jobs}
        self.run_dir = Path(run_dir)
        self.view = view
        self.max_concurrent = max_concurrent
        self.refresh_s = refresh_s
        self.record_every_s = record_every_s
        self.record = self._initial_record(name, jobs, slots)
        self.queue: deque[str] = deque(job.name for job in jobs if self.record.jobs[job.name].state == QUEUED)
        self.live: dict[str, _LiveAttempt] = {}
        self.failures: dict[str, int] = {job.name: 0 for job in jobs}
        self.waiting: dict[Any, tuple[str, int, str, int]] = {}  # ObjectRef -> (job, attempt, kind, rank)
        self._last_record_write = 0.0
        self.sink: Any = None  # the ProgressSink actor, for the length of run()
        self.workdir = str(Path.cwd())  # where the config's relative paths start

    def _initial_record(self, name: str, jobs: list[FleetJob], slots: int) -> FleetRecord:
        """A fresh record; jobs whose final.json exists are skipped; attempt history of a previous run is kept."""
        previous: dict[str, JobRecord] = {}
        first_started_at = time.time()
        try:
            earlier = read_fleet_record(self.run_dir)
            previous, first_started_at = earlier.jobs, earlier.first_started_at
        except FileNotFoundError:
            pass
        record = FleetRecord(name=name, run_dir=str(self.run_dir), slots=slots, address=ray.get_runtime_context().gcs_address, first_started_at=first_started_at)
        for job in jobs:
            out = Path(job.config.output_dir).resolve()  # absolute: `lorafleet status|tb` may run from elsewhere
            entry = JobRecord(name=job.name, output_dir=str(out), workers=job.shape.workers, max_steps=job.config.train.max_steps)
            if job.name in previous:
                entry.attempts = previous[job.name].attempts
            final = out / "final.json"
            if final.is_file():
                entry.state = SKIPPED
                entry.result = json.loads(final.read_text())
                entry.adapter_dir = str(out / "adapter")
                entry.step = entry.result.get("steps", 0)
                entry.loss = entry.result.get("train_loss")
            record.jobs[job.name] = entry
        return record

    # ------------------------------------------------------------------ the loop
    def run(self) -> FleetRecord:
        """Run every job to the end (finished or failed). Raises FleetInterrupted/KeyboardInterrupt after
        stopping the workers when the driver is told to stop."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        scalars = FleetScalars(self.run_dir, self.record.first_started_at)
        restore = _raise_on_sigterm()
        self.sink = ProgressSink.remote()
        try:
            self._write_record(force=True)
            self.view.update(self.record)
            while self.queue or self.live:
                self._place_head()
                ready = self._ready_refs()
                # Reports first: a short job's last reports and its result can arrive in the same tick.
                self._apply_reports(ray.get(self.sink.drain.remote()))
                self._handle(ready)
                self.view.update(self.record)
                scalars.log(self.record)
                self._write_record()
            self.record.state = FAILED if self.record.count(FAILED) else FINISHED
        except KeyboardInterrupt:
            self._stop_all()
            self.record.state = INTERRUPTED
            raise
        finally:
            restore()
            self.record.ended_at = time.time()
            self.record.summary = summarize(self.record)
            self._write_record(force=True)
            scalars.log(self.record, force=True)
            scalars.close()
            ray.kill(self.sink)
            self.view.close(self.record)
        return self.record

    def _place_head(self) -> None:
        """Ask for the head job's placement group, unless one is already being placed or the cap is reached."""
        if not self.queue or any(self.record.jobs[name].state == PLACING for name in self.live):
            return
        if self.max_concurrent is not None and len(self.live) >= self.max_concurrent:
            return
        name = self.queue.popleft()
        job, entry = self.jobs[name], self.record.jobs[name]
        number = entry.attempt + 1
        entry.attempts.append(Attempt(number=number, submitted_at=time.time()))
        entry.state, entry.ended_at = PLACING, None
        group = reserve(job.shape, name=f"lorafleet-{self.record.name}-{name}-{number}")
        self.live[name] = _LiveAttempt(group=group)
        self.waiting[group.ready()] = (name, number, "placed", 0)
        self._write_record(force=True)

    def _ready_refs(self) -> list[Any]:
        if not self.waiting:
            time.sleep(self.refresh_s)
            return []
        refs = list(self.waiting)
        ready, _ = ray.wait(refs, num_returns=1, timeout=self.refresh_s)
        if ready:  # take everything else that is ready too, without waiting
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        return ready

    def _handle(self, ready: list[Any]) -> None:
        for ref in ready:
            name, number, kind, rank = self.waiting.pop(ref)
            entry = self.record.jobs[name]
            if name not in self.live or entry.attempt != number:
                continue  # an answer from an attempt that already ended
            try:
                value = ray.get(ref)
            except RayError as err:
                self._attempt_failed(name, _describe(err, self.live[name].infos.get(rank)), retry=not _bad_input(err))
                continue
            if kind == "placed":
                self._start(name)
            elif kind == "info":
                self._started(name, value)
            else:
                self._worker_done(name, rank, value)

    def _start(self, name: str) -> None:
        job, live, entry = self.jobs[name], self.live[name], self.record.jobs[name]
        entry.attempts[-1].placed_at = time.time()
        entry.state = STARTING
        live.workers = start_workers(job.shape, live.group, name)
        for rank, worker in enumerate(live.workers):
            self.waiting[worker.info.remote()] = (name, entry.attempt, "info", rank)

    def _started(self, name: str, info: dict[str, Any]) -> None:
        live, entry, job = self.live[name], self.record.jobs[name], self.jobs[name]
        live.infos[info["rank"]] = info
        if len(live.infos) < job.shape.workers:
            return
        attempt = entry.attempts[-1]
        attempt.running_at = time.time()
        if entry.started_at is None:  # the job's time counts from its first worker start, not its queueing
            entry.started_at = attempt.running_at
        attempt.workers = [live.infos[rank] for rank in range(job.shape.workers)]
        entry.state, entry.node = RUNNING, live.infos[0]["node_ip"]
        live.pending_runs = job.shape.workers
        for rank, worker in enumerate(live.workers):
            env = distributed_env(rank, attempt.workers)
            call = worker.run.remote(job.config, env, self.sink, entry.attempt, self.workdir)
            self.waiting[call] = (name, entry.attempt, "run", rank)
        self._write_record(force=True)

    def _worker_done(self, name: str, rank: int, result: dict[str, Any]) -> None:
        live = self.live[name]
        live.pending_runs -= 1
        if rank == 0:
            live.result = result
        if live.pending_runs:
            return
        entry = self.record.jobs[name]
        self._end_attempt(name)
        entry.state, entry.result, entry.error = FINISHED, live.result, None  # earlier attempts keep their errors
        entry.adapter_dir = str(Path(entry.output_dir) / "adapter")
        entry.step, entry.loss, entry.eta_s = live.result["steps"], live.result["train_loss"], 0.0
        self._write_record(force=True)

    def _attempt_failed(self, name: str, error: str, retry: bool = True) -> None:
        """A crash is retried while the job has retries left; bad input (JobError) would fail the same way again."""
        entry, job = self.record.jobs[name], self.jobs[name]
        entry.attempts[-1].error = error
        self._end_attempt(name)
        self.failures[name] += 1
        entry.error = error
        if retry and self.failures[name] <= job.max_failures:
            entry.state = QUEUED
            entry.ended_at = None
            self.queue.appendleft(name)  # a retry keeps its place at the front of the queue
        else:
            entry.state = FAILED
        self._write_record(force=True)

    def _end_attempt(self, name: str) -> None:
        live = self.live.pop(name)
        stop_workers(live.workers)
        release(live.group)
        entry = self.record.jobs[name]
        entry.attempts[-1].ended_at = entry.ended_at = time.time()
        self.waiting = {ref: tag for ref, tag in self.waiting.items() if tag[0] != name}

    def _apply_reports(self, reports: list[tuple[str, int, dict[str, Any]]]) -> None:
        for name, number, metrics in reports:
            entry = self.record.jobs[name]
            if entry.attempt != number or entry.state != RUNNING:
                continue
            if "train/loss" in metrics:
                entry.step = int(metrics.get("step", entry.step))
                entry.loss = _finite(metrics["train/loss"])
                entry.tokens_per_s = _finite(metrics.get("perf/tokens_per_s"))
                entry.eta_s = _finite(metrics.get("eta_s"))
                if entry.attempts[-1].first_step_at is None:
                    entry.attempts[-1].first_step_at = time.time()

    def _stop_all(self) -> None:
        for name in list(self.live):
            entry = self.record.jobs[name]
            entry.attempts[-1].error = "interrupted: the driver was stopped"
            self._end_attempt(name)
            entry.state = INTERRUPTED

    def _write_record(self, force: bool = False) -> None:
        now = time.time()
        if force or now - self._last_record_write >= self.record_every_s:
            self.record.write()
            self._last_record_write = now


def _finite(value: Any) -> float | None:
    """JSON has no NaN: a metric that is not a finite number is shown as unknown."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _bad_input(err: RayError) -> bool:
    """The trainer refused the job (JobError: its data, config or state cannot work), as opposed to a crash."""
    from trainer.errors import JobError

    return isinstance(err, RayTaskError) and isinstance(err.cause, JobError)


def _describe(err: RayError, worker: dict[str, Any] | None) -> str:
    """A one-paragraph error: the trainer's own exception, or how the worker process died."""
    where = f" (pid {worker['pid']} on {worker['node_ip']})" if worker else ""
    if isinstance(err, RayTaskError):
        cause = err.cause if err.cause is not None else err
        return f"{type(cause).__name__}: {cause}{where}"[:2000]
    if isinstance(err, RayActorError):
        return f"worker process died{where}: {str(err).strip().splitlines()[0][:500]}"
    return f"{type(err).__name__}: {str(err).strip()[:1000]}{where}"


def _raise_on_sigterm():
    """Make SIGTERM behave like Ctrl-C in the driver (main thread only); returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise FleetInterrupted(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)

