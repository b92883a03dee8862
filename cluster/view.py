"""What the user sees: a live rich table on a terminal, plain log lines elsewhere, and the final summary."""

from __future__ import annotations

import os
import time
from typing import Protocol

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from cluster.records import FleetRecord, JobRecord

STATE_STYLES = {"running": "green", "finished": "bold green", "skipped": "dim", "failed": "bold red", "interrupted": "yellow", "queued": "dim"}


class FleetView(Protocol):
    def update(self, record: FleetRecord, changed: set[str]) -> None: ...

    def close(self, record: FleetRecord) -> None: ...


def make_view(console: Console | None = None) -> FleetView:
    """The live table on a terminal; plain log lines when output goes to a file or a pipe, or when
    LORAFLEET_PLAIN_LOGS is set (as for the trainer's own display)."""
    console = console or Console()
    plain = not console.is_terminal or bool(os.environ.get("LORAFLEET_PLAIN_LOGS"))
    return LogLinesView(console) if plain else LiveTableView(console)


ACTIVE = ("placing", "starting", "running")


def jobs_table(record: FleetRecord, names: list[str] | None = None, caption: str | None = None) -> Table:
    """One row per job (or per job of `names`): state, attempt, progress, speed, and the worker and node it
    runs on (jobs sharing a worker train in one adapter pack)."""
    table = Table(title=f"fleet {record.name}", title_justify="left", caption=caption, caption_justify="left")
    for column in ("job", "state", "attempt", "step", "loss", "tokens/s", "eta", "worker", "node", "time", "eval loss"):
        table.add_column(column, justify="left" if column in ("job", "state", "worker", "node") else "right")
    for job in (record.jobs.values() if names is None else (record.jobs[n] for n in names)):
        style = STATE_STYLES.get(job.state, "")
        state = f"{job.state} ({job.phase})" if job.phase and job.state in ("starting", "running") else job.state
        table.add_row(
            job.name,
            f"[{style}]{state}[/]" if style else state,
            str(job.attempt),
            f"{job.step}/{job.max_steps}",
            _number(job.loss, "{:.4f}"),
            _number(job.tokens_per_s, "{:,.0f}"),
            _duration(job.eta_s),
            job.worker or "",
            job.node or "",
            _duration(job.run_time_s),
            _eval_change(job.result),
        )
    return table


def summary_table(record: FleetRecord) -> Table:
    summary = record.summary or {}
    table = Table(title="fleet summary", title_justify="left", show_header=False)
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("jobs (finished / skipped / failed / interrupted)", f"{summary.get('jobs', 0)} ({summary.get('finished', 0)} / {summary.get('skipped', 0)} / {summary.get('failed', 0)} / {summary.get('interrupted', 0)})"),
        ("makespan", _duration(summary.get("makespan_s"))),
        ("sum of job times", _duration(summary.get("job_time_s_sum"))),
        ("tokens trained", _number(summary.get("tokens"), "{:,.0f}")),
        ("aggregate tokens/s", _number(summary.get("aggregate_tokens_per_s"), "{:,.1f}")),
        (f"tokens/s per slot ({summary.get('slots', 0)} slots)", _number(summary.get("tokens_per_s_per_slot"), "{:,.1f}")),
        ("worker processes started / jobs trained", f"{summary.get('worker_starts', 0)} / {summary.get('jobs_trained', 0)}"),
    ]
    if summary.get("from_earlier_run"):
        table.caption = "nothing was left to train: the figures are those of the run that trained the jobs"
    for label, value in rows:
        table.add_row(label, value)
    return table


def errors_table(record: FleetRecord) -> Table | None:
    """The last error of every job that failed or was interrupted; None when there is none."""
    failed = [job for job in record.jobs.values() if job.error and job.state in ("failed", "interrupted")]
    if not failed:
        return None
    table = Table(title="errors", title_justify="left")
    table.add_column("job")
    table.add_column("attempt", justify="right")
    table.add_column("last error", overflow="fold")
    for job in failed:
        table.add_row(job.name, str(job.attempt), job.error)
    return table


def final_tables(record: FleetRecord) -> list[Table]:
    return [t for t in (jobs_table(record), summary_table(record), errors_table(record)) if t is not None]


class LiveTableView:
    """A rich table of the jobs placing, starting or running, and a count of the others, redrawn in place
    four times a second at most. Its work follows the changes, not the size of the fleet."""

    def __init__(self, console: Console, every_s: float = 0.25) -> None:
        self.console = console
        self.every_s = every_s
        self.active: set[str] = set()
        self.counts: dict[str, int] = {}
        self.states: dict[str, str] = {}
        self._last = 0.0
        self.live = Live(console=console, refresh_per_second=4, transient=False)
        self.live.start()

    def update(self, record: FleetRecord, changed: set[str]) -> None:
        for name in changed:
            state = record.jobs[name].state
            old = self.states.get(name)
            if old is not None:
                self.counts[old] -= 1
            self.states[name] = state
            self.counts[state] = self.counts.get(state, 0) + 1
            (self.active.add if state in ACTIVE else self.active.discard)(name)
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        counts = ", ".join(f"{count} {state}" for state, count in sorted(self.counts.items()) if count)
        self.live.update(jobs_table(record, sorted(self.active), caption=counts))

    def close(self, record: FleetRecord) -> None:
        self.live.update(Group(*final_tables(record)))
        self.live.stop()


class LogLinesView:
    """One line per state change, and a progress line per running job every `progress_every_s`."""

    def __init__(self, console: Console, progress_every_s: float = 10.0) -> None:
        self.console = console
        self.progress_every_s = progress_every_s
        self.seen: dict[str, tuple[str, int]] = {}
        self.last_progress: dict[str, float] = {}
        self.shown: dict[str, tuple[int, str | None]] = {}  # (step, phase) of each job's last line
        self.active: set[str] = set()

    def update(self, record: FleetRecord, changed: set[str]) -> None:
        now = time.time()
        for name in sorted(changed):
            job = record.jobs[name]
            if self.seen.get(name) != (job.state, job.attempt):
                self.seen[name] = (job.state, job.attempt)
                self._line(job, detail=job.error if job.state in ("queued", "failed") and job.error else None)
                self.last_progress[name] = now
            (self.active.add if job.state in ("starting", "running") else self.active.discard)(name)
        for name in sorted(self.active):
            job = record.jobs[name]
            # A phase change shows at once; a progress line only when the step moved (a long evaluation
            # is one "evaluating" line, not one identical line every progress_every_s).
            moved = self.shown.get(name, (0, None))[0] != job.step and now - self.last_progress.get(name, 0.0) >= self.progress_every_s
            if moved or self.shown.get(name, (0, None))[1] != job.phase:
                self._line(job)
                self.last_progress[name] = now

    def close(self, record: FleetRecord) -> None:
        self.update(record, set(record.jobs))
        for table in final_tables(record):
            self.console.print(table)

    def _line(self, job: JobRecord, detail: str | None = None) -> None:
        self.shown[job.name] = (job.step, job.phase)
        state = f"{job.state} ({job.phase})" if job.phase and job.state in ("starting", "running") else job.state
        parts = [f"job {job.name}: {state}", f"attempt {job.attempt}", f"step {job.step}/{job.max_steps}"]
        if job.loss is not None:
            parts.append(f"loss {job.loss:.4f}")
        if job.tokens_per_s:
            parts.append(f"{job.tokens_per_s:,.0f} tok/s")
        if job.eta_s:
            parts.append(f"eta {_duration(job.eta_s)}")
        if job.worker:
            parts.append(f"worker {job.worker}")
        if job.node:
            parts.append(f"node {job.node}")
        if detail:
            parts.append(f"error: {detail.splitlines()[0][:300]}")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.console.print(f"{stamp} " + ", ".join(parts), highlight=False, soft_wrap=True)


def _eval_change(result: dict | None) -> str:
    """Eval loss before training -> after, once the job has finished (and has eval data)."""
    if not result or result.get("eval_loss") is None:
        return ""
    before = result.get("initial_eval_loss")
    return f"{before:.3f} -> {result['eval_loss']:.3f}" if before is not None else f"{result['eval_loss']:.3f}"


def _number(value: float | None, pattern: str) -> str:
    return "" if value is None else pattern.format(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
