"""RUN_DIR/fleet.json: each job's state, attempts, errors, times, adapter path and final metrics.

The file is rewritten atomically (schema.atomic), so `lorafleet status` and anything else reading it
never sees half a record. Times are Unix seconds.
"""

from __future__ import annotations

import json
import time
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from schema.atomic import json_text, write_text_atomic

FLEET_JSON = "fleet.json"

# Job states, in the order a job passes through them.
QUEUED, PLACING, STARTING, RUNNING = "queued", "placing", "starting", "running"
FINISHED, FAILED, INTERRUPTED, SKIPPED = "finished", "failed", "interrupted", "skipped"
SETTLED = (FINISHED, FAILED, SKIPPED)  # states a job of a running fleet does not leave


@dataclass
class Attempt:
    """One try at a job: from asking for its placement group to its workers' end."""

    number: int
    submitted_at: float
    placed_at: float | None = None
    running_at: float | None = None
    first_step_at: float | None = None
    ended_at: float | None = None
    workers: list[dict[str, Any]] = field(default_factory=list)
    worker: str | None = None  # the worker set (fleet.json "workers") this attempt ran on
    error: str | None = None


@dataclass
class JobRecord:
    name: str
    output_dir: str
    workers: int
    max_steps: int
    state: str = QUEUED
    attempts: list[Attempt] = field(default_factory=list)
    step: int = 0
    loss: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    node: str | None = None
    worker: str | None = None  # the worker set (and so the adapter pack) of the latest attempt
    phase: str | None = None  # what a running job does between steps ("evaluating"); None while it trains
    started_at: float | None = None
    ended_at: float | None = None
    adapter_dir: str | None = None
    error: str | None = None
    result: dict[str, Any] | None = None
    passed_by: list[str] = field(default_factory=list)  # later jobs that started while this one waited at the head (backfill)

    @property
    def attempt(self) -> int:
        return self.attempts[-1].number if self.attempts else 0

    @property
    def run_time_s(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.ended_at or time.time()) - self.started_at

    def to_dict(self) -> dict[str, Any]:
        # Shallow (dataclasses.asdict deep-copies every result dict): this runs for every job every second.
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["attempts"] = [dict(vars(attempt)) for attempt in self.attempts]
        data["attempt"] = self.attempt
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobRecord:
        data = {k: v for k, v in check_fields(cls, data).items() if k != "attempt"}
        _check_figures(data.get("result") or {}, ("eval_loss", "initial_eval_loss"), f"{cls.__name__}.result")
        data["attempts"] = [Attempt(**check_fields(Attempt, a)) for a in data.get("attempts", [])]
        return cls(**data)


@dataclass
class FleetRecord:
    """The whole fleet; `first_started_at` survives re-runs (TensorBoard steps count from it)."""

    name: str
    run_dir: str
    state: str = RUNNING
    started_at: float = field(default_factory=time.time)
    first_started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    slots: int = 0
    address: str | None = None
    jobs: dict[str, JobRecord] = field(default_factory=dict)
    # Each worker set by id ("w3"): its pid(s), node, slots, the jobs it trained (its adapter pack over
    # time), and when it started and ended.
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)
    summary: dict[str, Any] | None = None
    # fleet.json's line of each settled job, encoded once, with the fields that would show a change.
    _settled_lines: dict[str, tuple[tuple, str]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.init and f.name != "jobs"}
        data["jobs"] = {name: job.to_dict() for name, job in self.jobs.items()}
        data["updated_at"] = time.time()
        return data

    def json_text(self) -> str:
        """fleet.json: strict JSON (an unknown loss is null, not NaN), one line per job. The driver rewrites
        it every second; a settled job's line is encoded once, so the cost follows the jobs still moving."""
        head = {f.name: getattr(self, f.name) for f in fields(self) if f.init and f.name != "jobs"}
        lines = []
        for name, job in self.jobs.items():
            key = (job.state, len(job.attempts), job.ended_at, job.step, id(job.result))
            cached = self._settled_lines.get(name)
            if cached is not None and cached[0] == key:
                line = cached[1]
            else:
                line = f"{json.dumps(name)}: {json_text(job.to_dict(), indent=None).rstrip()}"
                if job.state in SETTLED:
                    self._settled_lines[name] = (key, line)
            lines.append(line)
        head_text = json_text({**head, "updated_at": time.time()}, indent=None).rstrip()
        return head_text[:-1] + ', "jobs": {\n' + ",\n".join(lines) + "\n}}\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FleetRecord:
        data = {k: v for k, v in check_fields(cls, data).items() if k != "updated_at"}
        summary = data.get("summary") or {}
        _check_figures(summary, summary, f"{cls.__name__}.summary")
        data["jobs"] = {name: JobRecord.from_dict(job) for name, job in data.get("jobs", {}).items()}
        return cls(**data)

    def write(self) -> Path:
        path = Path(self.run_dir) / FLEET_JSON
        write_text_atomic(path, self.json_text())
        return path

    def count(self, *states: str) -> int:
        return sum(job.state in states for job in self.jobs.values())


def check_fields(cls: type, data: Any) -> dict[str, Any]:
    """`data` when it is a JSON object whose fields of `cls` have their declared types; raises TypeError
    naming the first that does not, so a damaged or foreign fleet.json fails when read, not halfway through
    printing a table. (Unknown and missing fields are refused by the constructor.)"""
    if not isinstance(data, dict):
        raise TypeError(f"a {cls.__name__} must be a JSON object, not {json.dumps(data)[:60]}")
    declared = typing.get_type_hints(cls)
    for name, value in data.items():
        if name in declared and not _has_type(value, declared[name]):
            raise TypeError(f"{cls.__name__}.{name} = {json.dumps(value)[:60]} is not {_type_name(declared[name])}")
    return data


def _has_type(value: Any, kind: Any) -> bool:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in args)
    if kind is type(None):
        return value is None
    if kind in (int, float):  # JSON has one number type: 3 and 3.0 both stand for a step count or a time
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if is_dataclass(kind):
        return isinstance(value, dict)  # its own fields are checked when it is built
    if origin is list:
        return isinstance(value, list) and all(_has_type(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(_has_type(item, args[1]) for item in value.values())
    return isinstance(value, kind)


def _type_name(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in args)
    if origin is list:
        return "a list" + ("" if args[0] is Any else f", each item {_type_name(args[0])}")
    if origin is dict:
        return "an object" + ("" if args[1] is Any else f", each value {_type_name(args[1])}")
    if is_dataclass(kind):
        return "an object"
    return {str: "text", int: "a number", float: "a number", bool: "true or false", type(None): "null"}.get(kind, str(kind))


def _check_figures(figures: dict[str, Any], keys: Any, where: str) -> None:
    """The figures the job table and the summary print as numbers are numbers (or null, or a flag)."""
    for key in keys:
        value = figures.get(key)
        if value is not None and not isinstance(value, (int, float)):
            raise TypeError(f"{where}.{key} = {json.dumps(value)[:60]} is not a number")


class FleetRecordError(ValueError):
    """A fleet.json that cannot be read: the message names the file, what is wrong and the way out."""


def read_fleet_record(run_dir: str | Path) -> FleetRecord:
    path = Path(run_dir) / FLEET_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no fleet.json; is {run_dir} the output_dir of a fleet that has started?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise FleetRecordError(f"{path}: not valid JSON ({err}); it was not written by lorafleet, or was damaged (fix: run the fleet again to rewrite it)") from None
    try:
        return FleetRecord.from_dict(data)
    except (TypeError, KeyError, AttributeError) as err:
        raise FleetRecordError(
            f"{path}: not a lorafleet fleet record ({type(err).__name__}: {err}) (fix: point at a fleet's output_dir, or run the fleet again to rewrite it)"
        ) from None


def summarize(record: FleetRecord, earlier: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fleet-level figures over the jobs trained in this run (skipped jobs add nothing).

    - makespan_s: first submit to last job end;
    - job_time_s_sum: the sum of each job's own wall time (all its attempts, queueing excluded);
    - aggregate_tokens_per_s: tokens trained in this run / makespan;
    - tokens_per_s_per_slot: that, divided by the slots the fleet could use at once;
    - worker_starts: worker processes started in this run, against the jobs they trained (packs and
      rolling joins make it smaller).
    A resumed job counts only the steps it trained in this run (its tokens scaled by that share). A run
    that trained nothing (every job had finished) keeps `earlier`'s figures: the run that trained them.
    """
    # Attempts of earlier runs into the same directory stay in the record but not in this run's figures.
    this_run = {name: [a for a in job.attempts if a.submitted_at >= record.started_at] for name, job in record.jobs.items()}
    trained = [job for job in record.jobs.values() if job.state != SKIPPED and this_run[job.name]]
    if not trained and earlier and earlier.get("makespan_s"):
        return {**earlier, "skipped": record.count(SKIPPED), "from_earlier_run": True}
    starts = [this_run[job.name][0].submitted_at for job in trained]
    ends = [job.ended_at for job in trained if job.ended_at is not None]
    makespan = (max(ends) - min(starts)) if starts and ends else 0.0
    tokens = 0.0
    for job in trained:
        if job.result and job.result.get("steps"):
            resumed = job.result.get("resumed_from_step") or 0
            tokens += job.result["tokens"] * (job.result["steps"] - resumed) / job.result["steps"]
    job_time = sum((a.ended_at or a.submitted_at) - (a.running_at or a.submitted_at) for job in trained for a in this_run[job.name])
    aggregate = tokens / makespan if makespan > 0 else 0.0
    return {
        "jobs": len(record.jobs),
        "finished": record.count(FINISHED),
        "skipped": record.count(SKIPPED),
        "failed": record.count(FAILED),
        "interrupted": record.count(INTERRUPTED),
        "makespan_s": makespan,
        "job_time_s_sum": job_time,
        "tokens": tokens,
        "aggregate_tokens_per_s": aggregate,
        "slots": record.slots,
        "tokens_per_s_per_slot": aggregate / record.slots if record.slots else 0.0,
        "worker_starts": sum(1 for worker in record.workers.values() if worker.get("started_at", 0) >= record.started_at),
        "jobs_trained": len(trained),
    }
